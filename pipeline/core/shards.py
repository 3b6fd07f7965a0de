"""WebDataset shard I/O with atomic commits.

A shard is committed in this order: the tar is written under a temporary name and renamed into place, then
its stats file `<name>.stats.json` is written (also via a temporary name; both through pipeline/core/fileio.py,
so only a file the folder's ledger records as the pipeline's is ever replaced). The stats file holds the tar's
sha256, so a shard is done only when the stats file exists and the tar still matches it; anything else (a
crash mid-write, a truncated or edited tar) is redone on the next run.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path
from typing import Any

from pipeline.core.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from pipeline.core.lazy import lazy_module
from pipeline.core.paths import sizes_path

wds = lazy_module("webdataset")  # imports torch: loaded on first use, not by the CLI's settings

log = logging.getLogger(__name__)

STATS_SUFFIX = ".stats.json"


class ShardError(RuntimeError):
    """A shard that cannot be read (truncated, corrupt or missing)."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(split: str, shard_index: int, index: int) -> str:
    # A webdataset key ends at the first dot of a member name: keys must hold no dots.
    return f"{split}_{shard_index:06d}_{index:06d}"


def stats_path(tar_path: Path) -> Path:
    return tar_path.with_name(tar_path.name[: -len(".tar")] + STATS_SUFFIX)


def write_tar(path: Path, samples: list[dict[str, Any]]) -> str:
    """Write samples (webdataset dicts with `__key__`) to `path` atomically; return the tar's sha256.

    Member mtimes are fixed, so the same samples always give the same bytes.
    """
    buffer = io.BytesIO()
    writer = wds.TarWriter(buffer, encoder=False, mtime=0, user="mat", group="mat")
    for sample in samples:
        key = sample["__key__"]
        if "." in key:
            raise ValueError(f"sample key {key!r} holds a dot; webdataset keys must not")
        writer.write({k: (v if k.startswith("__") else _encode_member(v)) for k, v in sample.items()})
    writer.tarstream.close()  # closes the tar (end blocks) but keeps our buffer open
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def json_text(value: Any) -> str:
    """A JSON member's text (sorted keys, no ASCII escaping): what a dict member is written as."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _encode_member(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return json_text(value).encode("utf-8")


def read_tar(path: Path) -> list[dict[str, Any]]:
    """All samples of a tar, in order, as {"__key__": ..., ext: bytes}; ShardError if it is truncated or corrupt."""
    if not path.exists():
        raise ShardError(f"missing shard {path}")
    try:
        with tarfile.open(path, mode="r:") as tar:
            samples = _tar_samples(tar, path)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ShardError(f"corrupt or truncated shard {path}: {error}") from error
    if path.stat().st_size % 512 != 0:
        raise ShardError(f"truncated shard {path}: size is not a multiple of 512 bytes")
    return samples


def read_tar_bytes(data: bytes, where: str) -> list[dict[str, Any]]:
    """:func:`read_tar` of a tar's bytes read from elsewhere (a shard URL), `where` naming it in errors."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            samples = _tar_samples(tar, where)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ShardError(f"corrupt or truncated shard {where}: {error}") from error
    if len(data) % 512 != 0:
        raise ShardError(f"truncated shard {where}: size is not a multiple of 512 bytes")
    return samples


def _tar_samples(tar: tarfile.TarFile, where: Any) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = []
    for member in tar:
        if not member.isfile():
            continue
        key, _, extension = member.name.partition(".")
        handle = tar.extractfile(member)
        data = handle.read() if handle else b""
        if len(data) != member.size:
            raise ShardError(f"truncated member {member.name} in {where}")
        if not samples or samples[-1]["__key__"] != key:
            samples.append({"__key__": key})
        samples[-1][extension] = data
    return samples


def write_stats(tar_path: Path, stats: dict[str, Any]) -> None:
    atomic_write_json(stats_path(tar_path), stats)


def read_stats(tar_path: Path) -> dict[str, Any] | None:
    path = stats_path(tar_path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def shard_is_done(tar_path: Path, verify: bool = True) -> bool:
    """True when the stats file exists and (with verify) the tar on disk is the one it describes."""
    stats = read_stats(tar_path)
    if stats is None or not tar_path.exists():
        return False
    if verify and sha256_file(tar_path) != stats.get("sha256"):
        log.warning("shard %s does not match its stats file (truncated or modified): redoing it", tar_path)
        return False
    return True


def list_shards(directory: Path, split: str | None = None) -> list[Path]:
    pattern = f"{split}-*.tar" if split else "*-*.tar"
    return sorted(p for p in directory.glob(pattern) if p.is_file())


def ingest_command(dataset: str) -> str:
    """The command that makes a dataset's base shards (the embedded synth needs no DATA_ROOT)."""
    return f"make ingest DATASET={dataset}" + ("" if dataset == "synth" else " DATA_ROOT=<its folder or annotation file>")


def require_shards(base_dir: Path, split: str | None = None) -> list[Path]:
    """The base shards of `split` (of every split: None) in ``SHARDS_DIR/<dataset>/base``; when there are none,
    FileNotFoundError saying so before any model loads: which splits the dataset has, or, for a dataset with no
    shards at all, which datasets have some and the command that makes them."""
    tars = list_shards(base_dir, split)
    if tars:
        return tars
    dataset, shards_dir = base_dir.parent.name, base_dir.parent.parent
    others = list_shards(base_dir) if split else []
    if others:
        splits = sorted({p.name.rsplit("-", 1)[0] for p in others})
        raise FileNotFoundError(f"dataset {dataset!r} has no {split} shards in {base_dir}; its splits: "
                                f"{', '.join(splits)}")
    have = sorted(p.name for p in shards_dir.iterdir() if list_shards(p / "base")) if shards_dir.is_dir() else []
    elsewhere = f"datasets with shards there: {', '.join(have)}" if have else f"no dataset has shards in {shards_dir}"
    raise FileNotFoundError(f"dataset {dataset!r} has no shards (no {split + '-' if split else ''}*.tar in "
                            f"{base_dir}; {elsewhere}): make them with `{ingest_command(dataset)}`")


def write_sizes(directory: Path) -> dict[str, int]:
    """`sizes.json`: samples per committed shard, as open_clip reads it."""
    sizes = {}
    for tar_path in list_shards(directory):
        stats = read_stats(tar_path)
        if stats is not None:
            sizes[tar_path.name] = int(stats["samples"])
    atomic_write_json(sizes_path(directory), sizes)
    return sizes

