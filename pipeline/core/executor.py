"""Run shard tasks: a shard is the unit of work, processed by a picklable callable that never raises.

`local` runs a process pool over the cores (or inline with one worker). A distributed executor plugs in
through the same `EXECUTORS` registry.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

from tqdm import tqdm

from pipeline.core.config import check_choice, check_non_negative, check_positive

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


def _worker_init(threads: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def run_local(
    worker: Callable[[Any], TaskResult],
    tasks: Sequence[tuple[str, Any]],
    workers: int,
    desc: str,
    retries: int = 1,
) -> list[TaskResult]:
    """Run (task_id, task) pairs; failed tasks are retried `retries` times, then returned with ok=False."""
    results: dict[str, TaskResult] = {}
    pending = list(tasks)
    total_samples = 0
    start = time.perf_counter()
    with tqdm(total=len(pending), desc=desc, unit="shard", disable=None) as bar:
        for attempt in range(retries + 1):
            if not pending:
                break
            if attempt:
                log.warning("%s: retrying %d failed shard(s) (attempt %d of %d)", desc, len(pending), attempt + 1, retries + 1)
            outcomes: list[tuple[tuple[str, Any], TaskResult]] = []
            if workers <= 1 or len(pending) == 1:
                for item in pending:
                    outcomes.append((item, safe_call(worker, item[1], item[0])))
                    total_samples += _progress(bar, outcomes[-1][1], start, total_samples)
            else:
                threads = max(1, default_workers() // workers)
                with ProcessPoolExecutor(
                    max_workers=min(workers, len(pending)),
                    mp_context=get_context("spawn"),
                    initializer=_worker_init,
                    initargs=(threads,),
                ) as pool:
                    futures = {pool.submit(safe_call, worker, item[1], item[0]): item for item in pending}
                    for future in as_completed(futures):
                        item = futures[future]
                        try:
                            outcome = future.result()
                        except Exception as error:  # the worker process itself died
                            outcome = TaskResult(item[0], ok=False, error=f"worker process died: {error}")
                        outcomes.append((item, outcome))
                        total_samples += _progress(bar, outcome, start, total_samples)
            pending = []
            for item, outcome in outcomes:
                results[item[0]] = outcome
                if not outcome.ok:
                    log.error("%s: shard %s failed: %s", desc, item[0], outcome.error.splitlines()[0] if outcome.error else "")
                    pending.append(item)
    return [results[task_id] for task_id, _ in tasks]


def _progress(bar: tqdm, outcome: TaskResult, start: float, done_samples: int) -> int:
    samples = int(outcome.stats.get("input", 0)) if outcome.ok else 0
    if outcome.ok:
        bar.update(1)
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(samples_per_s=f"{(done_samples + samples) / elapsed:.1f}")
    return samples


Executor = Callable[[Callable[[Any], TaskResult], Sequence[tuple[str, Any]], int, str, int], list[TaskResult]]
EXECUTORS: dict[str, Executor] = {"local": run_local}


def get_executor(name: str) -> Executor:
    if name == "ray" and "ray" not in EXECUTORS:
        try:
            from pipeline.core import ray_executor  # noqa: F401  (registers itself; optional extra)
        except ImportError as error:
            raise ValueError(f"executor 'ray' needs the optional extra: pip install 'mat-pipeline[ray]' ({error})") from error
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; choose one of {sorted(EXECUTORS) + ['ray']}")
    return EXECUTORS[name]
