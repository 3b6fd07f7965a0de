"""`make train`: wires config, run dir, model, mode, data, optimiser and checkpoints around `loop.fit`.

Run folder RUNS_DIR/<mode>-<dataset>-<YYYYmmdd-HHMMSS>/: config.json (the TrainConfig as run, its stages resolved,
with paths, world size and precision under "resolved"; `train --config <it>` replays it), metrics.csv, tensorboard/,
checkpoints/step-NNNNNN/{clip/, state.pt}, and clip/ (the final model, an HF dir for `load_clip`).
Launch with `torchrun --nproc-per-node N -m pipeline train ...` for DDP (gloo on CPU, nccl on GPU).

A run folder holds one run: resuming it with other settings stops before anything is written, naming each
difference (`--overwrite` removes the run's files and starts afresh; another RUN_DIR keeps both). Only what
does not change what is computed may differ on resume (RESUMABLE_CHANGES: where and how fast it runs, how often
it logs and saves), and `steps`, which may grow: the cosine schedule then decays to the new total from the
resumed step on. config.json is rewritten only once the settings are accepted, so it always describes the run.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipeline.curate.pairs import base_shard_urls
from pipeline.models.device import resolve_precision
from pipeline.models.hf import CLIPBundle, MLMBundle, load_mlm
from pipeline.models.errors import default_model
from pipeline.models.loading import check_model_spec, load_model
from pipeline.core.paths import Layout, plain_name
from pipeline.core.shard_urls import check_stage_urls, dataset_size, expand_urls
from pipeline.core.shards import require_shards
from pipeline.augment.stage import settings_differences
from pipeline.core.config import RESOLVED_KEY, from_dict, save_config, to_dict
from pipeline.train import checkpoints, data
from pipeline.train.config import TrainConfig, resolve_stages
from pipeline.train.distributed import DistEnv, barrier, init_distributed
from pipeline.train.loop import LoopHooks, MetricsLog, cosine_with_warmup, fit, param_groups
from pipeline.train.modes import MODES, DualEncoder, build_mode
from pipeline.core.ledger import foreign, is_recorded, make_dirs, remove_own, remove_own_below

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    model_dir: Path
    history: list[dict[str, float]]
    start_step: int


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def setup_run_dir(cfg: TrainConfig, layout: Layout, env: DistEnv) -> Path:
    """The run folder, agreed on by every rank (rank 0 picks the time stamp)."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    prefix = f"{cfg.mode}-{cfg.dataset}-"
    if cfg.resume == "latest":
        previous = sorted(p for p in layout.runs_dir.glob(prefix + "*") if checkpoints.latest_checkpoint(p))
        if previous:
            return previous[-1]
    name = [prefix + time.strftime("%Y%m%d-%H%M%S")]
    if env.distributed:
        dist.broadcast_object_list(name, src=0)
    return layout.run_dir(name[0])


# Settings that may differ between a run and its resumption (dotted names; `steps` is checked on its own).
RESUMABLE_CHANGES = ("steps", "log_every", "save_every", "keep_checkpoints", "resume", "run_dir", "device",
                     "report_to", "wandb_mode", "data.num_workers", "data.num_samples")
# What a training run writes in its folder: all that --overwrite removes.
RUN_FILES = ("config.json", "metrics.csv", "checkpoints", "clip", "tensorboard", "wandb")


def resume_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the run it continues."""
    settings = to_dict(cfg)
    for name in RESUMABLE_CHANGES:
        *parents, last = name.split(".")
        group = settings
        for parent in parents:
            group = group[parent]
        group.pop(last, None)
    return settings


def _saved_config(path: Path) -> TrainConfig | None:
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): rerun with --overwrite to start the run afresh, "
                         f"or give another RUN_DIR") from error
    payload.pop(RESOLVED_KEY, None)
    return from_dict(TrainConfig, payload, where=str(path))


def check_resume(cfg: TrainConfig, run_dir: Path) -> None:
    """ValueError, naming each difference, when `run_dir` holds a run that `cfg` may not continue."""
    saved = _saved_config(run_dir / "config.json")
    latest = checkpoints.latest_checkpoint(run_dir)
    if saved is None and latest is None:
        return
    how = "Rerun with --overwrite to remove that run and start afresh, or give another RUN_DIR to keep both."
    if cfg.resume == "never":
        raise ValueError(f"{run_dir} holds a training run and resume=never starts afresh. {how}")
    differences = settings_differences(resume_settings(saved) if saved else None, resume_settings(cfg))
    if differences:
        raise ValueError(f"{run_dir} holds a run with other settings ({'; '.join(differences)}). {how}")
    done = int(latest.name.removeprefix(checkpoints.PREFIX)) if latest else 0
    if cfg.steps < done:
        raise ValueError(f"steps={cfg.steps}: {run_dir} has already trained {done} steps (steps may only grow on "
                         f"resume). {how}")


def remove_run(run_dir: Path) -> None:
    """Remove what a training run wrote in `run_dir` (RUN_FILES its ledgers record), and nothing else; a file of
    someone else's in there stops it (ForeignFileError, naming the file)."""
    for name in RUN_FILES:
        path = run_dir / name
        if is_recorded(path):
            remove_own(path)
        elif path.is_dir() and not path.is_symlink():  # a folder the pipeline made and filled (checkpoints/)
            _, kept = remove_own_below(path)
            if kept:
                raise foreign(kept[0], "leave behind in a run it starts afresh")
            if path.exists():
                raise foreign(path, "remove")
        elif path.exists() or path.is_symlink():
            raise foreign(path, "remove")
        else:
            continue
        log.info("--overwrite: removed %s", path)


def model_specs(cfg: TrainConfig, layout: Layout) -> tuple[str, str | None]:
    """The CLIP and the masked LM (None when the mode attacks no text) of a run, checked before its folder is made:
    a default MODELS_DIR/<dataset>/... that `make pretrain` has not made, or a named folder that is not there, is
    an error naming it."""
    clip = cfg.clip or default_model(layout.model_dir(cfg.dataset, "clip"), "CLIP", cfg.dataset, "CLIP")
    mlm = None
    if "mlm" in MODES.get(cfg.mode).needs:
        mlm = cfg.mlm or default_model(layout.model_dir(cfg.dataset, "mlm"), "masked LM", cfg.dataset, "MLM")
    return check_model_spec(clip), check_model_spec(mlm) if mlm else None


def load_models(cfg: TrainConfig, layout: Layout, env: DistEnv) -> tuple[CLIPBundle, MLMBundle | None]:
    clip_spec, mlm_spec = model_specs(cfg, layout)
    clip = load_model(clip_spec, device=env.device)
    mlm = load_mlm(mlm_spec, device=env.device) if mlm_spec else None
    return clip, mlm


def load_keep_fn(cfg: TrainConfig, layout: Layout):
    """The filter's `keeps(stage, key, variant_index)`, or None when no filter is given."""
    if not cfg.data.filter:
        return None
    from pipeline.curate.filters import find_filter, load_filter

    path = find_filter(cfg.data.filter, cfg.dataset, layout)
    return load_filter(path).keeps


def _isolated_rng(batches: Iterator[Any]) -> Iterator[Any]:
    """Batches drawn without touching the global random states (the DataLoader draws its base seed from the
    CPU generator when an iterator starts), so the model's random draws do not depend on where a run resumed."""
    while True:
        with torch.random.fork_rng(devices=[]):
            python, numpy = random.getstate(), np.random.get_state()
            batch = next(batches)
            random.setstate(python)
            np.random.set_state(numpy)
        yield batch


def build_batches(cfg: TrainConfig, layout: Layout, image_size: int, seed: int, skip: int = 0) -> Iterator[Any]:
    """The endless batch stream of this rank; `skip` batches already consumed are drawn and dropped, so a resumed
    run continues the same order (a cost of one data pass over them, no training)."""
    for stage in cfg.data.stages:
        plain_name(stage, "stage")
    if cfg.data.urls:
        urls = expand_urls(cfg.data.urls)
        check_stage_urls(urls, cfg.data.stages)
    else:
        urls = base_shard_urls(layout.base_dir(cfg.dataset), cfg.data.split, cfg.data.stages)
    size = dataset_size(urls, cfg.data.num_samples)
    log.info("training data: %d shards, %s samples", len(urls), size if size is not None else "unknown (no sizes.json)")
    pipeline = data.build_pipeline(
        urls, batch_size=cfg.batch_size, image_size=image_size, stages=cfg.data.stages,
        keep=load_keep_fn(cfg, layout), shuffle_buffer=cfg.data.shuffle_buffer,
        resampled=cfg.data.resampled, seed=seed, captions=cfg.data.captions, augment=cfg.data.augment,
    )
    batches = _isolated_rng(data.endless(data.build_loader(pipeline, cfg.data.num_workers)))
    if skip:
        log.info("fast-forwarding the data stream over the %d batches already trained on", skip)
        for _ in range(skip):
            next(batches)
    return batches


def train(cfg: TrainConfig, layout: Layout | None = None, overwrite: bool = False) -> RunResult:
    """Train, or resume the run in the run dir (same settings); `overwrite` first removes a run found there."""
    # 1. Resolve (the config validated itself when built).
    cfg = resolve_stages(cfg)
    layout = layout or Layout.from_env()
    if not cfg.data.urls:  # the data and the models first: a run folder is made only for a run that can start
        require_shards(layout.base_dir(cfg.dataset), cfg.data.split)
    model_specs(cfg, layout)
    env = init_distributed(cfg.device)
    seed_everything(cfg.seed, env.rank)
    precision = resolve_precision(cfg.precision, env.device)
    run_dir = setup_run_dir(cfg, layout, env)
    if not overwrite:
        check_resume(cfg, run_dir)
    barrier()  # every rank has read the old config.json before rank 0 replaces it
    if env.is_main:
        if overwrite:
            remove_run(run_dir)
        make_dirs(run_dir)
        save_config(cfg, run_dir / "config.json", resolved={"paths": {k: str(v) for k, v in vars(layout).items()},
                                                            "world_size": env.world_size, "precision_resolved": precision})
    barrier()  # the old run is gone (overwrite) before any rank looks for its checkpoints
    # 2. Model, mode (it freezes what it does not train), DDP.
    clip, mlm = load_models(cfg, layout, env)
    mode = build_mode(cfg, clip, mlm)
    mode.prepare(clip.model)
    net: torch.nn.Module = DualEncoder(clip)
    if env.distributed:
        net = DistributedDataParallel(net, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    # 3. Optimiser, schedule, resume.
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(clip.model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    scheduler = cosine_with_warmup(optimizer, o.warmup, cfg.steps, o.min_lr_ratio)
    start_step, data_state = 0, {"seed": cfg.seed, "batches": 0}
    state = checkpoints.load_latest(run_dir, clip, optimizer, scheduler, env.rank, env.world_size)
    if state is not None:
        start_step = int(state["step"])
        # Same world size: continue the same stream where it stopped; otherwise a fresh stream for the new ranks.
        data_state = state["data"] or {"seed": cfg.seed + start_step, "batches": 0}
    # 4. Data.
    batches = build_batches(cfg, layout, clip.image_size, seed=data_state["seed"], skip=data_state["batches"])
    # 5. Train.
    metrics = MetricsLog(run_dir, enabled=env.is_main, report_to=cfg.report_to, config=to_dict(cfg),
                         wandb_mode=cfg.wandb_mode)

    def save(step: int) -> None:
        rng = checkpoints.gather_rng_states()
        position = {"seed": data_state["seed"], "batches": data_state["batches"] + (step - start_step) * cfg.accum_steps}
        if env.is_main:
            checkpoints.save_checkpoint(run_dir, step, clip, optimizer, scheduler, cfg.keep_checkpoints, rng, position)
        barrier()

    history = fit(net, mode, optimizer, scheduler, batches, env=env, start_step=start_step, steps=cfg.steps,
                  accum_steps=cfg.accum_steps, bf16=precision == "bf16", grad_clip=o.grad_clip,
                  log_every=cfg.log_every, save_every=cfg.save_every, hooks=LoopHooks(log=metrics, checkpoint=save))
    metrics.close()
    # 6. The final model where eval looks for it.
    model_dir = run_dir / "clip"
    if env.is_main:
        clip.save(model_dir)
        log.info("trained %s: %s", cfg.mode, model_dir)
    barrier()
    return RunResult(run_dir=run_dir, model_dir=model_dir, history=history, start_step=start_step)


