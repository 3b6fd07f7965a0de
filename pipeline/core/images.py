"""Decode, validate and normalise images to the JPEG bytes the shards hold; turn them into model pixels.

:func:`model_pixels` is the one preprocessing of training, evaluation and scoring, CLIP's (openai/CLIP
``clip/clip.py`` ``_transform``, open_clip ``src/open_clip/transform.py`` ``image_transform`` for eval, and
``CLIPImageProcessor``): shorter side resized to the model's size with PIL bicubic (which antialiases), then a
centre crop. :func:`random_resized_crop_pixels` is the optional training-time augmentation (open_clip's train
transform: ``RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=BICUBIC)``).
"""

from __future__ import annotations

import io
import math
import random
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile

from pipeline.core.lazy import lazy_module

torch = lazy_module("torch")  # loaded on first use, not by the CLI's settings

# Refuse to decode more than this many pixels (a decompression-bomb guard); a record over it is skipped.
DEFAULT_MAX_PIXELS = 64_000_000
JPEG_QUALITY = 95


class ImageError(ValueError):
    """An image that cannot be used; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class PreparedImage:
    jpeg: bytes
    width: int
    height: int
    converted: str  # "" when the original bytes were kept, else what was done ("RGBA->RGB", "resized", ...)


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _flatten_alpha(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _from_16_bit(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image ("I;16*", or "I" as 16-bit PNGs may open) scaled to 8-bit "L": PIL's own
    convert clips every value above 255 to white instead of scaling."""
    pixels = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(pixels / 257), 0, 255).astype(np.uint8), mode="L")


SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def prepare_image(data: bytes, max_side: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """Check that `data` is a complete image and return JPEG bytes for the shard.

    A baseline RGB or grayscale JPEG is kept byte for byte unless it must be resized. Anything else (PNG,
    alpha, CMYK, palette, 16-bit) is converted to RGB JPEG. Raises ImageError with the reason otherwise.
    """
    if not data:
        raise ImageError("empty image file")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
                if width * height > max_pixels:
                    raise ImageError(f"image too large: {width}x{height} pixels exceeds max_pixels={max_pixels}")
                image_format = probe.format
                probe.load()  # decodes fully: a truncated or corrupt file fails here
                image = probe.copy()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"image too large: {error}") from error
    except Exception as error:  # PIL raises many types for corrupt data
        raise ImageError(f"cannot decode image: {type(error).__name__}: {error}") from error

    conversions = []
    if image.mode in SIXTEEN_BIT_MODES:
        conversions.append(f"{image.mode}->L")
        image = _from_16_bit(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = _flatten_alpha(image)
        conversions.append("alpha->white")
    elif image.mode not in ("RGB", "L"):
        conversions.append(f"{image.mode}->RGB")
        image = image.convert("RGB")
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
        conversions.append("resized")
    if image_format == "JPEG" and not conversions:
        return PreparedImage(data, width, height, "")
    if image_format != "JPEG" and not conversions:
        conversions.append(f"{image_format}->JPEG")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return PreparedImage(encode_jpeg(image), image.width, image.height, ",".join(conversions))


def decode_rgb(data: bytes) -> Image.Image:
    """Decode shard image bytes to an RGB PIL image."""
    with Image.open(io.BytesIO(data)) as image:
        return (_from_16_bit(image) if image.mode in SIXTEEN_BIT_MODES else image).convert("RGB")


#: open_clip's default RandomResizedCrop area range (``AugmentationCfg.scale``, src/open_clip/transform.py) and
#: torchvision's default aspect-ratio range, which open_clip keeps (``ratio=None``).
RRC_SCALE = (0.9, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)


def _to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W], a channel-first view (np.asarray with a dtype is 100x slower)."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def model_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """CLIP's preprocessing: RGB, shorter side to `size` (PIL bicubic), centre crop -> uint8 [3, size, size].

    Sizes and offsets are torchvision's ``Resize(size)`` / ``CenterCrop(size)`` (long side ``int(size * long /
    short)``, offset ``round((side - size) / 2)``), which OpenAI CLIP and open_clip apply to PIL images.
    """
    image = image.convert("RGB")
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    left, top = int(round((new_size[0] - size) / 2.0)), int(round((new_size[1] - size) / 2.0))
    return _to_uint8_tensor(image.crop((left, top, left + size, top + size)))


def _rrc_box(width: int, height: int, rng: random.Random, scale: tuple[float, float],
             ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(left, top, w, h) drawn as torchvision's ``RandomResizedCrop.get_params``: area fraction and log aspect
    ratio uniform, 10 tries, then the largest centred box within the ratio range."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    if width / height < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop_pixels(image: Image.Image, size: int, rng: random.Random,
                               scale: tuple[float, float] = RRC_SCALE,
                               ratio: tuple[float, float] = RRC_RATIO) -> torch.Tensor:
    """A random crop of `scale` of the area and `ratio` aspect, resized to `size` (PIL bicubic) -> uint8 [3, S, S]."""
    image = image.convert("RGB")
    left, top, w, h = _rrc_box(image.width, image.height, rng, scale, ratio)
    crop = image.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
    return _to_uint8_tensor(crop)
