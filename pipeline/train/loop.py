"""The training loop, apart from the wiring: steps, accumulation, bf16 autocast, schedule, logging hooks."""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from pipeline.models.device import autocast
from pipeline.core.tracking import Tracker
from pipeline.train.distributed import DistEnv, all_reduce_mean
from pipeline.train.modes import Mode
from pipeline.core.ledger import claim_file

log = logging.getLogger(__name__)


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio` of the base rate at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on biases, norms, embeddings' scale or the logit scale (open_clip)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "logit_scale" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


#: CLIP's bound on the learned log temperature: exp(logit_scale) <= 100 (open_clip src/open_clip_train/train.py
#: clamps the parameter in place to [0, ln 100] after every optimiser step, "as in the original paper").
LOGIT_SCALE_MAX = math.log(100)


@torch.no_grad()
def clamp_logit_scale(model: nn.Module) -> None:
    """Clamp every ``logit_scale`` parameter of `model` (DDP-wrapped or not) to [0, ln 100], in place."""
    for name, param in model.named_parameters():
        if name.split(".")[-1] == "logit_scale":
            param.clamp_(0, LOGIT_SCALE_MAX)


class MetricsLog:
    """metrics.csv in the run dir, plus the trackers of ``report_to`` (TensorBoard, W&B; rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool = True, report_to: tuple[str, ...] = ("tensorboard",),
                 config: dict[str, Any] | None = None, wandb_mode: str = "offline"):
        self.enabled = enabled
        self.path = run_dir / "metrics.csv"
        self._tracker = Tracker(run_dir, report_to, config or {}, name=run_dir.name, wandb_mode=wandb_mode,
                                enabled=enabled)

    def __call__(self, step: int, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        new = not self.path.exists()
        if new:
            claim_file(self.path)
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["step", *row])
            if new:
                writer.writeheader()
            writer.writerow({"step": step, **row})
        self._tracker.log(step, row, prefix="train")

    def close(self) -> None:
        self._tracker.close()


@dataclass
class LoopHooks:
    log: Callable[[int, dict[str, float]], None] = lambda step, row: None
    checkpoint: Callable[[int], None] = lambda step: None
    history: list[dict[str, float]] = field(default_factory=list)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_step(
    net: nn.Module, mode: Mode, micro_batches: list[dict[str, Any]], bf16: bool, device: torch.device
) -> dict[str, float]:
    """Forward/backward over the micro-batches (gradients averaged); the caller steps the optimiser."""
    sums: dict[str, float] = {}
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            with autocast(device, "bf16" if bf16 else "fp32"):
                terms = mode(net, _to_device(batch, device))
            loss = sum(terms.values()) / len(micro_batches)
            loss.backward()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach()) / len(micro_batches)
        for name, seconds in mode.timings.items():
            sums[f"{name}_s"] = sums.get(f"{name}_s", 0.0) + seconds
    sums["loss"] = sum(v for k, v in sums.items() if not k.endswith("_s"))
    return sums


class NonFiniteLoss(ValueError):
    """The loss or the gradients became NaN or infinite: training stops before the optimiser steps."""


def _check_finite(step: int, row: dict[str, float], grad_norm: float | None) -> None:
    """Stop (every rank alike: the loss is averaged over ranks) before a non-finite step reaches the weights, so
    no checkpoint or final model is ever written from them."""
    loss = float(all_reduce_mean(torch.tensor(row["loss"])))
    if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
        return
    terms = ", ".join(f"{k}={v:.4g}" for k, v in row.items() if not k.endswith("_s") and k != "loss")
    raise NonFiniteLoss(
        f"step {step}: the loss became non-finite (loss={loss}, gradient norm={grad_norm}; {terms}): training "
        f"stopped, its checkpoints (all from finite steps) are kept. Lower the learning rate (LR) or use "
        f"PRECISION=fp32 and start afresh (--overwrite, or another RUN_DIR)")


def fit(
    net: nn.Module,
    mode: Mode,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterator[dict[str, Any]],
    *,
    env: DistEnv,
    start_step: int,
    steps: int,
    accum_steps: int,
    bf16: bool,
    grad_clip: float,
    log_every: int,
    save_every: int,
    hooks: LoopHooks,
) -> list[dict[str, float]]:
    """Run optimiser steps start_step+1 .. steps; returns the logged rows."""
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    bar = tqdm(range(start_step, steps), initial=start_step, total=steps, disable=not env.is_main, desc=mode.name)
    window: dict[str, float] = {}
    window_steps, window_samples, window_data, window_start = 0, 0, 0.0, time.perf_counter()
    for step in bar:
        fetch = time.perf_counter()
        micro = [next(batches) for _ in range(accum_steps)]
        window_data += time.perf_counter() - fetch
        optimizer.zero_grad(set_to_none=True)
        row = train_step(net, mode, micro, bf16, env.device)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip)) if grad_clip > 0 else None
        _check_finite(step + 1, row, grad_norm)
        optimizer.step()
        clamp_logit_scale(net)
        scheduler.step()
        for name, value in row.items():
            window[name] = window.get(name, 0.0) + value
        window_steps += 1
        window_samples += sum(len(b["texts"]) for b in micro) * env.world_size
        done = step + 1
        if done % log_every == 0 or done == steps:
            elapsed = time.perf_counter() - window_start
            means = {k: v / window_steps for k, v in window.items()}
            means["loss"] = float(all_reduce_mean(torch.tensor(means["loss"])))
            means.update(lr=scheduler.get_last_lr()[0], samples_per_s=window_samples / elapsed,
                         data_s=window_data / window_steps)
            hooks.history.append({"step": done, **means})
            hooks.log(done, means)
            bar.set_postfix(loss=f"{means['loss']:.4f}", samples_s=f"{means['samples_per_s']:.0f}")
            window, window_steps, window_samples, window_data = {}, 0, 0, 0.0
            window_start = time.perf_counter()
        if done % save_every == 0 or done == steps:
            hooks.checkpoint(done)
    bar.close()
    return hooks.history
