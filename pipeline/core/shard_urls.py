"""Shard URL lists, as open_clip's ``--train-data`` takes them: brace patterns, ``::``-joined lists, ``pipe:``.

A spec such as ``/data/coco/base/train-{000000..000226}.tar``, ``a.tar::b.tar`` or
``pipe:cat /data/coco/base/train-000000.tar`` is expanded by webdataset's own ``expand_urls`` (``::`` split,
``WDS_`` variables, braces). Local paths are checked at once, so a pattern that matches nothing or a shard missing
from the middle of one is a clear error naming it, not a silent short epoch. Other URLs (``pipe:``, ``s3://`` via
``pipe:aws s3 cp ...``, ``http(s)://``) are opened by webdataset's ``gopen`` when read.

A stage's shards sit beside the base ones: the ``base`` folder of each URL is replaced by the stage's name
(``.../coco/base/train-000003.tar`` -> ``.../coco/eda/train-000003.tar``), the layout ``make augment`` writes.
Sizes come from ``sizes.json`` beside local shards (the file open_clip reads), or from ``num_samples``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import webdataset as wds

from pipeline.core.paths import sizes_path
from pipeline.core.shards import ShardError, read_tar

BASE_FOLDER = "base"
_BASE_SEGMENT = re.compile(rf"(?<=/){BASE_FOLDER}(?=/[^/\s]+\.tar\b)")
_REMOTE = ("pipe:", "http://", "https://", "s3://", "gs://")


def is_local(url: str) -> bool:
    return not url.startswith(_REMOTE)


def expand_urls(spec: str) -> list[str]:
    """The URLs of a spec; FileNotFoundError naming the first missing local shard (and how many are missing)."""
    if not spec or not spec.strip():
        raise ValueError("empty shard URL spec: give a path, a brace pattern, a '::' list or a pipe: command")
    urls = [url.strip() for url in wds.shardlists.expand_urls(spec.strip()) if url.strip()]
    missing = [url for url in urls if is_local(url) and not Path(url).expanduser().is_file()]
    if missing and len(missing) == len(urls):
        raise FileNotFoundError(f"shard URL spec {spec!r} matches no shard ({len(urls)} expanded, none exists; "
                                f"first: {missing[0]})")
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards of {spec!r} are missing (first: {missing[0]})")
    return urls


def stage_url(base_url: str, stage: str) -> str:
    """The stage shard aligned with a base shard URL: its ``base`` folder replaced by the stage name."""
    stage_url_, count = _BASE_SEGMENT.subn(stage, base_url, count=1)
    if not count:
        raise ValueError(f"cannot find the stage {stage!r} shard of {base_url!r}: its shards must sit in a folder "
                         f"named '{BASE_FOLDER}' (…/<dataset>/{BASE_FOLDER}/<split>-NNNNNN.tar), as make ingest writes")
    return stage_url_


def check_stage_urls(base_urls: list[str], stages: tuple[str, ...]) -> None:
    """Every stage has the aligned shard of each local base shard (remote ones are checked when read)."""
    for stage in stages:
        local = [stage_url(url, stage) for url in base_urls if is_local(url)]
        missing = [url for url in local if not Path(url).expanduser().is_file()]
        if missing:
            raise FileNotFoundError(f"stage {stage!r} lacks {len(missing)} of {len(local)} shards "
                                    f"(first: {missing[0]}): run `make augment STAGES={stage}`")


def read_url(url: str) -> list[dict[str, Any]]:
    """All samples of one shard, in order, as {"__key__": ..., ext: bytes} (local tars checked for truncation)."""
    if is_local(url):
        return read_tar(Path(url).expanduser())
    try:
        return [{k: v for k, v in sample.items() if k != "__url__"}
                for sample in wds.tariterators.tarfile_samples([{"url": url}])]
    except Exception as error:  # gopen raises OSError / IOError subclasses, tarfile its own: one clear message
        raise ShardError(f"cannot read shard {url!r}: {error}") from error


def dataset_size(urls: list[str], num_samples: int | None = None) -> int | None:
    """Samples in the shards: ``num_samples`` when given, else from ``sizes.json`` beside local shards."""
    if num_samples is not None:
        return num_samples
    total = 0
    for url in urls:
        if not is_local(url):
            return None
        path = Path(url).expanduser()
        sizes_file = sizes_path(path.parent)
        if not sizes_file.is_file():
            return None
        count = json.loads(sizes_file.read_text()).get(path.name)
        if count is None:
            return None
        total += int(count)
    return total
