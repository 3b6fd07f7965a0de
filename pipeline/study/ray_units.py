"""`make study EXECUTOR=ray`: the study's trainings, then its evaluations, as Ray tasks (the optional ray extra).

The plan is the local one (:func:`pipeline.study.run.build_plan`), and so is every decision about a unit: the
driver keeps the :class:`~pipeline.study.run.PlanRunner` (which unit is done, by its record and fingerprint; the
records; the progress lines). What changes is where a unit runs:

1. the prepare units (pretraining the stand-in CLIP, augmenting the missing CPU stages) run in the driver, one
   after the other, as locally: every cell needs them (an augmentation still spreads its shards over Ray actors,
   as `make augment EXECUTOR=ray` does);
2. every training that is not done is a Ray task, all submitted at once; Ray runs as many at a time as the
   cluster holds (each asks for one GPU when the study's device resolves to CUDA, else one CPU;
   :func:`pipeline.core.ray_executor.resources` reads `MAT_RAY_CPUS_PER_ACTOR` / `MAT_RAY_GPUS_PER_ACTOR`);
3. once they have all ended, every evaluation that is not done is a task the same way: its fingerprint stamps the
   model its training wrote, so it is computed only now, in the driver.

Ray is started (or joined: `RAY_ADDRESS`, as :func:`pipeline.core.ray_executor.ensure_ray` does for augmentation;
else a local instance of WORKERS CPUs) when the first unit must run as a task: a rerun with every unit done starts
none.

A task runs the unit's own callable (``train(cfg, layout)`` or ``evaluate(cfg, layout)``, the settings the
fingerprint covers) in the driver's folder, so relative SHARDS_DIR / MANIFESTS_DIR / RUNS_DIR / MODELS_DIR mean
the same folders; on a cluster they must be on a file system every node sees. The driver writes a unit's record
when its task ends well. A task that raises, or whose worker dies twice (Ray retries a dead worker once), is
reported and leaves no record; the evaluations of a failed training are not run; the other units go on, and the
study then raises :class:`UnitsFailed` (the command exits non-zero, no report is written). A rerun skips what is
done and redoes only the rest: an interrupted training continues from its checkpoint, as locally.

The units are deterministic given their settings (seeds come from the settings, not from the worker), so the
outputs are those of ``EXECUTOR=local`` on the same hardware with the same torch threads: a task runs as many
threads as it has CPUs (`tests/test_study_ray.py` compares the two).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayError

from pipeline.core.ray_executor import enter_driver_folder, ensure_ray, pool_size, resources
from pipeline.study.failures import UnitsFailed, error_line
from pipeline.study.plan import StudyConfig

log = logging.getLogger(__name__)

PHASES = ("train", "eval")  # the kinds that run as tasks, in this order; the others run in the driver


def uses_cuda(device: str, cluster: dict[str, float]) -> bool:
    """Whether the study's units run on CUDA: DEVICE=cuda, or auto on a cluster that has GPUs (the units run on
    the cluster's nodes, not where the driver is)."""
    return cluster.get("GPU", 0) > 0 if device == "auto" else device.startswith("cuda")


def _execute(run: Callable[[], Any], driver_cwd: str, threads: int) -> float:
    """A task: one unit's callable in the driver's folder; returns its seconds."""
    enter_driver_folder(driver_cwd, threads)
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


class _Tasks:
    """The Ray task a unit runs as, sized for the cluster; Ray is started (or joined) when the first unit must run
    as a task, so a rerun with every unit done starts none."""

    def __init__(self, cfg: StudyConfig) -> None:
        self.cfg, self.task = cfg, None

    def start(self) -> "_Tasks":
        if self.task is None:
            ensure_ray(self.cfg.workers)
            self.cluster = ray.cluster_resources()
            self.wants = resources(uses_cuda(self.cfg.device, self.cluster))
            pool_size(self.wants, 1, self.cluster)  # the cluster holds one unit at least, else a ValueError
            self.task = ray.remote(_execute).options(num_cpus=self.wants.num_cpus, num_gpus=self.wants.num_gpus,
                                                     max_retries=1)  # a dead worker once; an exception not
        return self


def run_plan_ray(runner: Any, cfg: StudyConfig) -> dict[str, str]:
    """Run `runner.units` (a :class:`~pipeline.study.run.PlanRunner`): prepare units here, trainings then
    evaluations as Ray tasks. Returns {unit: done|ran|taken}; raises :class:`UnitsFailed` after the rest ran
    when a task failed."""
    cells = [u for u in runner.units if u.kind in PHASES]
    here = [u for u in runner.units if u.kind not in PHASES]
    for i, unit in enumerate(here):
        runner.run_here(unit, here[i + 1:] + cells)
    tasks = _Tasks(cfg)
    failed: dict[str, str] = {}
    blocked: list[str] = []
    for kind in PHASES:
        batch = [u for u in cells if u.kind == kind]
        later = [u for u in cells if PHASES.index(u.kind) > PHASES.index(kind)]
        _phase(runner, batch, later, tasks, failed, blocked)
    if failed:
        raise UnitsFailed(failed, blocked)
    return runner.status


def _phase(runner: Any, batch: list[Any], later: list[Any], tasks: _Tasks, failed: dict[str, str],
           blocked: list[str]) -> None:
    """Submit the units of `batch` that must run, report the others, and wait for every task submitted."""
    failed_outputs = {str(u.output) for u in runner.units if u.name in failed}
    to_run = []
    for unit in batch:
        if failed_outputs & set(unit.inputs.values()):  # made by a training that failed: nothing to stamp or run
            blocked.append(unit.name)
            runner.status[unit.name] = "not run (its training failed)"
            runner.report(unit, 0.0, later)
            continue
        must, fp = runner.todo(unit)
        if must:
            to_run.append((unit, fp))
        else:
            runner.report(unit, 0.0, [u for u, _ in to_run] + later)
    if not to_run:
        return
    task, wants = tasks.start().task, tasks.wants
    parallel = pool_size(wants, len(to_run), tasks.cluster)
    threads = max(1, int(wants.num_cpus))
    driver_cwd = os.getcwd()
    pending: dict[Any, tuple[Any, str | None, float]] = {}  # task -> (unit, fingerprint, submitted at)
    try:
        for unit, fp in to_run:
            runner.before(unit, fp)
            pending[task.remote(unit.run, driver_cwd, threads)] = (unit, fp, time.perf_counter())
        log.info("%d %s unit(s) as Ray tasks of %g CPU / %g GPU, up to %d at a time", len(pending), batch[0].kind,
                 wants.num_cpus, wants.num_gpus, parallel)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            unit, fp, submitted = pending.pop(ref)
            try:
                seconds = ray.get(ref)
            except RayError as error:
                failed[unit.name] = error_line(error)
                runner.status[unit.name] = "failed"
                log.error("%s failed on Ray:\n%s", unit.name, getattr(error, "traceback_str", None) or error)
                seconds = time.perf_counter() - submitted  # queued and run
            else:
                runner.finished(unit, fp, seconds)
            runner.report(unit, seconds, [u for u, _, _ in pending.values()] + later, parallel, " on Ray")
    finally:
        for ref in pending:  # stopped (Ctrl-C, SIGTERM, an error here): the units still running end too
            ray.cancel(ref, force=True)
