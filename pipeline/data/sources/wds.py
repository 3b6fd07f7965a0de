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

DATA_ROOT may also be a shard URL spec (pipeline/core/shard_urls.py: a brace pattern, a '::' list, `pipe:`
commands, http(s) URLs). Local shards of it are read as above; a remote one is streamed once, in tar order, and
its images travel in the records as bytes (they cannot be read again by offset), so they are held in memory until
written: a large remote dataset wants LIMIT or a local copy. The `.parquet` beside a remote shard is not read (a
`pipe:` command says how to read the tar, not where the parquet is), so failed rows only it lists are not counted.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import webdataset as wds

from pipeline.core.shard_urls import expand_urls, is_local, shard_file_name
from pipeline.data.sources import SPLITS, Record, Skip, SourceError, SourceOptions, TarMember, make_record

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

log = logging.getLogger(__name__)


def _shards(root: Path | str) -> list[Path | str]:
    if isinstance(root, str):  # a shard URL spec: local shards as paths (read by offset), remote ones streamed
        shards = [Path(url).expanduser() if is_local(url) else url for url in expand_urls(root)]
        not_tar = [str(p) for p in shards if isinstance(p, Path) and p.suffix != ".tar"]
        if not_tar:
            raise SourceError(f"{not_tar[0]} is not an uncompressed .tar shard")
        if any(isinstance(shard, str) for shard in shards):
            log.warning("remote shards are streamed; an img2dataset .parquet beside them is not read")
        return shards
    if root.is_file():
        if root.suffix != ".tar":
            raise SourceError(f"{root} is not an uncompressed .tar shard")
        return [root]
    shards = sorted(root.glob("*.tar"))
    if not shards:
        raise SourceError(f"no WebDataset shards (*.tar) in {root}")
    return shards


def _by_key(members: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Group (member name, value) pairs into (key, {extension: value}) samples; a sample's members are adjacent."""
    key, grouped = None, {}
    for name, value in members:
        name_key, _, extension = name.partition(".")
        if name_key != key and grouped:
            yield key, grouped
            grouped = {}
        key = name_key
        grouped[extension.lower()] = value
    if grouped:
        yield key, grouped


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    return handle.read() if handle else b""


def _samples(tar_path: Path) -> Iterator[tuple[str, dict[str, tarfile.TarInfo], tarfile.TarFile]]:
    """(key, {extension: member}) per sample, in tar order; members of one key must be adjacent."""
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for key, members in _by_key((member.name, member) for member in tar if member.isfile()):
                yield key, members, tar
    except (tarfile.TarError, EOFError, OSError) as error:
        raise SourceError(f"corrupt or truncated shard {tar_path}: {error}") from error


def _stream_samples(url: str) -> Iterator[tuple[str, dict[str, bytes], None]]:
    """(key, {extension: bytes}) per sample of a remote shard, read once in tar order."""
    stream, finished = None, False
    try:
        stream = wds.gopen(url, "rb")
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            # read each member as the stream reaches it (a stream cannot seek back)
            members = ((member.name, _read(tar, member)) for member in tar if member.isfile())
            for key, grouped in _by_key(members):
                yield key, grouped, None
        finished = True
    except (tarfile.TarError, EOFError, OSError) as error:
        raise SourceError(f"cannot read shard {url}: {error}") from error
    finally:
        try:
            if stream is not None:
                stream.close()  # a pipe: command's exit status is checked here
        except OSError as error:
            if finished:  # not when the reader stopped early (LIMIT): the command was cut off on purpose
                raise SourceError(f"cannot read shard {url}: {error}") from error


def _shard_name(shard: Path | str) -> str | None:
    if isinstance(shard, Path):
        return shard.name
    try:
        return shard_file_name(shard)
    except ValueError:
        return None


def _read_member(tar: tarfile.TarFile | None, member: tarfile.TarInfo | bytes) -> bytes:
    if isinstance(member, bytes):  # a streamed shard's member, already read
        return member
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
        name = _shard_name(tar_path) or ""
        shard_split = name.split("-", 1)[0] if "-" in name else None
        keys: set[str] = set()
        for key, members, tar in _samples(tar_path) if isinstance(tar_path, Path) else _stream_samples(tar_path):
            keys.add(key)
            where = f"{tar_path}#{key}"
            try:
                meta = json.loads(_read_member(tar, members["json"])) if "json" in members else {}
            except (ValueError, RecursionError) as error:  # not JSON, not UTF-8, nested too deep
                yield Skip(where, f"malformed json member: {type(error).__name__}: {error}")
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
            ref = image if isinstance(image, bytes) else TarMember(tar_path, image.offset_data, image.size)
            yield make_record(str(image_id), ref, captions, split, source)
        if isinstance(tar_path, Path):
            yield from _failed_parquet_rows(tar_path, keys)
