"""Scale-out: the `ray` executor against the local one, worker death and retries, and the torchrun launch line.

The Ray tests share one local Ray instance of 2 CPUs (module fixture); they are skipped when ray is not installed
(and fail in CI, where `make test` installs it). The torchrun test needs no Ray.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from pipeline.data.ingest import IngestConfig, run_ingest
from pipeline.core.paths import Layout
from pipeline.core.shards import list_shards, read_stats, shard_is_done, stats_path
from pipeline.augment.stage import StageContext, StageJob, run_stage
from pipeline.core.executor import RunOptions
from stages.randaug import RandAugmentStage

DATASET = "synth"
REPO = Path(__file__).resolve().parents[1]


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def ray_session():
    if importlib.util.find_spec("ray") is None:
        _skip_or_fail("ray is not installed: pip install -e '.[ray]'")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    # Stage classes defined in this test module travel to the actors by value (tests/ is not a package).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def base_root(tmp_path_factory) -> Path:
    """A synth dataset of 24 images in 4-image shards (7 shards over train/val/test), ingested once."""
    root = tmp_path_factory.mktemp("base")
    run_ingest(IngestConfig(dataset=DATASET, synth_size=24, shard_size=4), _layout(root), RunOptions(workers=1))
    return root


def _layout(root: Path) -> Layout:
    return Layout(shards_dir=root / "shards", manifests_dir=root / "manifests")


def _copy_base(base_root: Path, root: Path) -> Layout:
    layout = _layout(root)
    shutil.copytree(_layout(base_root).base_dir(DATASET), layout.base_dir(DATASET))
    return layout


def _shard_bytes(layout: Layout, stage: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in list_shards(layout.stage_dir(DATASET, stage))}


def _stage_class(name: str) -> type:
    from stages import get_stage_class

    return get_stage_class(name)


# ------------------------------------------------------------------ ray vs local


# EDA loads WordNet in every worker (about 10 s here), so the resume check runs on randaug only.
@pytest.mark.parametrize("stage_name,check_resume", [("eda", False), ("randaug", True)])
def test_ray_run_is_byte_identical_to_local_and_resumes(ray_session, base_root, tmp_path, stage_name, check_resume) -> None:
    stage_cls = _stage_class(stage_name)
    ok, reason = stage_cls.availability(stage_cls.Config())
    if not ok:
        _skip_or_fail(reason)
    config = stage_cls.Config(variants_per_caption=1) if stage_name == "eda" else stage_cls.Config(variants_per_image=1)
    context = StageContext(DATASET, seed=3)
    local, remote = _copy_base(base_root, tmp_path / "local"), _copy_base(base_root, tmp_path / "ray")

    local_manifest = run_stage(stage_cls, config, context, local, RunOptions(workers=1))
    ray_manifest = run_stage(stage_cls, config, context, remote, RunOptions(workers=2, executor="ray"))

    local_bytes, ray_bytes = _shard_bytes(local, stage_name), _shard_bytes(remote, stage_name)
    assert len(ray_bytes) == len(list_shards(remote.base_dir(DATASET))) == 7
    assert ray_bytes == local_bytes
    for key in ("counts", "stats", "failed_shards"):
        assert ray_manifest[key] == local_manifest[key]
    assert ray_manifest["counts"]["written"] == 24 and ray_manifest["stats"]["variants"] > 0
    assert json.loads(remote.manifest_path(DATASET, stage_name).read_text())["counts"] == ray_manifest["counts"]

    if not check_resume:
        return
    # Resume: only the shard whose stats file is gone is redone; the others are not touched.
    stage_dir = remote.stage_dir(DATASET, stage_name)
    redo = stage_dir / "train-000002.tar"
    stats_path(redo).unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in list_shards(stage_dir) if p != redo}
    resumed = run_stage(stage_cls, config, context, remote, RunOptions(workers=2, executor="ray"))
    assert {p.name: p.stat().st_mtime_ns for p in list_shards(stage_dir) if p != redo} == mtimes
    assert shard_is_done(redo) and redo.read_bytes() == local_bytes[redo.name]
    assert resumed["counts"] == local_manifest["counts"]


def test_generative_stage_on_ray_matches_local(ray_session, base_root, tmp_path) -> None:
    """t2i-sd with a tiny random SD checkpoint: each actor loads the pipeline once; same bytes as local."""
    from pipeline.augment.tiny_models import build_tiny_sd
    from stages.t2i_sd import StableDiffusionStage

    config = StableDiffusionStage.Config(model=str(build_tiny_sd(tmp_path / "sd")), steps=2, height=32, width=32,
                                         guidance_scale=1.0, batch_size=4)
    context = StageContext(DATASET, seed=1)
    local, remote = _copy_base(base_root, tmp_path / "local"), _copy_base(base_root, tmp_path / "ray")
    local_manifest = run_stage(StableDiffusionStage, config, context, local, RunOptions(workers=1))
    ray_manifest = run_stage(StableDiffusionStage, config, context, remote, RunOptions(workers=2, executor="ray"))
    assert ray_manifest["stats"]["variants"] == local_manifest["stats"]["variants"] > 0
    assert _shard_bytes(remote, "t2i-sd") == _shard_bytes(local, "t2i-sd")


# ------------------------------------------------------------------ failures: a worker killed or raising


class FlakyRandAugment(RandAugmentStage):
    """RandAugment whose first shard (across all workers) kills its process or raises, once per marker file."""

    name: ClassVar[str] = "randaug"

    @dataclass(frozen=True)
    class Config(RandAugmentStage.Config):
        marker: str = ""
        how: str = "exit"  # "exit": the worker process dies; "raise": the shard raises

    def augment_batch(self, samples):
        marker = Path(self.config.marker)
        try:
            marker.touch(exist_ok=False)
        except FileExistsError:
            return super().augment_batch(samples)
        if self.config.how == "exit":
            os._exit(3)
        raise RuntimeError("flaky shard")


@pytest.mark.parametrize("how", ["exit", "raise"])
def test_failed_shard_is_retried_and_run_completes(ray_session, base_root, tmp_path, how) -> None:
    marker = tmp_path / "failed-once"
    config = FlakyRandAugment.Config(variants_per_image=1, marker=str(marker), how=how)
    layout = _copy_base(base_root, tmp_path / "ray")
    manifest = run_stage(FlakyRandAugment, config, StageContext(DATASET), layout, RunOptions(workers=2, executor="ray", retries=1))

    assert marker.exists()  # the failure did happen
    assert manifest["failed_shards"] == []
    assert manifest["counts"] == {"input": 24, "written": 24, "skipped": 0}
    assert all(shard_is_done(p) for p in list_shards(layout.stage_dir(DATASET, "randaug")))
    # The retried run writes what an undisturbed local run writes.
    local = _copy_base(base_root, tmp_path / "local")
    run_stage(RandAugmentStage, RandAugmentStage.Config(variants_per_image=1), StageContext(DATASET), local, RunOptions(workers=1))
    assert _shard_bytes(layout, "randaug") == _shard_bytes(local, "randaug")


def test_shard_failing_past_retries_is_recorded(ray_session, base_root, tmp_path) -> None:
    marker = tmp_path / "failed-once"
    config = FlakyRandAugment.Config(variants_per_image=1, marker=str(marker), how="exit")
    layout = _copy_base(base_root, tmp_path / "ray")
    manifest = run_stage(FlakyRandAugment, config, StageContext(DATASET), layout, RunOptions(workers=2, executor="ray", retries=0))

    [failed] = manifest["failed_shards"]
    assert "worker process died" in failed["error"]
    lost = read_stats(layout.base_dir(DATASET) / failed["shard"])["keys"]
    assert manifest["counts"] == {"input": 24, "written": 24 - len(lost), "skipped": len(lost)}
    assert sorted(s["source"] for s in manifest["skipped"]) == sorted(lost)
    assert not shard_is_done(layout.stage_dir(DATASET, "randaug") / failed["shard"])
    # Rerunning resumes just that shard.
    again = run_stage(FlakyRandAugment, config, StageContext(DATASET), layout, RunOptions(workers=2, executor="ray", retries=0))
    assert again["failed_shards"] == [] and again["counts"]["written"] == 24


# ------------------------------------------------------------------ resources and registry


def test_get_executor_registers_ray(ray_session) -> None:
    from pipeline.core.executor import EXECUTORS, get_executor
    from pipeline.core.ray_executor import run_ray

    assert get_executor("ray") is run_ray and EXECUTORS["ray"] is run_ray


def _job(device: str = "cpu", config_device: str | None = None, needs_gpu: bool = False) -> StageJob:
    @dataclass(frozen=True)
    class Config:
        device: str = "auto"

    stage_cls = type("S", (), {"needs_gpu": needs_gpu})
    config = Config(config_device) if config_device else RandAugmentStage.Config()
    return StageJob(stage_cls, config, StageContext(DATASET, device=device), Path("b.tar"), Path("o.tar"))


def test_gpu_stages_get_an_actor_per_gpu(ray_session, monkeypatch) -> None:
    from pipeline.core.ray_executor import ActorResources, actor_resources, pool_size, task_needs_gpu

    assert not task_needs_gpu(_job("cpu"))
    assert task_needs_gpu(_job("cuda"))  # DEVICE=cuda, stage without its own device option
    assert task_needs_gpu(_job("cpu", config_device="cuda:0"))  # the stage's own device wins over DEVICE
    assert not task_needs_gpu(_job("cuda", config_device="cpu"))
    assert task_needs_gpu(_job("cpu", config_device="auto", needs_gpu=True))
    assert task_needs_gpu(_job("cuda", config_device="auto"))
    assert actor_resources([("a", _job("cuda"))]) == ActorResources(num_cpus=1, num_gpus=1)
    monkeypatch.setenv("MAT_RAY_GPUS_PER_ACTOR", "0.5")
    assert actor_resources([("a", _job("cuda"))]).num_gpus == 0.5

    cluster = {"CPU": 128.0, "GPU": 8.0}
    assert pool_size(ActorResources(1, 1), 512, cluster) == 8
    assert pool_size(ActorResources(1, 0.5), 512, cluster) == 16
    assert pool_size(ActorResources(1, 1), 3, cluster) == 3  # never more actors than shards
    assert pool_size(ActorResources(1, 0), 512, cluster) == 128
    with pytest.raises(ValueError, match="cannot hold one actor"):
        pool_size(ActorResources(1, 1), 10, {"CPU": 16.0})
    with pytest.raises(ValueError, match="needs some CPU or GPU"):
        ActorResources(0, 0)


# ------------------------------------------------------------------ multi-node training launch (torchrun)

_SPLIT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    from pipeline.train import data
    from pipeline.train.distributed import cleanup, init_distributed

    env = init_distributed("cpu")
    urls, out = json.loads(sys.argv[1]), sys.argv[2]
    pipe = data.build_pipeline(urls, batch_size=1, image_size=8, shuffle_buffer=0, resampled=False)
    keys = [k for batch in data.build_loader(pipe, num_workers=2) for k in batch["keys"]]
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, {"rank": env.rank, "world": env.world_size, "keys": keys})
    if env.is_main:
        open(out, "w").write(json.dumps(gathered))
    cleanup()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_nodes_split_shards_by_node_then_worker(base_root, tmp_path) -> None:
    """The documented launch line, as two 'nodes' on this machine: every shard is read exactly once,
    rank r reading shards r, r+2, ... and its two loader workers sharing them without overlap."""
    script, out = tmp_path / "split.py", tmp_path / "split.json"
    script.write_text(_SPLIT_SCRIPT)
    base = list_shards(_layout(base_root).base_dir(DATASET))
    urls = [str(p) for p in base[:6]]  # 6 shards over 2 ranks x 2 workers
    endpoint = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launchers = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "split-test",
             str(script), json.dumps(urls), str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for _ in range(2)
    ]
    logs = [p.communicate(timeout=180)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], "\n".join(logs)

    gathered = json.loads(out.read_text())
    assert sorted(g["rank"] for g in gathered) == [0, 1] and {g["world"] for g in gathered} == {2}
    keys_of = {Path(u).name: read_stats(Path(u))["keys"] for u in urls}
    all_keys = [k for g in gathered for k in g["keys"]]
    assert sorted(all_keys) == sorted(k for ks in keys_of.values() for k in ks)  # each sample exactly once
    for g in gathered:
        expected = {k for name in [Path(u).name for u in urls[g["rank"]::2]] for k in keys_of[name]}
        assert set(g["keys"]) == expected

