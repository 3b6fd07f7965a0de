"""t2i-sd on a tiny random Stable Diffusion pipeline saved with save_pretrained (diffusers' dummy-components shape)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.models.errors import ModelNotFoundError
from pipeline.augment.stage import BaseSample, StageContext
from pipeline.augment.tiny_models import build_tiny_sd
from stages.t2i_sd import StableDiffusionConfig, StableDiffusionStage

CAPTIONS = ["a red dog on the grass", "two people riding a bike", "a blue car in the street", "a cat on a table"]


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_sd")
    return {
        "checked": str(build_tiny_sd(root / "sd")),
        "flagging": str(build_tiny_sd(root / "sd-flag", flag_everything=True)),
    }


def samples(n: int) -> list[BaseSample]:
    return [BaseSample(key=f"val_000000_{i:06d}", image_bytes=b"", captions=[CAPTIONS[i % 4], CAPTIONS[(i + 1) % 4]],
                       meta={"primary": i % 2}) for i in range(n)]


def make_stage(model: str, **overrides) -> StableDiffusionStage:
    settings = dict(model=model, steps=3, height=32, width=32, batch_size=8, guidance_scale=5.0)
    stage = StableDiffusionStage(StableDiffusionConfig(**{**settings, **overrides}), StageContext("synth", seed=1))
    stage.setup()
    return stage


def pixels(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.int16)


def test_same_seeds_same_bytes(sd_dirs):
    batch = samples(3)
    first = make_stage(sd_dirs["checked"], images_per_caption=2).augment_batch(batch)
    second = make_stage(sd_dirs["checked"], images_per_caption=2).augment_batch(batch)
    assert [[v.image_jpeg for v in r.variants] for r in first] == [[v.image_jpeg for v in r.variants] for r in second]
    images = [v.image_jpeg for r in first for v in r.variants]
    assert len(images) == 6 and len(set(images)) == 6  # a different seed per image
    assert first[0].variants[0].image_jpeg[:2] == b"\xff\xd8"  # JPEG


def test_batch_of_n_equals_n_single_calls(sd_dirs):
    stage = make_stage(sd_dirs["checked"], batch_size=4)
    batch = samples(4)
    batched = [pixels(r.variants[0].image_jpeg) for r in stage.augment_batch(batch)]
    singles = [pixels(stage.augment_batch([s])[0].variants[0].image_jpeg) for s in batch]
    for a, b in zip(batched, singles):  # same generator per image; float noise of batched matmuls only, which
        diff = np.abs(a - b)  # JPEG encoding can spread over a block (max 4 seen once, on a loaded CI machine)
        assert diff.max() <= 8 and (diff > 2).mean() < 0.01
    assert np.abs(batched[0] - batched[1]).max() > 8


def test_captions_seeds_and_flags_recorded(sd_dirs):
    stage = make_stage(sd_dirs["checked"], captions="all", images_per_caption=2)
    batch = samples(2)
    results = stage.augment_batch(batch)
    for sample, result in zip(batch, results):
        assert [v.caption_index for v in result.variants] == [0, 0, 1, 1]
        assert [v.extra["variant"] for v in result.variants] == [0, 1, 2, 3]
        assert [v.seed for v in result.variants] == [stage.seed_for(sample.key, v) for v in range(4)]
        assert all(v.extra["nsfw"] is False for v in result.variants) and result.skipped == []
    primary_only = make_stage(sd_dirs["checked"]).augment_batch(batch)
    assert [r.variants[0].caption_index for r in primary_only] == [0, 1]  # meta["primary"]


def test_flagged_images_are_skipped_not_emitted(sd_dirs):
    results = make_stage(sd_dirs["flagging"], images_per_caption=2).augment_batch(samples(2))
    assert all(r.variants == [] for r in results)
    assert [[(s["variant"], s["reason"]) for s in r.skipped] for r in results] == [[(0, "nsfw"), (1, "nsfw")]] * 2
    assert results[1].skipped[0]["caption_index"] == 1


def test_without_safety_checker_flag_is_none(sd_dirs):
    (result,) = make_stage(sd_dirs["flagging"], safety_checker=False).augment_batch(samples(1))
    assert result.variants[0].extra["nsfw"] is None


@pytest.mark.parametrize("scheduler", ["ddim", "euler-a"])
def test_scheduler_is_configurable(sd_dirs, scheduler):
    stage = make_stage(sd_dirs["checked"], scheduler=scheduler)
    assert type(stage.pipe.scheduler).__name__ in ("DDIMScheduler", "EulerAncestralDiscreteScheduler")
    default = make_stage(sd_dirs["checked"]).augment_batch(samples(1))[0].variants[0]
    other = stage.augment_batch(samples(1))[0].variants[0]
    assert other.op == f"sd-{scheduler}" and other.image_jpeg != default.image_jpeg
    assert stage.describe()["generation"]["scheduler"] == scheduler


def test_missing_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    missing = str(tmp_path / "no-sd-here")
    ok, why = StableDiffusionStage.availability(StableDiffusionConfig(model=missing))
    assert not ok and missing in why and "T2I_MODEL" in why
    with pytest.raises(ModelNotFoundError, match="no-sd-here"):
        make_stage(missing)
    (tmp_path / "empty").mkdir()
    ok, why = StableDiffusionStage.availability(StableDiffusionConfig(model=str(tmp_path / "empty")))
    assert not ok and "model_index.json" in why
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ok, why = StableDiffusionStage.availability(StableDiffusionConfig(model="some-org/not-cached-sd"))
    assert not ok and "HF_HUB_OFFLINE=1" in why


@pytest.mark.parametrize("bad", [{"scheduler": "lms2"}, {"steps": 0}, {"height": 30}, {"captions": "random"},
                                 {"jpeg_quality": 0}, {"dtype": "int8"}])
def test_config_rejects_bad_values(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        StableDiffusionConfig(**bad)
