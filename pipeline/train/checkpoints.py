"""Checkpoints: `RUN_DIR/checkpoints/step-NNNNNN/` holds the CLIP as a Hugging Face dir (safetensors, tokenizer,
image processor: `load_clip` reads it) and `state.pt`: optimiser, scheduler, step, the data position and every
random state a resumed run needs (CPU, CUDA when used, numpy and Python `random`), one set per rank.

A checkpoint is written into a new temporary folder (`.step-NNNNNN.<random>.tmp`, created exclusively) and
renamed, so the newest complete one is always resumable; it replaces or prunes only checkpoints the folder's
ledger records (pipeline/core/ledger.py). One whose files are unreadable all the same (a truncated or empty
`state.pt` from a full disk or a copy cut short) is skipped with a warning, and the run resumes from the previous
one (:func:`load_latest`).
`state.pt` holds tensors and plain values only and is read with `torch.load(weights_only=True)`: a run folder
from elsewhere (RUN_DIR, RESUME=latest) cannot run code when it is resumed.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.core import ledger
from pipeline.models.hf import CLIPBundle

log = logging.getLogger(__name__)

PREFIX = "step-"
TMP_SUFFIX = ".tmp"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{PREFIX}{step:06d}"


def _complete(path: Path) -> bool:
    return path.name.startswith(PREFIX) and not path.name.endswith(TMP_SUFFIX) and (path / "state.pt").exists()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The finished checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    return sorted(p for p in root.iterdir() if _complete(p)) if root.is_dir() else []


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def rng_state() -> dict[str, Any]:
    """This process's random states as tensors and plain values (what weights_only loading accepts)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's random states, in rank order (a collective: every rank calls it)."""
    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def save_checkpoint(
    run_dir: Path,
    step: int,
    clip: CLIPBundle,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    keep: int,
    rng: list[dict[str, Any]],
    data_state: dict[str, int],
) -> Path:
    """Write the checkpoint of `step` (rank 0): `rng` is `gather_rng_states()`, `data_state` the loader position."""
    final = checkpoint_dir(run_dir, step)
    ledger.check_replaceable(final)
    tmp = ledger.temp_path(final, directory=True)
    clip.save(tmp / "clip")
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
             "data": data_state}
    torch.save(state, tmp / "state.pt")
    ledger.check_replaceable(final)
    ledger.record(final, tree=True)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _prune(run_dir, keep)
    log.info("checkpoint %s", final)
    return final


def _prune(run_dir: Path, keep: int) -> None:
    for old in complete_checkpoints(run_dir)[:-keep]:
        if ledger.is_recorded(old):  # one of an earlier version, unrecorded, stays
            ledger.remove_own(old)
    ledger.remove_own_temps(run_dir / "checkpoints")  # left by a killed write


class UnreadableCheckpoint(ValueError):
    """A checkpoint file is truncated or empty."""


def read_state(path: Path) -> dict[str, Any]:
    """`state.pt` of a checkpoint dir, loaded with weights_only=True; ValueError if it holds anything else,
    UnreadableCheckpoint if it is truncated or empty."""
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"refusing to load {path / 'state.pt'}: it holds objects other than tensors and plain values "
            f"(weights_only=True; an older or foreign checkpoint?): {str(error).splitlines()[0]}"
        ) from error
    except (EOFError, RuntimeError) as error:  # torch.load: EOFError when empty, RuntimeError (zip) when truncated
        raise UnreadableCheckpoint(f"{path / 'state.pt'} is unreadable (truncated or empty): "
                                   f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error


def _read_weights(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = path / "clip" / "model.safetensors"
    try:
        return load_file(str(file), device=str(device))
    except (SafetensorError, FileNotFoundError) as error:
        raise UnreadableCheckpoint(f"{file} is unreadable: {error}") from error


def load_checkpoint(
    path: Path, clip: CLIPBundle, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int = 0, world_size: int = 1
) -> dict[str, Any]:
    """Restore weights, optimiser, scheduler and this rank's random states in place; return the state.

    The returned dict holds `step` and `data` (the loader position to fast-forward to). Resuming with another
    world size restores no random state and no data position (the run cannot be the same one): a warning says so.
    """
    state = read_state(path)
    weights = _read_weights(path, clip.device)
    missing, unexpected = clip.model.load_state_dict(weights, strict=False)
    if unexpected or [m for m in missing if "position_ids" not in m]:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if len(state["rng"]) == world_size:
        set_rng_state(state["rng"][rank])
    else:
        log.warning("%s was saved by %d process(es), resuming with %d: random states and data order start afresh "
                    "(the resumed run differs from an uninterrupted one)", path, len(state["rng"]), world_size)
        state["data"] = None
    log.info("resumed from %s (step %d)", path, state["step"])
    return state


def load_latest(
    run_dir: Path, clip: CLIPBundle, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int = 0,
    world_size: int = 1
) -> dict[str, Any] | None:
    """`load_checkpoint` of the newest readable checkpoint of the run (None when it has none): a newer one whose
    files are unreadable is skipped with a warning; ValueError when every one is unreadable."""
    done = complete_checkpoints(run_dir)
    unreadable = []
    for path in reversed(done):
        try:
            return load_checkpoint(path, clip, optimizer, scheduler, rank, world_size)
        except UnreadableCheckpoint as error:
            unreadable.append(str(error))
            log.warning("%s; falling back to the previous checkpoint", error)
    if unreadable:
        raise ValueError(f"no readable checkpoint in {run_dir / 'checkpoints'} ({'; '.join(unreadable)}): rerun "
                         f"with --overwrite to start the run afresh, or give another RUN_DIR")
    return None
