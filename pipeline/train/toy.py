"""A toy shard set in the on-disk layout of docs/architecture.md, for the training tests and benchmark.

Each image is a flat colour with a lighter square; its captions name the colour, so a tiny CLIP can learn the
pairing in a few steps. `text_stage` writes one paraphrase per caption, `image_stage` two image variants (v0
depicts caption 0, v1 pairs with any caption), both aligned with the base shards.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image

from pipeline.core.schema import BaseRecord, StageRecord, VariantRecord
from pipeline.core.shards import sample_key, shard_name, write_sizes, write_stats, write_tar

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 30),
           "purple": (140, 40, 180), "orange": (250, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15)}


def _jpeg(rgb: tuple[int, int, int], size: int, offset: int) -> bytes:
    image = Image.new("RGB", (size, size), rgb)
    light = tuple(min(255, c + 60) for c in rgb)
    side = size // 3
    image.paste(light, (offset % (size - side), offset % (size - side), offset % (size - side) + side,
                        offset % (size - side) + side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_toy_shards(
    shards_dir: Path,
    dataset: str = "toy",
    *,
    shards: int = 2,
    per_shard: int = 16,
    image_size: int = 32,
    text_stage: str | None = None,
    image_stage: str | None = None,
    split: str = "train",
    seed: int = 0,
) -> Path:
    """Write base (and optional stage) shards under shards_dir/dataset; returns the base dir."""
    rng = random.Random(seed)
    names = list(COLOURS)
    for shard in range(shards):
        base, texts, images = [], [], []
        for index in range(per_shard):
            key = sample_key(split, shard, index)
            colour = rng.choice(names)
            captions = [f"a {colour} picture", f"the colour is {colour}", f"something {colour} here"]
            meta = BaseRecord(captions, 0, key=key, image_id=key, split=split, source="toy", width=image_size,
                              height=image_size)
            jpg = _jpeg(COLOURS[colour], image_size, rng.randrange(image_size))
            base.append({"__key__": key, "jpg": jpg, "txt": captions[0], "json": meta.to_json()})
            variants = [VariantRecord(i, seed=i, op="toy", text=f"{c} (paraphrase)") for i, c in enumerate(captions)]
            texts.append({"__key__": key, "json": StageRecord(variants, [], key=key, stage=text_stage).to_json()})
            images.append({"__key__": key, "v0.jpg": _jpeg(COLOURS[colour], image_size, 3),
                           "v1.jpg": _jpeg(COLOURS[colour], image_size, 7),
                           "json": StageRecord([VariantRecord(0, seed=0, op="toy", file="v0.jpg"),
                                                VariantRecord(None, seed=1, op="toy", file="v1.jpg")], [],
                                               key=key, stage=image_stage).to_json()})
        for stage, samples in (("base", base), (text_stage, texts), (image_stage, images)):
            if stage is None:
                continue
            tar = shards_dir / dataset / stage / shard_name(split, shard)
            digest = write_tar(tar, samples)
            write_stats(tar, {"sha256": digest, "samples": len(samples)})
    for stage in ("base", text_stage, image_stage):
        if stage is not None:
            write_sizes(shards_dir / dataset / stage)
    return shards_dir / dataset / "base"
