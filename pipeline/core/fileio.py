"""Files written whole or not at all, and content digests: the two things every writer of the pipeline needs.

A write goes to a new temporary file beside the target (`.<name>.<random>.tmp`, created exclusively, so a link
planted there is never followed), is flushed to disk, recorded in the folder's ledger, then renamed over the
target, so a reader (or a run killed mid-write) never sees half a file. The target is replaced only if it is the
pipeline's own (pipeline/core/ledger.py): a link or a file the ledger does not record raises ForeignFileError.
The temporary file a killed write leaves is what `make clean` and the resumable commands treat as unfinished
(`ledger.is_own_temp`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

from pipeline.core.ledger import check_replaceable, record, temp_path

_DIGEST_MAX = 1 << 20  # the ledger notes digests of small files only; shards have theirs in their stats files


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
    check_replaceable(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        check_replaceable(path)  # again: it may have changed while we wrote
        # Recorded before the rename: a run killed in between leaves a file the ledger already knows as ours.
        small = len(data) <= _DIGEST_MAX
        record(path, size=len(data), sha256=hashlib.sha256(data).hexdigest() if small else None)
        os.replace(tmp, path)
    except BaseException:  # a full disk, a signal: leave no half-written temporary file behind
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    """A CSV file (RFC 4180 quoting, "\\n" line ends): ``None`` as an empty field, floats in full precision."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if value is None else value for value in row] for row in rows])
    atomic_write_text(path, buffer.getvalue())
