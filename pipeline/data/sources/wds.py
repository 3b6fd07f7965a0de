"""`wds`: existing WebDataset shards (`*.tar` in DATA_ROOT, or one tar): img2dataset output or our own shards.

A sample is the tar members sharing a key (the member name up to its first dot). Its image is the first of
`jpg`, `jpeg`, `png`, `webp`; its captions are, in this order of preference, the `json`'s `captions` list (our
base shards), its `caption` (img2dataset), or the `txt` member. img2dataset's `status` is respected: a sample
whose status is not "success" is skipped and counted, and so is each failed row of the shard's `.parquet`
(img2dataset writes failed downloads only there). A sample without an image or without any caption is a
recorded skip.

Image ids: the `json`'s `image_id` when it has one (our shards, so a re-ingest gives the same shards), else
`id_prefix` (default "wds") + img2dataset's `key` or the sample key. Split: the `json`'s `split`, else the
shard name's prefix (`train-000000.tar`), else the hash split of SourceOptions.fractions.

Images stay in the tars: a record holds a `TarMember` (offset and size) that the worker reads.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.data.sources import SPLITS, Record, Skip, SourceError, SourceOptions, TarMember, make_record

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def _shards(root: Path) -> list[Path]:
    if root.is_file():
        if root.suffix != ".tar":
            raise SourceError(f"{root} is not an uncompressed .tar shard")
        return [root]
    shards = sorted(root.glob("*.tar"))
    if not shards:
        raise SourceError(f"no WebDataset shards (*.tar) in {root}")
    return shards


def _samples(tar_path: Path) -> Iterator[tuple[str, dict[str, tarfile.TarInfo], tarfile.TarFile]]:
    """(key, {extension: member}) per sample, in tar order; members of one key must be adjacent."""
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            key, members = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                name_key, _, extension = member.name.partition(".")
                if name_key != key and members:
                    yield key, members, tar
                    members = {}
                key = name_key
                members[extension.lower()] = member
            if members:
                yield key, members, tar
    except (tarfile.TarError, EOFError, OSError) as error:
        raise SourceError(f"corrupt or truncated shard {tar_path}: {error}") from error


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    return handle.read() if handle else b""


def _failed_parquet_rows(tar_path: Path, keys_in_tar: set[str]) -> Iterator[Skip]:
    """img2dataset's `<shard>.parquet` rows whose status is not "success" and that the tar does not hold."""
    parquet = tar_path.with_suffix(".parquet")
    if not parquet.exists():
        return
    import pyarrow.parquet as pq

    table = pq.read_table(parquet)
    if "status" not in table.column_names:
        return
    rows = table.select([c for c in ("key", "status", "url", "error_message") if c in table.column_names]).to_pylist()
    for row in rows:
        if row.get("status") != "success" and str(row.get("key")) not in keys_in_tar:
            yield _status_skip(str(row.get("url") or f"{parquet}#{row.get('key')}"), row)


def _status_skip(source: str, meta: dict[str, Any]) -> Skip:
    message = f": {meta['error_message']}" if meta.get("error_message") else ""
    return Skip(source, f"img2dataset status {meta.get('status')!r}{message}")


def read_wds(options: SourceOptions) -> Iterator[Record | Skip]:
    prefix = "wds" if options.id_prefix is None else options.id_prefix
    for tar_path in _shards(options.data_root):
        shard_split = tar_path.name.split("-", 1)[0] if "-" in tar_path.name else None
        keys: set[str] = set()
        for key, members, tar in _samples(tar_path):
            keys.add(key)
            where = f"{tar_path}#{key}"
            try:
                meta = json.loads(_read_member(tar, members["json"])) if "json" in members else {}
            except json.JSONDecodeError as error:
                yield Skip(where, f"malformed json member: {error}")
                continue
            if not isinstance(meta, dict):
                meta = {}
            if "status" in meta and meta["status"] != "success":
                yield _status_skip(where, meta)
                continue
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            if image is None:
                yield Skip(where, f"no image member ({'/'.join(IMAGE_EXTENSIONS)})")
                continue
            if isinstance(meta.get("captions"), list):
                captions = meta["captions"]
            elif meta.get("caption") is not None:
                captions = [meta["caption"]]
            elif "txt" in members:
                captions = [_read_member(tar, members["txt"]).decode("utf-8", errors="replace")]
            else:
                captions = []
            image_id = meta.get("image_id") or f"{prefix}{meta.get('key') or key}"
            split = meta.get("split") if meta.get("split") in SPLITS else None
            split = split or (shard_split if shard_split in SPLITS else options.fractions.assign(str(image_id)))
            source = str(meta.get("source") or meta.get("url") or where)
            ref = TarMember(tar_path, image.offset_data, image.size)
            yield make_record(str(image_id), ref, captions, split, source)
        yield from _failed_parquet_rows(tar_path, keys)
