"""Checkpoints: `RUN_DIR/checkpoints/step-NNNNNN/` holds the CLIP as a Hugging Face dir (safetensors, tokenizer,
image processor: `load_clip` reads it) and `state.pt` (optimiser, scheduler, RNG states, step). A checkpoint
is written under a temporary name and renamed, so the newest complete one is always resumable."""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.models import CLIPBundle

log = logging.getLogger(__name__)

PREFIX = "step-"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{PREFIX}{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.pt").exists())
    return done[-1] if done else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    clip: CLIPBundle,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    keep: int,
) -> Path:
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    clip.save(tmp / "clip")
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        },
        tmp / "state.pt",
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _prune(run_dir, keep)
    log.info("checkpoint %s", final)
    return final


def _prune(run_dir: Path, keep: int) -> None:
    done = sorted(p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(PREFIX) and p.suffix != ".tmp")
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, clip: CLIPBundle, optimizer: torch.optim.Optimizer, scheduler: Any) -> int:
    """Restore weights, optimiser, scheduler and RNG states in place; returns the step it was saved at."""
    from safetensors.torch import load_file

    weights = load_file(str(path / "clip" / "model.safetensors"), device=str(clip.device))
    missing, unexpected = clip.model.load_state_dict(weights, strict=False)
    if unexpected or [m for m in missing if "position_ids" not in m]:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")
    state = torch.load(path / "state.pt", map_location=clip.device, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    log.info("resumed from %s (step %d)", path, state["step"])
    return int(state["step"])
