"""Run shard tasks: a shard is the unit of work, processed by a picklable callable that never raises.

Executors are registered in `EXECUTORS` below: `local` runs a process pool over the cores (or inline with one
worker), `ray` (pipeline/core/ray_executor.py, an optional extra) runs Ray actors. Each is a `TaskPool` (submit
a task, wait for the next one done) driven by the one loop `run_pool`: retries, progress bar and error log.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any, Protocol

from tqdm import tqdm

from pipeline.core.config import check_choice, check_non_negative, check_positive
from pipeline.core.lifetime import die_with_parent
from pipeline.core.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """How shard tasks run: worker count, executor name, retries per shard, and incremental or overwrite."""

    workers: int = 1
    executor: str = "local"
    retries: int = 1
    mode: str = "incremental"  # or "overwrite": redo every shard

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, ("incremental", "overwrite"))
        check_positive(self, "workers")
        check_non_negative(self, "retries")


@dataclass
class TaskResult:
    """What a shard task reports back. `ok` False carries the error; `stats` is the shard's stats dict."""

    task_id: str
    ok: bool
    stats: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    skipped_as_done: bool = False


def safe_call(worker: Callable[[Any], TaskResult], task: Any, task_id: str) -> TaskResult:
    """Call a worker so that no exception crosses the process boundary."""
    try:
        return worker(task)
    except Exception as error:  # reported, retried by the executor, then recorded
        log.debug("task %s failed", task_id, exc_info=True)
        return TaskResult(task_id, ok=False, error=f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=3)}")


def worker_init(threads: int, parent_pid: int | None = None) -> None:
    """Set up a worker process: it ends with its parent (`parent_pid`), and its share of the cores' threads."""
    if parent_pid is not None:
        die_with_parent(parent_pid)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


Item = tuple[str, Any]  # (task_id, task)


class TaskPool(Protocol):
    """Where tasks run: an executor's part of the shared loop (`run_pool`)."""

    def can_submit(self) -> bool: ...
    def submit(self, worker: Callable[[Any], TaskResult], item: Item) -> None: ...
    def busy(self) -> bool: ...
    def next_done(self) -> tuple[Item, TaskResult]: ...
    def shutdown(self) -> None: ...


def run_pool(pool: TaskPool, worker: Callable[[Any], TaskResult], tasks: Sequence[Item], desc: str,
             retries: int = 1) -> list[TaskResult]:
    """Run (task_id, task) pairs on `pool`; a failed task goes back at the end of the queue `retries` times, then
    is returned with ok=False. Results come back in the order of `tasks`."""
    queue = deque(tasks)
    attempts = {task_id: 0 for task_id, _ in tasks}
    results: dict[str, TaskResult] = {}
    total_samples = 0
    start = time.perf_counter()
    try:
        with tqdm(total=len(tasks), desc=desc, unit="shard", disable=None) as bar:
            while queue or pool.busy():
                while queue and pool.can_submit():
                    pool.submit(worker, queue.popleft())
                item, outcome = pool.next_done()
                attempts[item[0]] += 1
                results[item[0]] = outcome
                total_samples += _progress(bar, outcome, start, total_samples)
                if not outcome.ok:
                    first_line = outcome.error.splitlines()[0] if outcome.error else ""
                    log.error("%s: shard %s failed (attempt %d of %d): %s", desc, item[0], attempts[item[0]],
                              retries + 1, first_line)
                    if attempts[item[0]] <= retries:
                        queue.append(item)
    finally:
        pool.shutdown()
    return [results[task_id] for task_id, _ in tasks]


class InlinePool:
    """One task at a time in this process."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[[Any], TaskResult], Item]] = []

    def can_submit(self) -> bool:
        return not self.pending

    def submit(self, worker: Callable[[Any], TaskResult], item: Item) -> None:
        self.pending.append((worker, item))

    def busy(self) -> bool:
        return bool(self.pending)

    def next_done(self) -> tuple[Item, TaskResult]:
        worker, item = self.pending.pop()
        return item, safe_call(worker, item[1], item[0])

    def shutdown(self) -> None:
        pass


class ProcessPool:
    """A spawn-context process pool; every task is submitted at once. A pool broken by a dead worker process is
    replaced by a fresh one at the next submit."""

    def __init__(self, processes: int):
        self.processes = processes
        self.threads = max(1, default_workers() // processes)
        self.futures: dict[Future, Item] = {}
        self.pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.processes, mp_context=get_context("spawn"),
                                   initializer=worker_init, initargs=(self.threads, os.getpid()))

    def can_submit(self) -> bool:
        return True

    def submit(self, worker: Callable[[Any], TaskResult], item: Item) -> None:
        try:
            future = self.pool.submit(safe_call, worker, item[1], item[0])
        except BrokenProcessPool:
            self.pool.shutdown(wait=True)
            self.pool = self._start()
            future = self.pool.submit(safe_call, worker, item[1], item[0])
        self.futures[future] = item

    def busy(self) -> bool:
        return bool(self.futures)

    def next_done(self) -> tuple[Item, TaskResult]:
        done, _ = wait(self.futures, return_when=FIRST_COMPLETED)
        future = next(iter(done))
        item = self.futures.pop(future)
        try:
            return item, future.result()
        except Exception as error:  # the worker process itself died
            return item, TaskResult(item[0], ok=False, error=f"worker process died: {error}")

    def shutdown(self) -> None:
        # Tasks not started are dropped (none are left after a complete run): a command stopped by SIGTERM or
        # an error ends once the running tasks end, instead of doing all the rest first.
        self.pool.shutdown(wait=True, cancel_futures=True)


def run_local(
    worker: Callable[[Any], TaskResult],
    tasks: Sequence[Item],
    workers: int,
    desc: str,
    retries: int = 1,
) -> list[TaskResult]:
    """Run (task_id, task) pairs in a process pool of `workers` processes (inline with one worker or one task)."""
    pool = InlinePool() if workers <= 1 or len(tasks) <= 1 else ProcessPool(min(workers, len(tasks)))
    return run_pool(pool, worker, tasks, desc, retries)


def _progress(bar: tqdm, outcome: TaskResult, start: float, done_samples: int) -> int:
    samples = int(outcome.stats.get("input", 0)) if outcome.ok else 0
    if outcome.ok:
        bar.update(1)
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(samples_per_s=f"{(done_samples + samples) / elapsed:.1f}")
    return samples


#: An executor: (worker, tasks, workers, desc, retries) -> results in the order of tasks.
Executor = Callable[[Callable[[Any], TaskResult], Sequence[Item], int, str, int], list[TaskResult]]

EXECUTORS = Registry("executor")
EXECUTORS.register("local", run_local, description="process pool; inline with one worker")
EXECUTORS.register("ray", "pipeline.core.ray_executor:run_ray", needs={"ray"},
                   description="Ray actors on a cluster or a local instance; the optional ray extra")


def get_executor(name: str) -> Executor:
    entry = EXECUTORS.get(name)
    try:
        return entry.load()
    except ImportError as error:
        raise ValueError(f"executor {name!r} needs the optional extra: pip install 'mat-pipeline[{name}]' ({error})") from error
