"""Decode, validate and normalise images to the JPEG bytes the shards hold."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile

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
        return image.convert("RGB")
