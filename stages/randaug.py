"""RandAugment (Cubuk et al. 2020) image variants through torchvision.transforms.v2.RandAugment.

Defaults num_ops=2, magnitude=9 (torchvision's; ALBEF used 2 / 7), N variants per image (default 2), stored as
JPEG quality 95 (``<key>.v0.jpg``, ...). Image variants pair with every caption: ``caption_index`` is None.

Seeding: torchvision's RandAugment draws its operations and signs from torch's global CPU generator, so each
variant runs inside ``torch.random.fork_rng`` seeded with ``seed_for(key, variant)``: deterministic, distinct
per variant, and the caller's RNG state is left untouched.

RandAugment often draws operations that change nothing (Identity; AutoContrast on an image that already spans
0..255; most operations on a flat or 1x1 image). Such a draw is redrawn with the derived seed
``derive_seed(seed, "draw", d)``, at most ``max_draws`` times (the seed actually used is recorded, with
``draw`` = d when d > 0); a variant whose pixels still equal the original's or an earlier variant's is
skipped with the reason, never stored.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image
from torchvision.transforms import v2

from pipeline.core.config import check_positive, check_range
from pipeline.core.images import encode_jpeg
from pipeline.core.seeding import derive_seed
from pipeline.augment.stage import BaseSample, SampleResult, Stage, StageContext, Variant

OP = "randaug"


def _fingerprint(image: Image.Image) -> bytes:
    """64 pixels at fixed positions: images that differ here differ (a cheap first test before full pixels)."""
    return image.resize((8, 8), Image.Resampling.NEAREST).tobytes() + bytes(str(image.size), "ascii")


def _same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.mode == b.mode and a.tobytes() == b.tobytes()


class RandAugmentStage(Stage):
    name: ClassVar[str] = "randaug"
    modality: ClassVar[str] = "image"

    @dataclass(frozen=True)
    class Config:
        batch_size: int = 16
        variants_per_image: int = 2
        num_ops: int = 2
        magnitude: int = 9
        num_magnitude_bins: int = 31
        jpeg_quality: int = 95
        max_draws: int = 3  # draws per variant before it is skipped as unchanged

        def __post_init__(self) -> None:
            check_positive(self, "batch_size", "variants_per_image", "num_ops", "max_draws")
            if self.num_magnitude_bins < 2:
                raise ValueError(f"num_magnitude_bins={self.num_magnitude_bins!r}: must be >= 2")
            if not 0 <= self.magnitude < self.num_magnitude_bins:
                raise ValueError(f"magnitude={self.magnitude!r}: must be in [0, num_magnitude_bins={self.num_magnitude_bins})")
            check_range("jpeg_quality", self.jpeg_quality, 1, 100)

    def __init__(self, config: RandAugmentStage.Config, context: StageContext):
        super().__init__(config, context)
        self.transform = v2.RandAugment(num_ops=config.num_ops, magnitude=config.magnitude,
                                        num_magnitude_bins=config.num_magnitude_bins)

    def describe(self) -> dict[str, Any]:
        return {"torchvision": importlib.metadata.version("torchvision"),
                "transform": "torchvision.transforms.v2.RandAugment on PIL RGB, nearest interpolation",
                "seeding": "torch.random.fork_rng + torch.default_generator.manual_seed(seed_for(key, variant)) per variant (CPU generator only)"}

    def augment_batch(self, samples: list[BaseSample]) -> list[SampleResult]:
        return [self.augment_sample(s) for s in samples]

    def augment_image(self, image: Image.Image, seed: int) -> Image.Image:
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed also seeds every accelerator and costs ~0.5 ms a call.
            torch.default_generator.manual_seed(seed)
            return self.transform(image)

    def augment_sample(self, sample: BaseSample) -> SampleResult:
        result = SampleResult()
        try:
            image = sample.image()
        except Exception as error:  # PIL raises many types for corrupt data
            reason = f"cannot decode base image: {type(error).__name__}"
            result.skipped.extend({"caption_index": None, "variant": v, "reason": reason}
                                  for v in range(self.config.variants_per_image))
            return result
        seen: list[tuple[bytes, Image.Image, str]] = [(_fingerprint(image), image, "the original")]
        for v in range(self.config.variants_per_image):
            first_seed = self.seed_for(sample.key, v)
            for draw in range(self.config.max_draws):
                seed = first_seed if draw == 0 else derive_seed(first_seed, "draw", draw)
                out = self.augment_image(image, seed)
                mark = _fingerprint(out)
                same = next((name for m, earlier, name in seen if m == mark and _same_pixels(earlier, out)), None)
                if same is None:
                    break
            if same is not None:
                result.skipped.append({"caption_index": None, "variant": v, "reason": f"unchanged pixels: same as "
                                       f"{same} after {self.config.max_draws} draws"})
                continue
            seen.append((mark, out, f"variant {v}"))
            result.variants.append(Variant(seed=seed, op=OP, caption_index=None, extra={"draw": draw} if draw else {},
                                           image_jpeg=encode_jpeg(out, self.config.jpeg_quality)))
        return result
