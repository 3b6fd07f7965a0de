"""I2T (Human): the image's other human reference captions as its text variants (one-to-many from annotation).

Stored once per image, relative to the primary caption (``meta["primary"]``, index 0 unless the source says
otherwise): for each other caption m, one variant with ``text = captions[m]``, ``caption_index = primary`` (the
caption it is a variant *of*, so scores such as ``src_sim`` compare it with the primary caption) and
``extra["annotation_index"] = m`` (where it came from). Nothing is random; the seed is still derived per
variant so every stage's records look alike.

How training reads it:
* 1:1 (the paper's baseline): the base shard's primary caption only (``<key>.txt``); ignore this stage.
* 1:N: the image's text pool is the primary caption plus these variants' texts. The variants of another
  caption j are that pool minus caption j: there is no need to store them k-1 times per caption.

Empty captions and exact duplicates (after trimming and case-folding) of the primary or of an earlier caption
are skipped with the reason; an image with a single caption has nothing to add and records that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pipeline.core.config import check_non_negative, check_positive
from pipeline.augment.stage import BaseSample, SampleResult, Stage, Variant

OP = "i2t-human"


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


class I2THumanStage(Stage):
    name: ClassVar[str] = "i2t-human"
    modality: ClassVar[str] = "text"

    @dataclass(frozen=True)
    class Config:
        batch_size: int = 256
        max_variants: int = 0  # 0: every other caption; otherwise the first N of them

        def __post_init__(self) -> None:
            check_positive(self, "batch_size")
            check_non_negative(self, "max_variants")

    def describe(self) -> dict[str, Any]:
        return {"layout": "once per image: variants are the non-primary captions, caption_index = primary, "
                          "extra annotation_index = source caption"}

    def augment_batch(self, samples: list[BaseSample]) -> list[SampleResult]:
        return [self.augment_sample(s) for s in samples]

    def augment_sample(self, sample: BaseSample) -> SampleResult:
        result = SampleResult()
        primary = int(sample.meta.get("primary", 0))
        if not 0 <= primary < len(sample.captions):
            result.skipped.append({"caption_index": None, "reason": f"primary index out of range: {primary}"})
            return result
        others = [m for m in range(len(sample.captions)) if m != primary]
        if not others:
            result.skipped.append({"caption_index": primary, "reason": "no other reference caption"})
            return result
        seen = {_norm(sample.captions[primary]): primary}
        for m in others:
            text = sample.captions[m].strip()
            reason = None
            if not text:
                reason = "empty caption"
            elif _norm(text) in seen:
                reason = f"duplicate caption: same as caption {seen[_norm(text)]}"
            elif self.config.max_variants and len(result.variants) >= self.config.max_variants:
                reason = f"max_variants reached: {self.config.max_variants}"
            if reason is not None:
                result.skipped.append({"caption_index": primary, "annotation_index": m, "reason": reason})
                continue
            seen[_norm(text)] = m
            result.variants.append(Variant(seed=self.seed_for(sample.key, m), op=OP, caption_index=primary,
                                           text=text, extra={"annotation_index": m}))
        return result
