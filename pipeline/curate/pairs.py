"""The one-to-many pairs of a dataset: base samples zipped with their stages' aligned samples, and the images and
texts each offers (the base image and primary caption, then every variant a filter keeps).

Training draws one pair per sample from these (pipeline/train/data.py); export writes all of them
(pipeline/curate/export.py).
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import webdataset as wds

from pipeline.core.schema import BaseRecord, SchemaError, VariantRecord, stage_record
from pipeline.core.shard_urls import check_stage_urls, stage_url
from pipeline.core.shards import require_shards

#: keep(stage, key, variant index) -> whether a filter keeps that variant
KeepFn = Callable[[str, str, int], bool]

CAPTION_INDEX = "__caption__"  # set by training's caption expansion: the caption index a copy of the sample pairs with


def base_shard_urls(base_dir: Path, split: str, stages: Iterable[str] = ()) -> list[str]:
    """Base shard paths of `split`; checks every stage has the aligned shard of each one."""
    tars = require_shards(base_dir, split)
    urls = [str(t) for t in tars]
    check_stage_urls(urls, tuple(stages))
    return urls


def _zip_stages(src: Iterator[dict[str, Any]], stages: tuple[str, ...], handler=wds.reraise_exception):
    """For each base shard url, yield base samples with each stage's aligned sample under `sample[stage]`."""
    for item in src:
        base_url = item["url"]
        urls = (base_url, *(stage_url(base_url, s) for s in stages))
        readers = [wds.tariterators.tarfile_samples([{"url": url}], handler=handler) for url in urls]
        try:
            yield from _zipped(base_url, readers, stages)
        except (tarfile.TarError, EOFError) as error:  # webdataset's error holds the reader, not a plain message
            raise ValueError(f"corrupt or truncated shard {' or '.join(urls)}: "
                             f"{str(error.args[0]).partition(' @ ')[0] if error.args else error}") from error


def _zipped(base_url: str, readers: list[Iterator[dict[str, Any]]], stages: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    for parts in zip(*readers, strict=True):
        base = parts[0]
        if "json" not in base or "jpg" not in base:  # a tar cut at a member boundary reads as a short sample
            raise ValueError(f"base shard {base_url}: sample {base['__key__']!r} has no "
                             f"{'json' if 'json' not in base else 'jpg'} member: the shard is truncated or "
                             "damaged; rerun `make ingest`")
        for stage, part in zip(stages, parts[1:]):
            if part["__key__"] != base["__key__"]:
                raise ValueError(
                    f"stage {stage!r} shard of {base_url} is not aligned with base: "
                    f"key {part['__key__']!r} where base has {base['__key__']!r}"
                )
            base[stage] = part
        yield base


zip_stages = wds.filters.pipelinefilter(_zip_stages)


class Option(NamedTuple):
    """An image or a text a zipped sample offers: base (variant None) or a stage's kept variant."""

    data: Any  # image bytes or text
    caption_index: int | None  # the caption it derives from or depicts; None: pairs with any text
    source: str  # "base" or the stage
    variant: int | None = None  # index in the stage's variants
    record: VariantRecord | None = None  # the variant's record (scores: alignment, src_sim, shift)


def pair_options(sample: dict[str, Any], meta: BaseRecord, stages: tuple[str, ...],
                 keep: KeepFn | None) -> tuple[list[Option], list[Option]]:
    """(images, texts) of a zipped sample: the base image and primary caption, then each kept variant."""
    key = sample["__key__"]
    primary = sample.get(CAPTION_INDEX, meta.primary)
    texts = [Option(meta.captions[primary], primary, "base")]
    images = [Option(sample["jpg"], None, "base")]
    for stage in stages:
        part = sample[stage]
        for index, variant in enumerate(stage_record(part).variants):
            if keep is not None and not keep(stage, key, index):
                continue
            if variant.file is not None:
                images.append(Option(part[variant.file], variant.caption_index, stage, index, variant))
            elif variant.text is not None:
                texts.append(Option(variant.text, variant.caption_index, stage, index, variant))
            else:
                raise SchemaError(f"stage {stage!r}, {key} variant {index}: neither a text nor a file")
    return images, texts


def compatible_texts(texts: list[Option], depicted: int | None, meta: BaseRecord) -> list[Option]:
    """The texts an image depicting caption `depicted` pairs with (caption `depicted` itself when none is loaded)."""
    compatible = texts if depicted is None else [t for t in texts if t.caption_index == depicted]
    return compatible or [Option(meta.captions[depicted], depicted, "base")]
