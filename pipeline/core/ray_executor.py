"""The `ray` executor: shard tasks on a Ray cluster (or a local Ray instance), registered lazily as EXECUTORS["ray"]
(pipeline/core/executor.py); the retry / progress loop is the shared `run_pool`.

Each Ray actor is one long-lived worker process: it builds its stage (and loads its model) once, through the
same per-process cache the local pool uses (`pipeline.augment.stage._stage_in_process`), then processes whole shards
one at a time. The driver keeps one shard in flight per actor, collects `TaskResult`s and hands them back to the
runner, which writes the manifest from the stats files exactly as after a local run.

Why actors over our own queue rather than Ray Data: a shard is already the unit of work, its output is a file
written atomically by the worker (no rows return to the driver), and resume / retry / manifest are decided per
shard. An actor pool with one in-flight call per actor is the smallest thing that keeps models resident; Ray
Data would add a row-level execution plan and block-size tuning for nothing.

Resources per actor: a task whose stage runs on CUDA (its config's `device`, or the run's `DEVICE` when the
config says "auto"; or a stage class with `needs_gpu = True`) gets an actor per GPU (`num_gpus=1`, or
`MAT_RAY_GPUS_PER_ACTOR`, e.g. 0.5 to pack two small models per GPU); otherwise one actor per CPU
(`MAT_RAY_CPUS_PER_ACTOR`, default 1). The pool is as large as the cluster's resources allow, capped by the number of
shards. With no `RAY_ADDRESS` the executor starts a local instance with `workers` CPUs.

Failures: a shard that returns ok=False or whose actor process dies (RayActorError) is re-queued up to
`retries` times, then recorded as failed; a dead actor is replaced by a fresh one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError

from pipeline.core.executor import TaskResult, run_pool, safe_call, worker_init

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActorResources:
    """What one actor asks of the cluster."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0 or (self.num_cpus == 0 and self.num_gpus == 0):
            raise ValueError(f"an actor needs some CPU or GPU: num_cpus={self.num_cpus}, num_gpus={self.num_gpus}")


def task_needs_gpu(task: Any) -> bool:
    """Whether a task's stage runs on CUDA: `needs_gpu` on the stage class, or its resolved device is cuda."""
    stage_cls = getattr(task, "stage_cls", None)
    if getattr(stage_cls, "needs_gpu", False):
        return True
    config_device = str(getattr(getattr(task, "config", None), "device", "auto"))
    context_device = str(getattr(getattr(task, "context", None), "device", "cpu"))
    device = context_device if config_device == "auto" else config_device
    return device.startswith("cuda")


def resources(gpu: bool) -> ActorResources:
    """What one actor (or one of the study's tasks) asks for: `MAT_RAY_CPUS_PER_ACTOR` CPUs (default 1), and
    `MAT_RAY_GPUS_PER_ACTOR` GPUs (default 1) when it runs on CUDA."""
    cpus = float(os.environ.get("MAT_RAY_CPUS_PER_ACTOR", "1"))
    if gpu:
        return ActorResources(num_cpus=cpus, num_gpus=float(os.environ.get("MAT_RAY_GPUS_PER_ACTOR", "1")))
    return ActorResources(num_cpus=cpus)


def actor_resources(tasks: Sequence[tuple[str, Any]]) -> ActorResources:
    return resources(any(task_needs_gpu(task) for _, task in tasks))


def pool_size(resources: ActorResources, shards: int, cluster: dict[str, float]) -> int:
    """Actors the cluster can hold at once for `resources`, at most one per shard (and at least one)."""
    limits = [shards]
    if resources.num_gpus:
        limits.append(int(cluster.get("GPU", 0) // resources.num_gpus))
    if resources.num_cpus:
        limits.append(int(cluster.get("CPU", 0) // resources.num_cpus))
    size = min(limits)
    if size < 1:
        raise ValueError(
            f"the Ray cluster ({cluster.get('CPU', 0):g} CPU, {cluster.get('GPU', 0):g} GPU) cannot hold one actor "
            f"of {resources.num_cpus:g} CPU / {resources.num_gpus:g} GPU"
        )
    return size


def ensure_ray(workers: int) -> None:
    """Connect to RAY_ADDRESS (e.g. `auto` on a cluster node), or start a local instance with `workers` CPUs."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("connected to the Ray cluster at %s: %s", address, ray.cluster_resources())
    else:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=True)
        log.info("started a local Ray instance with %d CPU(s)", workers)


def enter_driver_folder(driver_cwd: str, threads: int) -> None:
    """Set up a Ray worker process like the driver: its folder as the working folder (relative SHARDS_DIR paths
    mean the driver's folder; on a cluster it must be shared storage) and `threads` torch threads."""
    if os.path.isdir(driver_cwd):
        os.chdir(driver_cwd)
    else:
        log.warning("driver folder %s does not exist on this node: relative output paths will break", driver_cwd)
    worker_init(threads)


class ShardWorker:
    """A Ray actor: one worker process that runs shard tasks and keeps what the worker function caches."""

    def __init__(self, driver_cwd: str, threads: int):
        enter_driver_folder(driver_cwd, threads)

    def run(self, worker: Callable[[Any], TaskResult], task: Any, task_id: str) -> TaskResult:
        return safe_call(worker, task, task_id)


@dataclass
class _Pool:
    """Idle actors, and for each in-flight call: its actor and its (task_id, task)."""

    make_actor: Callable[[], Any]
    idle: list[Any]
    in_flight: dict[Any, tuple[Any, tuple[str, Any]]]

    def can_submit(self) -> bool:
        return bool(self.idle)

    def busy(self) -> bool:
        return bool(self.in_flight)

    def submit(self, worker: Callable[[Any], TaskResult], item: tuple[str, Any]) -> None:
        actor = self.idle.pop()
        self.in_flight[actor.run.remote(worker, item[1], item[0])] = (actor, item)

    def next_done(self) -> tuple[tuple[str, Any], TaskResult]:
        [ref], _ = ray.wait(list(self.in_flight), num_returns=1)
        actor, item = self.in_flight.pop(ref)
        try:
            outcome = ray.get(ref)
            self.idle.append(actor)
        except RayActorError as error:  # the actor process died mid-shard: replace it
            outcome = TaskResult(item[0], ok=False, error=f"worker process died: {type(error).__name__}: {error}")
            ray.kill(actor, no_restart=True)
            self.idle.append(self.make_actor())
        return item, outcome

    def shutdown(self) -> None:
        for actor in self.idle + [a for a, _ in self.in_flight.values()]:
            ray.kill(actor, no_restart=True)


def run_ray(
    worker: Callable[[Any], TaskResult],
    tasks: Sequence[tuple[str, Any]],
    workers: int,
    desc: str,
    retries: int = 1,
) -> list[TaskResult]:
    """Run (task_id, task) pairs on Ray actors; failed tasks are retried `retries` times, then returned ok=False."""
    if not tasks:
        return []
    ensure_ray(workers)
    resources = actor_resources(tasks)
    size = pool_size(resources, len(tasks), ray.cluster_resources())
    threads = max(1, int(resources.num_cpus))
    actor_cls = ray.remote(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, max_restarts=0)(ShardWorker)
    cwd = os.getcwd()

    def make_actor() -> Any:
        return actor_cls.remote(cwd, threads)

    log.info("%s: %d shard(s) on %d Ray actor(s) of %g CPU / %g GPU", desc, len(tasks), size, resources.num_cpus, resources.num_gpus)
    pool = _Pool(make_actor, [make_actor() for _ in range(size)], {})
    return run_pool(pool, worker, tasks, desc, retries)
