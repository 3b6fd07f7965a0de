"""Streaming image-text pairs from base shards zipped with augmentation-stage shards.

Stage shard i is aligned with base shard i (same tar name, same keys in the same order; docs/architecture.md),
so the loader opens both and zips them sample by sample. For each image it then draws ONE pair per step from
what is available:

- images: the base image, plus every kept image variant (`<key>.vN.jpg` of an image stage);
- texts: the primary caption, plus every kept text variant (I2T / EDA).

An image variant that depicts caption c pairs with texts derived from caption c (caption c itself when no
variant of it is loaded); the base image and caption-free variants (RandAugment) pair with any text. Drawing
uniformly over images then over compatible texts gives 1:1 with no stages, 1:N with text stages, N:1 with image
stages and N:N with both.

Captions: ``primary`` (default) uses the primary caption as the base text; ``all`` (no stages) makes every human
caption its own pair, as the ALBEF-style training files do (one entry per caption): each sample is expanded
before the shuffle buffer, and the batcher keeps two captions of one image out of one batch (they would be
false negatives of each other in the contrastive loss).

Pixels: :func:`pipeline.core.images.model_pixels`, the evaluation's and scoring's preprocessing (CLIP's resize of
the shorter side and centre crop); ``augment="rrc"`` replaces it by open_clip's training random resized crop.
"""

from __future__ import annotations

import functools
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds

from pipeline.core.lifetime import die_with_parent
from pipeline.core.images import decode_rgb, model_pixels, random_resized_crop_pixels
from pipeline.core.schema import base_record
from pipeline.core.seeding import derive_seed
from pipeline.curate.pairs import CAPTION_INDEX, KeepFn, compatible_texts, pair_options, zip_stages
from pipeline.train.config import DataConfig

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Pair:
    image: bytes
    text: str
    image_source: str  # "base" or the stage that made the image
    text_source: str  # "base" or the stage that made the text
    key: str


def _worker_seed(seed: int) -> int:
    rank, world, worker, workers = wds.utils.pytorch_worker_info()
    return derive_seed("train-data", seed, rank, worker)


def _seeded_shuffle(src: Iterator[Any], bufsize: int, seed: int):
    if bufsize <= 1:
        yield from src
        return
    yield from wds.filters._shuffle(src, bufsize=bufsize, initial=bufsize, seed=_worker_seed(seed))


seeded_shuffle = wds.filters.pipelinefilter(_seeded_shuffle)



def _expand_captions(src: Iterator[dict[str, Any]]):
    """One copy of each sample per caption, marked with the caption's index (``captions="all"``)."""
    for sample in src:
        for index in range(len(base_record(sample).captions)):
            yield {**sample, CAPTION_INDEX: index}


expand_captions = wds.filters.pipelinefilter(_expand_captions)


#: Pairs that may wait for a later batch, in batches: enough for up to 9 captions of each image in a row (no
#: shuffle); past it a repeated image joins its batch (a data set with fewer images than a batch).
WAITING_BATCHES = 8


def _refill(queued: list[Pair], batch_size: int) -> tuple[list[Pair], set[str], list[Pair]]:
    """A batch of distinct keys greedily from `queued` (in order), its keys, and the pairs left waiting."""
    batch, keys, waiting = [], set(), []
    for pair in queued:
        if len(batch) < batch_size and pair.key not in keys:
            batch.append(pair)
            keys.add(pair.key)
        else:
            waiting.append(pair)
    return batch, keys, waiting


def _distinct_batches(src: Iterator[Pair], batch_size: int, collation_fn: Callable[[list[Pair]], Any]):
    """Full batches (as ``wds.batched(partial=False)``) in which no image key appears twice.

    A pair whose key the batch already holds waits for a later batch; waiting pairs go first. At the end of a
    finite stream the waiting pairs fill what full batches they can; the rest is dropped like a partial batch.
    """
    batch, keys, waiting = [], set(), []
    for pair in src:
        if pair.key in keys and len(waiting) < WAITING_BATCHES * batch_size:
            waiting.append(pair)
            continue
        batch.append(pair)
        keys.add(pair.key)
        while len(batch) == batch_size:
            yield collation_fn(batch)
            batch, keys, waiting = _refill(waiting, batch_size)
    batch, keys, waiting = _refill(batch + waiting, batch_size)
    while len(batch) == batch_size:
        yield collation_fn(batch)
        batch, keys, waiting = _refill(waiting, batch_size)


distinct_batches = wds.filters.pipelinefilter(_distinct_batches)


class PairDrawer:
    """Picklable map stage: a zipped sample -> one Pair, drawn with a per-worker seeded RNG."""

    def __init__(self, stages: tuple[str, ...], keep: KeepFn | None, seed: int):
        self.stages = stages
        self.keep = keep
        self.seed = seed
        self._rng: random.Random | None = None

    def __call__(self, sample: dict[str, Any]) -> Pair:
        if self._rng is None:  # created in the worker process, not in the parent
            self._rng = random.Random(_worker_seed(self.seed) + 1)
        meta = base_record(sample)
        images, texts = pair_options(sample, meta, self.stages, self.keep)
        image = self._rng.choice(images)
        text = self._rng.choice(compatible_texts(texts, image.caption_index, meta))
        return Pair(image=image.data, text=text.data, image_source=image.source, text_source=text.source,
                    key=sample["__key__"])


class Collate:
    """Pairs -> a batch; pixels by the evaluation's preprocessing, or ``augment="rrc"``'s random resized crop."""

    def __init__(self, image_size: int, augment: str = "none", seed: int = 0):
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        self._rng: random.Random | None = None

    def pixels(self, data: bytes) -> torch.Tensor:
        """JPEG bytes -> uint8 [3, S, S]."""
        image = decode_rgb(data)
        if self.augment == "none":
            return model_pixels(image, self.image_size)
        if self._rng is None:  # created in the worker process, not in the parent
            self._rng = random.Random(_worker_seed(self.seed) + 2)
        return random_resized_crop_pixels(image, self.image_size, self._rng)

    def __call__(self, pairs: list[Pair]) -> dict[str, Any]:
        return {
            "images": torch.stack([self.pixels(p.image) for p in pairs]).float().div_(255.0),
            "texts": [p.text for p in pairs],
            "keys": [p.key for p in pairs],
            "image_sources": [p.image_source for p in pairs],
            "text_sources": [p.text_source for p in pairs],
        }


def build_pipeline(
    urls: list[str],
    *,
    batch_size: int,
    image_size: int,
    stages: tuple[str, ...] = (),
    keep: KeepFn | None = None,
    shuffle_buffer: int = 1000,
    resampled: bool = True,
    seed: int = 0,
    captions: str = "primary",
    augment: str = "none",
) -> wds.DataPipeline:
    """The webdataset pipeline yielding batches {images (B,3,H,W) in [0,1], texts, keys, *_sources}.

    Resampled: shards drawn with replacement, seeded per rank and worker (an endless stream). Otherwise each
    epoch splits the shard list by node, then by worker. `captions` and `augment`: see the module docstring.
    """
    if resampled:
        source = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        source = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
    DataConfig(stages=stages, captions=captions, augment=augment)  # raises ValueError naming a bad value
    collate = Collate(image_size, augment, seed)
    if captions == "all":
        expand, batcher = [expand_captions()], distinct_batches(batch_size, collate)
    else:
        expand, batcher = [], wds.batched(batch_size, collation_fn=collate, partial=False)
    return wds.DataPipeline(
        *source,
        zip_stages(stages),
        *expand,
        seeded_shuffle(shuffle_buffer, seed),
        wds.map(PairDrawer(stages, keep, seed)),
        batcher,
    )


def build_loader(pipeline: wds.DataPipeline, num_workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        pipeline,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=functools.partial(_loader_worker_init, os.getpid()),
    )


def _loader_worker_init(parent_pid: int, worker_id: int) -> None:
    die_with_parent(parent_pid)


def endless(loader: Iterable[Any]) -> Iterator[Any]:
    """Restart a finite (non-resampled) loader at each epoch end."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the loader yields no batch: fewer samples than one batch per worker and rank?")
