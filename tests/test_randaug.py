"""RandAugment stage: distinct, deterministic image variants; bad images; resume of an interrupted run."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.images import encode_jpeg
from pipeline.data.ingest import IngestConfig, run_ingest
from pipeline.core.paths import Layout
from pipeline.core.shards import list_shards, stats_path
from pipeline.augment.stage import BaseSample, StageContext, run_stage
from stages.randaug import RandAugmentStage


def _jpeg(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise: every RandAugment operation visibly changes such an image.
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width, 1), y * 255 / max(height, 1), (x + y) % 256], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return encode_jpeg(Image.fromarray(pixels))


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def _stage(**kw) -> RandAugmentStage:
    return RandAugmentStage(RandAugmentStage.Config(**kw), StageContext(dataset="test", seed=0))


def test_variants_differ_from_the_original_and_each_other() -> None:
    samples = [BaseSample(f"k{i}", _jpeg(96, 64, i), ["a caption"], {}) for i in range(6)]
    results = _stage(variants_per_image=3).augment_batch(samples)
    for sample, result in zip(samples, results):
        assert len(result.variants) + len(result.skipped) == 3
        original = _pixels(sample.image_bytes)
        arrays = [_pixels(v.image_jpeg) for v in result.variants]
        for a in arrays:
            assert a.shape == original.shape  # RandAugment keeps the size
            assert np.abs(a - original).mean() > 1.0  # more than JPEG re-encoding noise
        for i in range(len(arrays)):
            for j in range(i + 1, len(arrays)):
                assert np.abs(arrays[i] - arrays[j]).mean() > 1.0
        assert all(v.caption_index is None and v.op == "randaug" for v in result.variants)
    assert sum(len(r.variants) for r in results) >= 15


def test_same_seed_same_bytes_and_caller_rng_untouched() -> None:
    sample = BaseSample("k0", _jpeg(64, 64), ["x"], {})
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = _stage().augment_batch([sample])[0]
    assert torch.equal(torch.rand(1), expected_next)
    for v in first.variants:  # the recorded seed reproduces the variant
        redo = _stage().augment_image(sample.image(), v.seed)
        assert encode_jpeg(redo) == v.image_jpeg  # the stage forked the RNG instead of reseeding it
    second = _stage().augment_batch([sample])[0]
    assert [(v.seed, v.image_jpeg) for v in first.variants] == [(v.seed, v.image_jpeg) for v in second.variants]
    other = _stage().augment_batch([BaseSample("k1", sample.image_bytes, ["x"], {})])[0]
    assert {v.seed for v in other.variants}.isdisjoint({v.seed for v in first.variants})
    assert [v.image_jpeg for v in other.variants] != [v.image_jpeg for v in first.variants]


def test_jpeg_quality_is_applied() -> None:
    sample = BaseSample("k0", _jpeg(128, 128), ["x"], {})
    high = _stage(jpeg_quality=95).augment_batch([sample])[0].variants[0].image_jpeg
    low = _stage(jpeg_quality=30).augment_batch([sample])[0].variants[0].image_jpeg
    assert Image.open(io.BytesIO(high)).format == "JPEG" and len(low) < len(high)


def test_tiny_flat_large_and_broken_images() -> None:
    stage = _stage(variants_per_image=4)
    flat = encode_jpeg(Image.new("RGB", (8, 8), (128, 128, 128)))
    samples = [BaseSample("tiny", _jpeg(1, 1), ["x"], {}), BaseSample("flat", flat, ["x"], {}),
               BaseSample("large", _jpeg(2400, 1600), ["x"], {}), BaseSample("broken", b"not an image", ["x"], {})]
    tiny, flat_result, large, broken = stage.augment_batch(samples)
    for sample, result in zip(samples, (tiny, flat_result, large, broken)):
        assert len(result.variants) + len(result.skipped) == 4
        for v in result.variants:  # a variant is never a copy of the original
            assert _pixels(v.image_jpeg).shape == _pixels(sample.image_bytes).shape
            assert stage.augment_image(sample.image(), v.seed).tobytes() != sample.image().tobytes()
    assert all(s["reason"].startswith("unchanged pixels") for s in tiny.skipped + flat_result.skipped)
    assert len(large.variants) == 4  # unchanged draws of a textured image are redrawn, not skipped
    assert not broken.variants and all("cannot decode" in s["reason"] for s in broken.skipped)


def test_unchanged_draw_is_redrawn_with_a_recorded_seed() -> None:
    # Find a key whose first draw for variant 0 changes nothing, then check the stage redrew it.
    stage, image = _stage(variants_per_image=1), _jpeg(48, 48)
    sample = BaseSample("k", image, ["x"], {})
    original = sample.image().tobytes()
    for i in range(400):
        key = f"k{i}"
        if stage.augment_image(sample.image(), stage.seed_for(key, 0)).tobytes() == original:
            break
    else:
        pytest.skip("no identity draw among 400 keys")
    result = stage.augment_batch([BaseSample(key, image, ["x"], {})])[0]
    assert len(result.variants) == 1 and result.variants[0].extra["draw"] >= 1
    assert result.variants[0].seed != stage.seed_for(key, 0)
    once = _stage(variants_per_image=1, max_draws=1).augment_batch([BaseSample(key, image, ["x"], {})])[0]
    assert not once.variants and once.skipped[0]["reason"].startswith("unchanged pixels")


@pytest.mark.parametrize("kwargs", [{"magnitude": 31}, {"magnitude": -1}, {"num_ops": 0}, {"max_draws": 0},
                                    {"variants_per_image": 0}, {"jpeg_quality": 101}])
def test_config_rejects_bad_values(kwargs) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RandAugmentStage.Config(**kwargs)


def test_resume_after_interruption_gives_identical_bytes(tmp_path) -> None:
    layout = Layout(tmp_path / "shards", tmp_path / "manifests")
    run_ingest(IngestConfig(dataset="synth", synth_size=12, shard_size=4), layout)
    config, context = RandAugmentStage.Config(), StageContext("synth")
    run_stage(RandAugmentStage, config, context, layout)
    out_dir = layout.stage_dir("synth", "randaug")
    uninterrupted = {p.name: p.read_bytes() for p in list_shards(out_dir)}
    assert len(uninterrupted) == 3
    # Interrupt: shard 1 half-written without its stats file, shard 2 never started.
    shards = list_shards(out_dir)
    shards[1].write_bytes(uninterrupted[shards[1].name][:1000])
    stats_path(shards[1]).unlink()
    shards[2].unlink()
    stats_path(shards[2]).unlink()
    manifest = run_stage(RandAugmentStage, config, context, layout)
    assert {p.name: p.read_bytes() for p in list_shards(out_dir)} == uninterrupted
    assert manifest["stats"]["variants"] + manifest["stats"]["variant_skips"] == 2 * 12
