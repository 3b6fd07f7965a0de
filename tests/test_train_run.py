"""End to end `train()` on toy shards: run folder contents, a loadable final model, and resume."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest

from pipeline.models.hf import load_clip
from pipeline.core.paths import Layout
from pipeline.core.config import load_config
from pipeline.train.config import DataConfig, OptimConfig, TrainConfig, resolve_stages
from pipeline.train.main import train
from pipeline.train.toy import write_toy_shards


@pytest.fixture()
def layout(tmp_path):
    write_toy_shards(tmp_path / "shards", "toy", shards=2, per_shard=16, text_stage="i2t-human")
    return Layout(shards_dir=tmp_path / "shards", runs_dir=tmp_path / "runs", models_dir=tmp_path / "models",
                  manifests_dir=tmp_path / "manifests")


def _cfg(tiny_model_dirs, **changes) -> TrainConfig:
    base = TrainConfig(mode="ft", dataset="toy", clip=tiny_model_dirs["clip"], mlm=tiny_model_dirs["mlm"], steps=4,
                       batch_size=8, log_every=1, save_every=2, precision="fp32",
                       optim=OptimConfig(lr=1e-3, warmup=2), data=DataConfig(num_workers=0, shuffle_buffer=8))
    return dataclasses.replace(base, **changes)


def _rows(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_run_folder_and_final_model(tiny_model_dirs, layout):
    cfg = _cfg(tiny_model_dirs, mode="matplus", accum_steps=2)
    result = train(cfg, layout)
    run = result.run_dir
    assert run.parent == layout.runs_dir and run.name.startswith("matplus-toy-")
    config = json.loads((run / "config.json").read_text())
    assert config["mode"] == "matplus" and config["data"]["stages"] == ["i2t-human"]  # the resolved default
    assert config["resolved"]["precision_resolved"] == "fp32" and config["resolved"]["world_size"] == 1
    # the saved file replays as is: the run's settings, its stages resolved
    assert load_config(TrainConfig, run / "config.json") == resolve_stages(cfg)
    rows = _rows(run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert {"loss", "contrastive", "lr", "samples_per_s", "text_attack_s", "image_attack_s"} <= set(rows[0])
    assert any((run / "tensorboard").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [".mat-pipeline", "step-000002", "step-000004"]
    assert load_clip(result.model_dir).image_size == 32


def test_resume_continues_where_it_stopped(tiny_model_dirs, layout, tmp_path):
    run_dir = tmp_path / "runs" / "resumable"
    first = train(_cfg(tiny_model_dirs, run_dir=str(run_dir)), layout)
    assert first.start_step == 0
    second = train(_cfg(tiny_model_dirs, run_dir=str(run_dir), steps=6), layout)
    assert second.start_step == 4
    rows = _rows(run_dir)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    # The schedule continued (a cosine over 6 steps at step 5), rather than restarting its warm-up.
    fresh = train(_cfg(tiny_model_dirs, run_dir=str(tmp_path / "fresh"), steps=6), layout)
    assert float(rows[4]["lr"]) == pytest.approx(fresh.history[4]["lr"])
    assert float(rows[4]["lr"]) != pytest.approx(first.history[0]["lr"])


def test_pretrain_saves_loadable_models(layout):
    from pipeline.models.hf import load_mlm
    from pipeline.train.config import PretrainConfig
    from pipeline.train.pretrain import pretrain

    cfg = PretrainConfig(dataset="toy", clip_preset="tiny", mlm_preset="tiny", vocab_size=200, steps=3,
                         batch_size=8, warmup=1, mlm_steps=3, mlm_batch_size=8, num_workers=0)
    out = pretrain(cfg, layout)
    assert out["clip"] == str(layout.model_dir("toy", "clip"))
    clip, mlm = load_clip(out["clip"]), load_mlm(out["mlm"])
    assert clip.image_size == 32 and mlm.tokenizer.tokenize("a green picture") == ["a", "green", "picture"]
    assert not (layout.runs_dir / out["run_dir"] / "init").exists()
    assert load_config(PretrainConfig, layout.runs_dir / out["run_dir"] / "pretrain.json") == cfg


def test_a_dataset_without_shards_is_named_before_any_model_or_run_folder(tiny_model_dirs, layout):
    """`train --dataset nosuch`: "model '.../models/nosuch/clip' not found" before, and a run folder left behind."""
    from pipeline.train.config import PretrainConfig
    from pipeline.train.pretrain import pretrain

    message = (r"^dataset 'nosuch' has no shards \(no train-\*\.tar in .*/shards/nosuch/base; datasets with shards "
               r"there: toy\): make them with `make ingest DATASET=nosuch DATA_ROOT=<its folder or annotation file>`$")
    with pytest.raises(FileNotFoundError, match=message):
        train(_cfg(tiny_model_dirs, dataset="nosuch", clip=None, mlm=None), layout)
    with pytest.raises(FileNotFoundError, match=message):
        pretrain(PretrainConfig(dataset="nosuch"), layout)
    with pytest.raises(FileNotFoundError, match=r"^dataset 'toy' has no val shards in .*; its splits: train$"):
        train(_cfg(tiny_model_dirs, data=DataConfig(split="val", num_workers=0)), layout)
    assert not layout.runs_dir.exists()


def test_a_missing_default_model_names_make_pretrain_before_any_run_folder(tiny_model_dirs, layout):
    from pipeline.models.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match=r"^no CLIP for dataset 'toy' at .*/models/toy/clip, where `make "
                                                 r"pretrain DATASET=toy` saves one: run it, or name a model with CLIP="):
        train(_cfg(tiny_model_dirs, clip=None), layout)
    with pytest.raises(ModelNotFoundError, match=r"^no masked LM for dataset 'toy' .*MLM="):
        train(_cfg(tiny_model_dirs, mode="mat", mlm=None), layout)
    with pytest.raises(ModelNotFoundError, match=r"^model '.*/runs/nope/clip' not found: no such folder"):
        train(_cfg(tiny_model_dirs, clip=str(layout.runs_dir / "nope" / "clip")), layout)
    assert not layout.runs_dir.exists()
