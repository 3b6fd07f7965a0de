"""Files written whole or not at all, and content digests: the two things every writer of the pipeline needs.

A write goes to ``<name>.tmp`` beside the target, is flushed to disk, then renamed over the target, so a reader
(or a run killed mid-write) never sees half a file; the ``.tmp`` left by a killed write is what `make clean`
and the resumable commands treat as unfinished.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def sha256_file(path: Path) -> str:
    return sha256_files([path])


def sha256_files(paths: list[Path]) -> str:
    """The sha256 of the files' contents one after the other (one file: its own digest)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a signal: leave no half-written .tmp behind
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(payload, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode())


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode())
