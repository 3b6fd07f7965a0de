"""Shard URL lists, as open_clip's ``--train-data`` takes them: brace patterns, ``::``-joined lists, ``pipe:``.

A spec such as ``/data/coco/base/train-{000000..000226}.tar``, ``a.tar::b.tar`` or
``pipe:cat /data/coco/base/train-000000.tar`` is expanded by webdataset's own ``expand_urls`` (``::`` split,
``WDS_`` variables, braces). Local paths are checked at once, so a pattern that matches nothing or a shard missing
from the middle of one is a clear error naming it, not a silent short epoch. Other URLs (``pipe:``, ``s3://`` via
``pipe:aws s3 cp ...``, ``http(s)://``) are opened by webdataset's ``gopen`` when read.

A stage's shards sit beside the base ones: the ``base`` folder of each URL is replaced by the stage's name
(``.../coco/base/train-000003.tar`` -> ``.../coco/eda/train-000003.tar``), the layout ``make augment`` writes.
Sizes come from ``sizes.json`` beside local shards (the file open_clip reads), or from ``num_samples``.

Readers that need to know whether a shard changed (the stage runner's resume, the scorer's reference cache) take
its :func:`fingerprint`: for a local shard with its stats file beside it (what ``make ingest`` writes), the sha256
and keys recorded there, as for the dataset folder; for any other shard (a remote URL, a local tar without a stats
file) the sha256 of the bytes as read and the keys found in them. A ``pipe:`` command names how to read the tar,
not where its stats file is, so guessing a second command for that file would be unsound; hashing what is read
costs one more read of each remote shard, and gives the value a stats file would hold, so a run from
``pipe:cat <local tar>`` records the same fingerprints as one from the path.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.fileio import sha256_file
from pipeline.core.lazy import lazy_module
from pipeline.core.paths import plain_name, sizes_path
from pipeline.core.shards import ShardError, read_stats, read_tar, read_tar_bytes

wds = lazy_module("webdataset")  # imports torch: loaded on first use, not by the CLI's settings

BASE_FOLDER = "base"
_BASE_SEGMENT = re.compile(rf"(?<=/){BASE_FOLDER}(?=/[^/\s]+\.tar\b)")
_REMOTE = ("pipe:", "http://", "https://", "s3://", "gs://")
_TAR_NAME = re.compile(r"[^/\s'\"=:]+\.tar(?=$|[\s'\"?#|;&)])")
_BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")


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
    return read_shard(url)[0]


def read_shard(url: str) -> tuple[list[dict[str, Any]], str]:
    """:func:`read_url`, with the sha256 of the shard read. A local shard whose bytes no longer match the sha256
    its stats file recorded (an image corrupted in place, same size) is a ShardError naming it: the shard was
    just read whole, so hashing it is cheap next to what its reader does with it."""
    if is_local(url):
        path = Path(url).expanduser()
        samples = read_tar(path)
        recorded, actual = (read_stats(path) or {}).get("sha256"), sha256_file(path)
        if recorded and recorded != actual:
            raise ShardError(f"shard {path} does not match the sha256 its stats file recorded: it changed after it "
                             "was written; rerun the command that wrote it")
        return samples, actual
    data = _fetch(url)
    return read_tar_bytes(data, url), hashlib.sha256(data).hexdigest()


def _fetch(url: str) -> bytes:
    try:
        with wds.gopen(url, "rb") as stream:
            return stream.read()
    except Exception as error:  # gopen raises OSError / IOError subclasses, a pipe its exit status: one message
        raise ShardError(f"cannot read shard {url!r}: {error}") from error


def is_url_spec(value: str) -> bool:
    """Whether a DATA_ROOT-style value is a shard URL spec (remote, '::' list, brace pattern), not an existing path."""
    if Path(value).expanduser().exists():
        return False
    return value.strip().startswith(_REMOTE) or "::" in value or _BRACES.search(value) is not None


def path_or_spec(value: str | Path | None) -> Path | str | None:
    """A path as a Path, a shard URL spec as the string given (a Path would fold the '//' of 's3://')."""
    if value is None or isinstance(value, Path):
        return value
    return value if is_url_spec(value) else Path(value)


def shard_file_name(url: str) -> str:
    """The file name of the shard a URL reads (``train-000003.tar``): a path's last part, or the one ``.tar``
    name in a URL or ``pipe:`` command; outputs aligned with the shard are named after it."""
    names = [Path(url).expanduser().name] if is_local(url) else list(dict.fromkeys(_TAR_NAME.findall(url)))
    if len(names) != 1 or not names[0].endswith(".tar"):
        raise ValueError(f"cannot tell the shard name of {url!r}: it must name exactly one <name>.tar "
                         f"({'found ' + ', '.join(names) if names else 'found none'})")
    return plain_name(names[0], "shard name")


@dataclass(frozen=True)
class Fingerprint:
    """What a shard is: its URL, file name, sha256 and sample keys in order (see the module docstring)."""

    url: str
    name: str
    sha256: str
    keys: tuple[str, ...]


def fingerprint(url: str) -> Fingerprint:
    """A local shard's stats file's sha256 and keys, else those of the bytes read (streamed, not held)."""
    name = shard_file_name(url)
    if is_local(url):
        stats = read_stats(Path(url).expanduser())
        if stats is not None and stats.get("sha256") and "keys" in stats:
            return Fingerprint(url, name, stats["sha256"], tuple(stats["keys"]))
    digest, keys = hashlib.sha256(), []
    try:
        with wds.gopen(url if not is_local(url) else str(Path(url).expanduser()), "rb") as stream:
            hashing = _Hashing(stream, digest)
            with tarfile.open(fileobj=hashing, mode="r|") as tar:
                for member in tar:
                    key = member.name.partition(".")[0]
                    if member.isfile() and (not keys or keys[-1] != key):
                        keys.append(key)
            while hashing.read(1 << 20):  # the end-of-archive padding tarfile does not read
                pass
    except Exception as error:
        raise ShardError(f"cannot read shard {url!r}: {error}") from error
    return Fingerprint(url, name, digest.hexdigest(), tuple(keys))


class _Hashing:
    """A read-only stream hashing every byte read through it."""

    def __init__(self, stream: Any, digest: Any) -> None:
        self.stream, self.digest = stream, digest

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data


def base_fingerprints(spec: str) -> list[Fingerprint]:
    """The fingerprints of a base URL spec's shards (stage outputs are named after them, so names must differ)."""
    urls = expand_urls(spec)
    names = [shard_file_name(url) for url in urls]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"shard URL spec {spec!r} names {', '.join(repeated)} more than once: the stage shards "
                         "aligned with them would be one file")
    return [fingerprint(url) for url in urls]


def stage_urls(base_urls: list[str], stage: str) -> list[str]:
    """The stage's shards aligned with the base URLs, checked to exist where local."""
    check_stage_urls(base_urls, (stage,))
    return [stage_url(url, stage) for url in base_urls]


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
