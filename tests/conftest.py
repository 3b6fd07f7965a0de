"""Shared fixtures. Tiny models are built from configs, saved with save_pretrained and loaded back (offline)."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]
_SHAPES = ["circle", "square", "triangle", "star"]
_BACKGROUNDS = ["striped", "checkered", "noisy", "plain"]


@pytest.fixture(scope="session")
def tiny_captions() -> list[str]:
    """A small closed-vocabulary caption set (one word = one token after train_tokenizers)."""
    return [
        f"a {c} {s} on a {b} background" if i % 2 else f"the {s} is {c} with a {b} pattern"
        for i, (c, s, b) in enumerate(itertools.product(_COLOURS, _SHAPES, _BACKGROUNDS))
    ]


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_captions) -> dict[str, str]:
    """{"clip": dir, "mlm": dir} of tiny random-init models saved with save_pretrained."""
    from pipeline.models import build_clip, build_mlm, train_tokenizers

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_models")
    clip_tok, bert_tok = train_tokenizers(tiny_captions, vocab_size=300)
    clip = build_clip("tiny", clip_tok)
    mlm = build_mlm("tiny", bert_tok)
    return {"clip": str(clip.save(root / "clip")), "mlm": str(mlm.save(root / "mlm"))}


@pytest.fixture(scope="session")
def tiny_clip(tiny_model_dirs):
    from pipeline.models import load_clip

    return load_clip(tiny_model_dirs["clip"])


@pytest.fixture(scope="session")
def tiny_mlm(tiny_model_dirs):
    from pipeline.models import load_mlm

    return load_mlm(tiny_model_dirs["mlm"])


@pytest.fixture()
def tiny_images(tiny_clip) -> torch.Tensor:
    """Four random [0, 1] images at the tiny CLIP's resolution."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, tiny_clip.image_size, tiny_clip.image_size, generator=g)
