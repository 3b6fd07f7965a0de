"""kill -9 proof: real commands killed with SIGKILL at random moments, then rerun until they finish.

Each test runs the command once uninterrupted (the reference), then, in a second folder, starts it, kills its
whole process group (the command and its workers) at a random moment, and again, KILLS times; a last rerun
finishes. The result must be the reference's: shards byte for byte, the same shard list and reconciled counts,
no temporary file left; for training, the same weights tensor by tensor. Kill moments are random (a fixed seed):
after a random number of shards or steps is done, plus a random fraction of a second, so they land mid-write.
Each test logs its kills and the progress each found.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.data.ingest import IngestConfig, run_ingest
from pipeline.core.paths import Layout
from pipeline.core.shards import list_shards
from pipeline.train import checkpoints

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
KILLS = 3
pytestmark = pytest.mark.slow


@dataclass
class KillReport:
    kills: int = 0  # attempts killed while running
    finished_first: int = 0  # attempts that ended before their kill moment
    progress: list[str] = field(default_factory=list)  # "done/total" when each kill landed

    def line(self, what: str) -> str:
        return (f"{what}: {self.kills} kills (at {', '.join(self.progress)} done), {self.finished_first} attempts "
                f"finished before their kill moment, {self.kills + self.finished_first + 1} runs in all, result identical")


def _env(cwd: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAT_")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", SHARDS_DIR=str(cwd / "shards"),
               MANIFESTS_DIR=str(cwd / "manifests"), RUNS_DIR=str(cwd / "runs"), MODELS_DIR=str(cwd / "models"))
    return {**env, **extra}


def _start(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    log_file = open(cwd / "command.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "pipeline", *argv], cwd=cwd, env=env, stdout=log_file,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _run_to_end(argv: list[str], cwd: Path, env: dict[str, str]) -> None:
    code = _start(argv, cwd, env).wait(timeout=300)
    assert code == 0, (cwd / "command.log").read_text()[-3000:]


def kill_and_finish(argv: list[str], cwd: Path, env: dict[str, str], seed: int, done: Callable[[], int],
                    total: int) -> KillReport:
    """Start the command and SIGKILL it at a random moment, KILLS times, then rerun it to the end.

    A kill moment is drawn in two steps, so that it lands mid-run however much a rerun had left to do: wait until
    `done()` (shards or steps finished) reaches a random count below `total`, then a further random 0-0.1 s.
    """
    rng = random.Random(seed)
    report = KillReport()
    for _ in range(KILLS):
        if done() + 1 >= total:
            break
        target = rng.randint(done() + 1, total - 1)
        proc = _start(argv, cwd, env)
        while proc.poll() is None and done() < target:
            time.sleep(0.02)
        try:
            proc.wait(timeout=rng.uniform(0.0, 0.1))
            report.finished_first += 1
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            report.kills += 1
            report.progress.append(f"{done()}/{total}")
    _run_to_end(argv, cwd, env)
    return report


def _tars(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in list_shards(folder)}


def _assert_same_outputs(reference: Path, rerun: Path, dataset: str, stage: str) -> None:
    ref_dir, out_dir = (root / "shards" / dataset / stage for root in (reference, rerun))
    assert _tars(out_dir) == _tars(ref_dir) and _tars(ref_dir)
    assert (out_dir / "sizes.json").read_text() == (ref_dir / "sizes.json").read_text()
    assert not list(out_dir.glob("*.tmp")), "a temporary file was left behind"
    ref_m, out_m = (json.loads((root / "manifests" / dataset / f"{stage}.json").read_text()) for root in (reference, rerun))
    assert out_m["counts"] == ref_m["counts"] and out_m["failed_shards"] == []
    assert out_m["counts"]["input"] == out_m["counts"]["written"] + out_m["counts"]["skipped"]
    assert out_m["shards"] == [{**s, "path": s["path"].replace(str(reference), str(rerun))} for s in ref_m["shards"]]


def _shards_done(folder: Path) -> Callable[[], int]:
    return lambda: len(list(folder.glob("*.stats.json")))


def test_ingest_killed_at_random_moments_finishes_identical(tmp_path):
    argv = ["ingest", "--dataset", "synth", "--synth-size", "300", "--shard-size", "20", "--workers", "2"]
    reference, rerun = tmp_path / "reference", tmp_path / "killed"
    reference.mkdir(), rerun.mkdir()
    _run_to_end(argv, reference, _env(reference, {}))
    report = kill_and_finish(argv, rerun, _env(rerun, {}), seed=1, done=_shards_done(rerun / "shards" / "synth" / "base"),
                             total=len(list_shards(reference / "shards" / "synth" / "base")))
    _assert_same_outputs(reference, rerun, "synth", "base")
    log.warning(report.line("ingest"))
    assert report.kills >= 2


def _augment_case(tmp_path: Path, executor: str, seed: int, extra_env: dict[str, str]) -> KillReport:
    argv = ["augment", "--dataset", "synth", "--stages", "randaug", "--workers", "2", "--executor", executor]
    reference, rerun = tmp_path / "reference", tmp_path / "killed"
    run_ingest(IngestConfig(dataset="synth", synth_size=96, shard_size=6),
               Layout(reference / "shards", reference / "manifests"))
    shutil.copytree(reference, rerun)
    _run_to_end(argv, reference, _env(reference, extra_env))
    report = kill_and_finish(argv, rerun, _env(rerun, extra_env), seed=seed,
                             done=_shards_done(rerun / "shards" / "synth" / "randaug"),
                             total=len(list_shards(reference / "shards" / "synth" / "randaug")))
    _assert_same_outputs(reference, rerun, "synth", "randaug")
    return report


def test_augmentation_killed_at_random_moments_finishes_identical(tmp_path):
    report = _augment_case(tmp_path, "local", seed=2, extra_env={})
    log.warning(report.line("augment (local executor)"))
    assert report.kills >= 2


def test_augmentation_on_ray_killed_at_random_moments_finishes_identical(tmp_path):
    if importlib.util.find_spec("ray") is None:
        if os.environ.get("CI"):
            pytest.fail("ray is not installed: pip install -e '.[ray]'")
        pytest.skip("ray is not installed")
    report = _augment_case(tmp_path, "ray", seed=3, extra_env={"RAY_DISABLE_DASHBOARD": "1"})
    log.warning(report.line("augment (ray executor)"))
    assert report.kills >= 1


def test_training_killed_at_random_moments_ends_with_the_same_weights(tiny_model_dirs, tmp_path):
    from pipeline.train.toy import write_toy_shards

    settings = {"MAT_CLIP": tiny_model_dirs["clip"], "MAT_MLM": tiny_model_dirs["mlm"], "MAT_STEPS": "12", "MAT_BATCH_SIZE": "8",
                "MAT_SAVE_EVERY": "2", "MAT_LOG_EVERY": "4", "MAT_PRECISION": "fp32", "MAT_DATA_WORKERS": "0",
                "MAT_SHUFFLE_BUFFER": "8", "MAT_LR": "0.001", "MAT_WARMUP": "2", "MAT_RUN_DIR": "runs/run"}
    argv = ["train", "--dataset", "toy", "--mode", "tecoa"]
    reference, rerun = tmp_path / "reference", tmp_path / "killed"
    for root in (reference, rerun):
        write_toy_shards(root / "shards", "toy", shards=2, per_shard=16)
    _run_to_end(argv, reference, _env(reference, settings))

    def steps_done() -> int:
        latest = checkpoints.latest_checkpoint(rerun / "runs" / "run")
        return int(latest.name.removeprefix(checkpoints.PREFIX)) if latest else 0

    report = kill_and_finish(argv, rerun, _env(rerun, settings), seed=4, done=steps_done, total=12)
    ref_w, out_w = (load_file(str(root / "runs" / "run" / "clip" / "model.safetensors")) for root in (reference, rerun))
    assert ref_w.keys() == out_w.keys()
    assert all(torch.equal(ref_w[name], out_w[name]) for name in ref_w)
    log.warning(report.line("train (tecoa, 12 steps, checkpoint every 2)"))
    assert report.kills >= 2
