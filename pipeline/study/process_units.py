"""`make study STUDY_PARALLEL=N`: the study's trainings and evaluations, N at a time, each in a worker process of
its own on this machine (EXECUTOR=local).

A second torch thread speeds a demo-sized unit up by less than a second process does: on 2 AVX2 cores a MAT
training of 12 steps took 48 s at one thread and 32 s at two, an evaluation of 40 images 29 s and 21 s, so two
one-thread units at a time do about 1.3x the work of one two-thread unit after the other (the demo's study: 884 s
against 1084 s). And a unit's numbers depend on its thread count (the order of float sums), so `UNIT_THREADS`
fixes it, whatever the machine: the demo's units run at one thread each on any number of cores.

The decisions are the local ones, taken in the driver by the :class:`~pipeline.study.run.PlanRunner` (which unit
is done, fingerprints, records, progress lines); the prepare units (pretrain, augment) run in the driver first.
Then a training starts as soon as a worker is free, and an evaluation as soon as the training it evaluates has
ended (its fingerprint stamps that model, so it is computed then). A unit that raises is reported and leaves no
record; the evaluations of a failed training are not run; the others go on, and the study then raises
:class:`~pipeline.study.failures.UnitsFailed`. The workers are spawned (no fork of a process holding torch
threads) and die with the driver however it ends.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Any

from pipeline.core.executor import worker_init
from pipeline.study.failures import UnitsFailed

log = logging.getLogger(__name__)

IN_WORKERS = ("train", "eval")  # the kinds that run in worker processes; the prepare units run in the driver


def _execute(run: Any) -> float:
    """A worker's task: one unit's callable; returns its seconds."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def run_plan_processes(runner: Any, parallel: int, threads: int) -> dict[str, str]:
    """Run `runner.units` (a :class:`~pipeline.study.run.PlanRunner`): prepare units here, then trainings and
    evaluations in `parallel` worker processes of `threads` torch threads each. Returns {unit: done|ran|taken};
    raises :class:`UnitsFailed` after the rest ran when a unit failed."""
    cells = [u for u in runner.units if u.kind in IN_WORKERS]
    here = [u for u in runner.units if u.kind not in IN_WORKERS]
    for i, unit in enumerate(here):
        runner.run_here(unit, here[i + 1:] + cells)
    made_by = {str(u.output): u.name for u in cells if u.kind == "train"}
    waiting, failed, blocked = list(cells), {}, []
    pending: dict[Future, tuple[Any, str | None, float]] = {}  # future -> (unit, fingerprint, started at)
    pool = None
    try:
        while waiting or pending:
            for unit in list(waiting):
                if len(pending) >= parallel:
                    break
                needs = {made_by[v] for v in unit.inputs.values() if v in made_by}
                if needs & (failed.keys() | set(blocked)):
                    waiting.remove(unit)
                    blocked.append(unit.name)
                    runner.status[unit.name] = "not run (its training failed)"
                    runner.report(unit, 0.0, waiting)
                    continue
                if needs & ({u.name for u in waiting} | {u.name for u, _, _ in pending.values()}):
                    continue  # its training has not ended yet
                waiting.remove(unit)
                must, fp = runner.todo(unit)
                if not must:
                    runner.report(unit, 0.0, waiting + [u for u, _, _ in pending.values()])
                    continue
                runner.before(unit, fp)
                if pool is None:
                    pool = ProcessPoolExecutor(max_workers=parallel, mp_context=get_context("spawn"),
                                               initializer=worker_init, initargs=(threads, os.getpid()))
                    log.info("study units in %d worker processes of %d torch thread(s) each", parallel, threads)
                pending[pool.submit(_execute, unit.run)] = (unit, fp, time.perf_counter())
            if not pending:
                continue
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                unit, fp, started = pending.pop(future)
                try:
                    seconds = future.result()
                except BrokenProcessPool as error:  # a worker died (killed, out of memory): the pool is gone
                    raise RuntimeError(f"{unit.name}: a study worker process died ({error}); rerun the same "
                                       "command to redo the units not finished") from error
                except Exception as error:  # the unit raised: reported; its evaluations are not run
                    failed[unit.name] = f"{type(error).__name__}: {error}".splitlines()[0]
                    runner.status[unit.name] = "failed"
                    log.error("%s failed:%s", unit.name, error.__cause__ or f" {failed[unit.name]}")  # the worker's traceback
                    seconds = time.perf_counter() - started
                else:
                    runner.finished(unit, fp, seconds)
                runner.report(unit, seconds, waiting + [u for u, _, _ in pending.values()], parallel, " in a worker")
    finally:
        if pool is not None:  # interrupted: the units still running end with their workers
            pool.shutdown(wait=not pending, cancel_futures=True)
            for process in list(getattr(pool, "_processes", {}).values()) if pending else ():
                process.terminate()
    if failed:
        raise UnitsFailed(failed, blocked)
    return runner.status
