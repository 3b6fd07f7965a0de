"""Shared fixtures. Tiny models are built from configs, saved with save_pretrained and loaded back (offline).

Under CI (CI set to anything but 0/false/no), a test skipped because data or a dependency that CI installs is
missing (the coco-mini fixture at ../shared/data/coco-mini, WordNet, Ray) fails instead: there, a skip would
hide that the test never ran.
"""

from __future__ import annotations

import itertools
import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Skip reasons that name what CI must have (test files say "coco-mini", "wordnet", "textblob", "ray is not installed").
MUST_EXIST_IN_CI = re.compile(r"coco-mini|wordnet|textblob|ray is not installed", re.IGNORECASE)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and in_ci()):
        return
    reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
    if MUST_EXIST_IN_CI.search(reason):
        report.outcome = "failed"
        report.longrepr = f"CI is set and this test was skipped ({reason}): CI must provide it"

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
    from pipeline.models.hf import build_clip, build_mlm, train_tokenizers

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_models")
    clip_tok, bert_tok = train_tokenizers(tiny_captions, vocab_size=300)
    clip = build_clip("tiny", clip_tok)
    mlm = build_mlm("tiny", bert_tok)
    return {"clip": str(clip.save(root / "clip")), "mlm": str(mlm.save(root / "mlm"))}


@pytest.fixture(scope="session")
def tiny_clip(tiny_model_dirs):
    from pipeline.models.hf import load_clip

    return load_clip(tiny_model_dirs["clip"])


@pytest.fixture(scope="session")
def tiny_mlm(tiny_model_dirs):
    from pipeline.models.hf import load_mlm

    return load_mlm(tiny_model_dirs["mlm"])


@pytest.fixture()
def tiny_images(tiny_clip) -> torch.Tensor:
    """Four random [0, 1] images at the tiny CLIP's resolution."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, tiny_clip.image_size, tiny_clip.image_size, generator=g)


# Tiny models of the other families (open_clip, BLIP), built from their configs: shared by the family tests.
TINY_OPEN_CLIP = {"embed_dim": 32,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
                  "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}


def tiny_blip(bert_tok):
    from transformers import BlipConfig

    from pipeline.models.blip import build_blip

    # BERT's init (std 0.02; the vision tower's 1e-10) makes a random BLIP's CLS embeddings nearly constant
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  initializer_range=0.5)
    text = dict(layers, vocab_size=len(bert_tok), max_position_embeddings=64, pad_token_id=bert_tok.pad_token_id,
                bos_token_id=bert_tok.cls_token_id, sep_token_id=bert_tok.sep_token_id)
    config = BlipConfig(text_config=text, vision_config=dict(layers, image_size=32, patch_size=8),
                        image_text_hidden_size=32)
    bert_tok.model_max_length = 64
    return build_blip(config, bert_tok)


@pytest.fixture(scope="session")
def tiny_family_dirs(tmp_path_factory, tiny_model_dirs) -> dict[str, str]:
    """{family: saved model dir} for "clip" (the suite's tiny CLIP), "open_clip" and "blip", plus "mlm"."""
    pytest.importorskip("open_clip", reason="the 'families' extra (open_clip_torch) is not installed")
    from transformers import AutoTokenizer

    from pipeline.models.openclip import build_open_clip

    root = tmp_path_factory.mktemp("families")
    torch.manual_seed(0)
    oc = build_open_clip(TINY_OPEN_CLIP, name="tiny-test-oc")
    blip = tiny_blip(AutoTokenizer.from_pretrained(tiny_model_dirs["mlm"]))
    return {"clip": tiny_model_dirs["clip"], "mlm": tiny_model_dirs["mlm"],
            "open_clip": str(oc.save(root / "open_clip")), "blip": str(blip.save(root / "blip"))}


def tiny_study(root, tiny_model_dirs: dict[str, str], monkeypatch, **settings):
    """A tiny study (pretrained, FT, TeCoA; 2 steps, 8 test images, PGD) on toy shards in ``root`` with relative
    folders, as make gives them, so the paths recorded in two runs' results are the same; ``settings``: more
    StudyConfig fields (the executor's). Returns ``root``."""
    from pathlib import Path

    from pipeline.core.paths import Layout
    from pipeline.study.plan import StudyConfig
    from pipeline.study.run import run_study
    from pipeline.train.toy import write_toy_shards

    layout = Layout(Path("shards"), Path("manifests"), Path("runs"), Path("models"))
    root.mkdir()
    monkeypatch.chdir(root)
    write_toy_shards(layout.shards_dir, "toy", shards=1, per_shard=16)
    write_toy_shards(layout.shards_dir, "toy", shards=1, per_shard=8, split="test", seed=1)
    cfg = StudyConfig(dataset="toy", clip=tiny_model_dirs["clip"], mlm=tiny_model_dirs["mlm"], modes=("ft", "tecoa"),
                      steps=2, batch_size=8, precision="fp32", eval_size=8, eval_batch=8, eval_steps=2,
                      attacks=("pgd",), augmentation=False, resamples=50, data_workers=0, device="cpu", **settings)
    run_study(cfg, layout)
    return root
