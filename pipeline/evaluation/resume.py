"""Resumable evaluation: the finished batches and attacks of an evaluation, stored as it goes.

``MANIFESTS_DIR/<dataset>/evals/partial/`` holds, for an evaluation ``<name>`` whose settings hash to
``<fp>`` (the first 16 hex digits of :func:`fingerprint`):

- ``<name>.<fp>.<attack>.bNNNNNN.json``: batch NNNNNN under the attack: its adversarial image and caption
  embeddings (float32, base64, exact) and the seconds it took;
- ``<name>.<fp>.<attack>.r<R>of<W>.bNNNNNN.json``: the same, attacked by rank R of an evaluation run by W
  processes (``torchrun``; W > 1: a single process names its files as above, which reads as rank 0 of 1);
- ``<name>.<fp>.<attack>.done.json``: the attack's finished result row (its batch files are then removed).

Every file is written atomically (``atomic_write_json``: a temporary file, then a rename), so a process killed
at any moment leaves whole files only. A rerun with the same settings takes the finished attacks' rows and the
finished batches as they are and attacks only the rest; the final result is the one an uninterrupted run gives,
because each batch's attack depends on nothing but the settings and the batch index (its seed is derived from
the evaluation seed and the index). Batch indices are global (batch i holds the same images whatever the number
of processes), and each rank reads back only the files of its own rank and world size. Batch files of another
world size are not used: :meth:`PartialStore.other_world_sizes` finds them, and the evaluation refuses to start
until the command is rerun with that number of processes or they are removed. A done row holds no rank: any
world size takes it. Files of the same evaluation name under another fingerprint are stale: they are removed
when the evaluation starts. The evaluation removes its own files once its JSON is written.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from pipeline.core.fileio import atomic_write_json, sha256_file
from pipeline.core.ledger import own_temps, remove_own

log = logging.getLogger(__name__)

_FILE = re.compile(r"(?P<name>.+)\.(?P<fp>[0-9a-f]{16})\.(?P<attack>[A-Za-z0-9_]+)"
                   r"(?:\.r(?P<rank>\d+)of(?P<world>\d+))?\.(?P<part>b\d{6}|done)\.json")


def _rank_world(m: re.Match[str]) -> tuple[int, int]:
    """(rank, world size) of a batch file's name: (0, 1) when it names none (a single process wrote it)."""
    return (int(m["rank"]), int(m["world"])) if m["world"] else (0, 1)


def fingerprint(settings: dict[str, Any]) -> str:
    """sha256 of the settings as canonical JSON (keys sorted)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def model_stamp(model: str) -> str:
    """A local model folder: sha256 over its files' names and contents; anything else (a hub id): the id."""
    path = Path(model)
    if not path.is_dir():
        return model
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\0".encode())
    return digest.hexdigest()


def _encode(tensor: torch.Tensor) -> dict[str, Any]:
    tensor = tensor.detach().float().cpu().contiguous()
    return {"shape": list(tensor.shape), "float32": base64.b64encode(tensor.numpy().tobytes()).decode("ascii")}


def _decode(blob: dict[str, Any]) -> torch.Tensor:
    data = bytearray(base64.b64decode(blob["float32"]))
    return torch.frombuffer(data, dtype=torch.float32).reshape(blob["shape"]) if data else torch.empty(blob["shape"])


class PartialStore:
    """The partial results of one evaluation (name + settings fingerprint) in ``folder``, as rank ``rank`` of
    ``world_size`` processes sees them: it reads and writes the batch files of its own rank and world size."""

    def __init__(self, folder: Path, name: str, settings_fingerprint: str, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of {world_size} processes")
        self.folder, self.name, self.fp = folder, name, settings_fingerprint[:16]
        self.rank, self.world_size = rank, world_size

    def _files(self) -> list[tuple[Path, re.Match[str]]]:
        if not self.folder.is_dir():
            return []
        matches = ((p, _FILE.fullmatch(p.name)) for p in sorted(self.folder.iterdir()))
        return [(p, m) for p, m in matches if m is not None and m["name"] == self.name]

    def _path(self, attack: str, part: str) -> Path:
        return self.folder / f"{self.name}.{self.fp}.{attack}.{part}.json"

    def _batch_path(self, attack: str, index: int) -> Path:
        ranked = "" if self.world_size == 1 else f"r{self.rank}of{self.world_size}."
        return self._path(attack, f"{ranked}b{index:06d}")

    def _own_batch(self, m: re.Match[str]) -> bool:
        return m["fp"] == self.fp and m["part"] != "done" and _rank_world(m) == (self.rank, self.world_size)

    def drop_stale(self) -> None:
        """Remove this evaluation name's files made under other settings."""
        stale = [p for p, m in self._files() if m["fp"] != self.fp]
        for path in stale:
            remove_own(path)
        if stale:
            log.info("removed %d partial results of %s made with other settings", len(stale), self.name)

    def other_world_sizes(self) -> dict[int, list[Path]]:
        """{world size: its batch files} of this evaluation's batches (these settings) stored by a run with
        another number of processes: files this run does not read."""
        found: dict[int, list[Path]] = {}
        for path, m in self._files():
            world = _rank_world(m)[1]
            if m["fp"] == self.fp and m["part"] != "done" and world != self.world_size:
                found.setdefault(world, []).append(path)
        return found

    def batch_patterns(self, paths: list[Path]) -> list[str]:
        """Shell globs that match these batch files of this evaluation and no other file."""
        patterns = set()
        for path in paths:
            m = _FILE.fullmatch(path.name)
            if m is not None:
                ranked = "" if m["world"] is None else f"r*of{m['world']}."
                patterns.add(str(self.folder / f"{self.name}.{self.fp}.{m['attack']}.{ranked}b??????.json"))
        return sorted(patterns)

    def load_batch(self, attack: str, index: int) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(image embeddings, caption embeddings, seconds) of a finished batch, or None."""
        path = self._batch_path(attack, index)
        if not path.is_file():
            return None
        blob = json.loads(path.read_text())
        return _decode(blob["image"]), _decode(blob["text"]), float(blob["seconds"])

    def save_batch(self, attack: str, index: int, image_emb: torch.Tensor, text_emb: torch.Tensor,
                   seconds: float) -> None:
        atomic_write_json(self._batch_path(attack, index), {
            "attack": attack, "batch": index, "seconds": seconds,
            "image": _encode(image_emb), "text": _encode(text_emb)})

    def finished(self, attack: str) -> dict[str, Any] | None:
        """The result row of an attack that finished under these settings, or None."""
        path = self._path(attack, "done")
        return json.loads(path.read_text())["row"] if path.is_file() else None

    def finish(self, attack: str, row: dict[str, Any]) -> None:
        """Store the attack's row, then drop this rank's batch files of it (the row is all a rerun needs; the
        other ranks drop theirs with :meth:`drop_batches` once the row is stored)."""
        atomic_write_json(self._path(attack, "done"), {"attack": attack, "row": row})
        self.drop_batches(attack)

    def drop_batches(self, attack: str) -> None:
        """Remove this rank's batch files of an attack (these settings, this world size)."""
        for path, m in self._files():
            if m["attack"] == attack and self._own_batch(m):
                remove_own(path)

    def remove(self) -> None:
        """Remove every file of this evaluation. The folder stays (`make clean` removes it): evaluations running
        at once (the study's Ray tasks) share it, and one removing it as another writes its first file there
        would fail the other."""
        for path, _ in self._files():
            remove_own(path)
        for tmp in own_temps(self.folder):
            if tmp.name.startswith(f".{self.name}.{self.fp}."):
                tmp.unlink()
