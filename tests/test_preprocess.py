"""One preprocessing for training, evaluation and scoring (CLIP's), and the optional training random resized crop."""

from __future__ import annotations

import io
import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from pipeline.curate.pairs import base_shard_urls
from pipeline.evaluation.evaluate import load_test_set
from pipeline.core.images import RRC_RATIO, RRC_SCALE, _rrc_box, decode_rgb, encode_jpeg, model_pixels, prepare_image
from pipeline.core.shards import read_tar, sample_key, shard_name, write_tar
from pipeline.train import data

WIDTH, HEIGHT = 70, 56  # non-square (within RandomResizedCrop's aspect range): squash != centre crop


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def wide_shard(tmp_path_factory):
    """One base shard with one wide image (a left-to-right gradient over noise), as ingest writes it."""
    base = tmp_path_factory.mktemp("wide") / "base"
    image = np.asarray(_noise_image(WIDTH, HEIGHT), dtype=np.float32) * 0.5
    image[..., 0] += np.linspace(0, 127, WIDTH)[None, :]
    jpeg = encode_jpeg(Image.fromarray(image.astype(np.uint8)))
    key = sample_key("train", 0, 0)
    meta = {"key": key, "image_id": key, "captions": ["a wide picture"], "primary": 0, "split": "train"}
    write_tar(base / shard_name("train", 0), [{"__key__": key, "jpg": jpeg, "txt": "a wide picture", "json": meta}])
    return base


def _train_pixels(base, size: int, augment: str = "none", seed: int = 0) -> torch.Tensor:
    urls = base_shard_urls(base, "train")
    pipeline = data.build_pipeline(urls, batch_size=1, image_size=size, shuffle_buffer=0, resampled=False,
                                   seed=seed, augment=augment)
    return next(iter(pipeline))["images"][0]


@pytest.mark.parametrize("size", [(100, 50), (37, 81), (65, 63), (32, 32)])
def test_model_pixels_is_openai_clips_resize_and_centre_crop(size):
    """Bit-exact with the torchvision transform OpenAI CLIP and open_clip apply to PIL images at eval time."""
    image = _noise_image(*size)
    reference = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                           T.PILToTensor()])(image)
    assert torch.equal(model_pixels(image, 32), reference)


def test_training_sees_a_non_square_image_as_evaluation_does(wide_shard, tiny_clip):
    size = tiny_clip.image_size
    train = _train_pixels(wide_shard, size)
    evaluation = load_test_set(wide_shard, "train", tiny_clip).images[0]
    assert train.shape == evaluation.shape == (3, size, size)
    assert torch.equal(train, evaluation)
    # ... and it is a centre crop, not the squash of the whole image to a square
    (sample,) = read_tar(wide_shard / shard_name("train", 0))
    squash = decode_rgb(sample["jpg"]).resize((size, size), Image.Resampling.BICUBIC)
    assert not torch.equal(train, torch.from_numpy(np.array(squash)).permute(2, 0, 1).float() / 255)


def test_random_resized_crop_is_an_option_that_changes_the_pixels(wide_shard, tiny_clip):
    size = tiny_clip.image_size
    plain = _train_pixels(wide_shard, size)
    crops = [_train_pixels(wide_shard, size, augment="rrc", seed=seed) for seed in (0, 0, 1)]
    assert crops[0].shape == plain.shape and 0 <= float(crops[0].min()) and float(crops[0].max()) <= 1
    assert not torch.equal(crops[0], plain)
    assert torch.equal(crops[0], crops[1]) and not torch.equal(crops[0], crops[2])  # seeded


def test_random_resized_crop_boxes_follow_open_clips_scale_and_ratio():
    rng = random.Random(0)
    for width, height in itertools.product((224, 300, 90), (224, 45, 500)):
        for _ in range(50):
            left, top, w, h = _rrc_box(width, height, rng, RRC_SCALE, RRC_RATIO)
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
            if RRC_RATIO[0] <= width / height <= RRC_RATIO[1]:  # otherwise the fallback crop applies
                assert RRC_SCALE[0] - 0.02 <= w * h / (width * height) <= RRC_SCALE[1]
                assert RRC_RATIO[0] - 0.02 <= w / h <= RRC_RATIO[1] + 0.02
            else:
                assert RRC_RATIO[0] - 0.02 <= w / h <= RRC_RATIO[1] + 0.02


COCO_PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini" / "val2017" / "000000000139.jpg"


@pytest.mark.skipif(not COCO_PHOTO.exists(), reason="needs ../shared/data/coco-mini")
def test_a_16_bit_greyscale_png_is_scaled_not_clipped_to_white():
    """A real photo as a 16-bit greyscale PNG (value * 257, as 16-bit scanners and medical images store it)."""
    grey = np.asarray(Image.open(COCO_PHOTO).convert("L"))
    buffer = io.BytesIO()
    Image.fromarray(grey.astype(np.uint16) * 257).save(buffer, format="PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "I;16"
    for decoded in (decode_rgb(prepare_image(buffer.getvalue()).jpeg), decode_rgb(buffer.getvalue())):
        pixels = np.asarray(decoded.convert("L"), dtype=np.float64)
        assert (pixels >= 250).mean() < 0.05  # clipped, 99.6 % of them were
        assert np.abs(pixels - grey).mean() < 2  # the photo itself, up to JPEG's loss
