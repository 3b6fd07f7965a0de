"""Experiment tracking: TensorBoard and W&B (offline) receive the run's scalars and resolved config."""

from __future__ import annotations

import importlib.util

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.core.paths import Layout
from pipeline.core.tracking import Tracker, check_reporters, parse_report_to
from pipeline.train.config import DataConfig, OptimConfig, TrainConfig
from pipeline.train.main import train
from pipeline.train.toy import write_toy_shards


@pytest.mark.parametrize("spec, expected", [
    ("tensorboard", ("tensorboard",)), ("tensorboard,wandb", ("tensorboard", "wandb")), (" WandB , wandb", ("wandb",)),
    ("none", ()), ("", ()), (None, ()), (["wandb"], ("wandb",)),
])
def test_report_to_is_parsed(spec, expected):
    assert parse_report_to(spec) == expected


def test_unknown_tracker_and_mode_are_named():
    with pytest.raises(ValueError, match="mlflow"):
        parse_report_to("tensorboard,mlflow")
    with pytest.raises(ValueError, match="wandb_mode='cloud'"):
        check_reporters(("wandb",), "cloud")


def test_missing_wandb_is_a_clear_error_before_training(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match="pip install wandb"):
        TrainConfig(mode="ft", report_to=("wandb",))


def test_disabled_tracker_writes_nothing(tmp_path):
    tracker = Tracker(tmp_path, ("tensorboard", "wandb"), {"a": 1}, name="x", enabled=False)
    tracker.log(0, {"loss": 1.0}, prefix="train")
    tracker.close()
    assert not any(tmp_path.iterdir())


def test_training_run_reports_to_tensorboard_and_offline_wandb(tiny_model_dirs, tmp_path):
    write_toy_shards(tmp_path / "shards", "toy", shards=2, per_shard=16)
    layout = Layout(shards_dir=tmp_path / "shards", runs_dir=tmp_path / "runs", models_dir=tmp_path / "models",
                    manifests_dir=tmp_path / "manifests")
    cfg = TrainConfig(mode="ft", dataset="toy", clip=tiny_model_dirs["clip"], steps=3, batch_size=8, log_every=1,
                      save_every=3, precision="fp32", report_to=("tensorboard", "wandb"),
                      optim=OptimConfig(lr=1e-3, warmup=1), data=DataConfig(num_workers=0, shuffle_buffer=8))
    run_dir = train(cfg, layout).run_dir

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert "config" in "".join(events.Tags()["tensors"])

    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1, "one offline W&B run, no network needed"
    # wandb-core writes one protobuf log per run and ships no reader for it: its records hold the config and
    # history as JSON strings, so look for them in the bytes.
    (log_file,) = wandb_runs[0].glob("run-*.wandb")
    raw = log_file.read_bytes()
    for needle in (b"train/loss", b"train/lr", b"shuffle_buffer", b"report_to", b'"ft"'):
        assert needle in raw, needle


def test_evaluation_metrics_go_to_tensorboard_and_clean_removes_them(tiny_model_dirs, tmp_path):
    from pipeline.commands.clean import clean
    from pipeline.evaluation.evaluate import EvalConfig, evaluate
    from pipeline.data.ingest import IngestConfig, run_ingest
    from pipeline.core.executor import RunOptions

    layout = Layout(shards_dir=tmp_path / "shards", manifests_dir=tmp_path / "manifests", runs_dir=tmp_path / "runs",
                    models_dir=tmp_path / "models")
    run_ingest(IngestConfig(dataset="synth", synth_size=60, shard_size=1000), layout, RunOptions(workers=1))
    record = evaluate(EvalConfig(checkpoint=tiny_model_dirs["clip"], name="tracked", attacks=("pgd",), size=6,
                                 steps=1, device="cpu"), layout)
    log_dir = layout.dataset_manifests("synth") / "evals" / "tracking" / "tracked" / "tensorboard"
    events = EventAccumulator(str(log_dir)).Reload()
    for attack in ("clean", "pgd"):
        (scalar,) = events.Scalars(f"eval/{attack}/tr_r1")
        assert scalar.value == pytest.approx(record["metrics"][attack]["tr_r1"])
    assert events.Scalars("eval/pgd/ir_asr")[0].value == pytest.approx(record["metrics"]["pgd"]["ir_asr"])

    clean(layout, "synth")
    assert not (layout.dataset_manifests("synth") / "evals").exists()
