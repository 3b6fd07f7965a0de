"""Ray-vs-local overhead: the same RandAugment run on the local process pool and on a local Ray instance, 2 CPUs.

`ray_over_local` is Ray wall time / local wall time for the stage run (worker start-up, model setup and shard
work included; `ray.init` itself is timed apart as `ray_init_s`). Skipped (no figures) when ray is not installed.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.data.ingest import IngestConfig, run_ingest
from pipeline.core.paths import Layout
from pipeline.augment.stage import StageContext, run_stage
from pipeline.core.executor import RunOptions
from stages.randaug import RandAugmentStage

log = logging.getLogger(__name__)

WORKERS = 2
IMAGES, SHARD_SIZE = 400, 25  # 18 train/val/test shards: several per worker, as on a cluster
REPEATS = 2  # interleaved, best of each: the machine is shared, so single timings are noisy


def _timed_stage(layout: Layout, executor: str) -> float:
    started = time.perf_counter()
    run_stage(RandAugmentStage, RandAugmentStage.Config(), StageContext("synth"), layout,
              RunOptions(workers=WORKERS, executor=executor, mode="overwrite"))
    return time.perf_counter() - started


def run() -> dict[str, float]:
    if importlib.util.find_spec("ray") is None:
        log.warning("bench_ray skipped: ray is not installed (pip install -e '.[ray]')")
        return {}
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        local, remote = (Layout(Path(tmp) / n / "shards", Path(tmp) / n / "manifests") for n in ("local", "ray"))
        run_ingest(IngestConfig(dataset="synth", synth_size=IMAGES, shard_size=SHARD_SIZE), local, RunOptions(workers=WORKERS))
        shutil.copytree(local.base_dir("synth"), remote.base_dir("synth"))
        started = time.perf_counter()
        ray.init(address="local", num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - started
        try:
            timings = [(_timed_stage(local, "local"), _timed_stage(remote, "ray")) for _ in range(REPEATS)]
        finally:
            ray.shutdown()
        local_s, ray_s = min(t[0] for t in timings), min(t[1] for t in timings)
    return {
        "ray_over_local": round(ray_s / local_s, 2),
        "ray_stage_s": round(ray_s, 2),
        "local_stage_s": round(local_s, 2),
        "ray_init_s": round(init_s, 2),
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(run())
