"""logit_scale stays in [0, ln 100] through training, as CLIP and open_clip clamp it after every optimiser step."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.models.hf import load_clip
from pipeline.core.paths import Layout
from pipeline.train.config import DataConfig, OptimConfig, TrainConfig
from pipeline.train.loop import LOGIT_SCALE_MAX, clamp_logit_scale
from pipeline.train.main import train
from pipeline.train.modes import DualEncoder
from pipeline.train.toy import write_toy_shards


@pytest.fixture()
def layout(tmp_path):
    write_toy_shards(tmp_path / "shards", "toy", shards=1, per_shard=16)
    return Layout(shards_dir=tmp_path / "shards", runs_dir=tmp_path / "runs", models_dir=tmp_path / "models",
                  manifests_dir=tmp_path / "manifests")


def _train(clip_dir: str, layout: Layout, lr: float) -> float:
    cfg = TrainConfig(mode="ft", dataset="toy", clip=clip_dir, steps=2, batch_size=8, log_every=1, save_every=2,
                      precision="fp32", optim=OptimConfig(lr=lr, warmup=0),
                      data=DataConfig(num_workers=0, shuffle_buffer=8))
    return float(load_clip(train(cfg, layout).model_dir).model.logit_scale.detach())


def test_a_huge_learning_rate_ends_at_a_bound(tiny_model_dirs, layout):
    # Adam moves the scale by about lr per step whatever its gradient: 2.66 +- 20 unless clamped.
    scale = _train(tiny_model_dirs["clip"], layout, lr=10.0)
    assert min(abs(scale), abs(scale - LOGIT_SCALE_MAX)) < 1e-6


def test_a_scale_above_ln100_is_brought_down(tiny_model_dirs, layout, tmp_path):
    clip = load_clip(tiny_model_dirs["clip"])
    with torch.no_grad():
        clip.model.logit_scale.fill_(6.0)
    clip.save(tmp_path / "hot")
    assert _train(str(tmp_path / "hot"), layout, lr=1e-4) <= math.log(100) + 1e-6


def test_clamp_reaches_the_scale_inside_wrappers(tiny_model_dirs):
    clip = load_clip(tiny_model_dirs["clip"])
    wrapped = torch.nn.ModuleDict({"module": DualEncoder(clip)})  # names like DDP's: module.model.logit_scale
    with torch.no_grad():
        clip.model.logit_scale.fill_(-1.0)
    clamp_logit_scale(wrapped)
    assert float(clip.model.logit_scale.detach()) == 0.0
