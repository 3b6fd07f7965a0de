"""Every default of training and pretraining, in one place, checked in one place.

Attack budgets follow the attack papers the evaluation uses (Co-Attack, SGA; see docs): an L-inf ball of 2/255
on [0, 1] pixels and one replaced word with top-10 masked-LM candidates. MAT trains with a cheap inner
maximisation: 2 PGD steps of eps/2 from a random start (enough to reach any corner of the ball), the text
attacked first. The step counts, learning rates and batch sizes below are the CPU demo's (small preset,
minutes of training); for ViT-B/16 on a GPU raise the batch size and lower the learning rate (e.g. 1e-5).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.tracking import check_reporters

# "auto": bf16 where the hardware runs it natively, fp32 elsewhere (pipeline.models.resolve_precision).
PRECISIONS = ("auto", "bf16", "fp32")
ORDERS = ("text-first", "image-first", "joint")
# primary: the primary caption per image (1:1; MAT+'s i2t-human then adds the others); all: each human caption
# its own pair (the ALBEF / Co-Attack-style baseline).
CAPTIONS = ("primary", "all")
# none: the evaluation's preprocessing (resize + centre crop); rrc: open_clip's training RandomResizedCrop.
AUGMENTS = ("none", "rrc")
RESUME = ("auto", "latest", "never")
# MAT+ without STAGES trains on the other reference captions: the cheapest cross-modal (I2T) augmentation.
DEFAULT_MATPLUS_STAGES = ("i2t-human",)


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule: AdamW, linear warm-up then cosine decay to `min_lr_ratio * lr`."""

    lr: float = 1e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup: int = 20
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping


@dataclass(frozen=True)
class AttackConfig:
    """Inner maximisation used while training (evaluation has its own, stronger, settings)."""

    eps: float = 2 / 255
    pgd_steps: int = 2
    step_size: float | None = None  # None: eps / 2 (1/255 at 2/255), so the ball's corners stay in reach
    random_start: bool = True
    n_words: int = 1  # BERT-Attack: words replaced per caption
    k: int = 10  # BERT-Attack: masked-LM candidates per position
    order: str = "text-first"  # MAT: text-first (the paper's), image-first, or joint (both from clean inputs)


@dataclass(frozen=True)
class DataConfig:
    """Which shards are streamed and how a pair is drawn from them."""

    split: str = "train"
    # Shard URLs (brace pattern, '::' list, pipe: command; pipeline/core/shard_urls.py) instead of
    # SHARDS_DIR/<dataset>/base/<split>-*.tar; stage shards sit beside them in folders named after the stage.
    urls: str | None = None
    num_samples: int | None = None  # samples in `urls` when no sizes.json lies beside them (logging only)
    stages: tuple[str, ...] = ()  # augmentation stages zipped with the base shards (MAT+)
    filter: str | None = None  # filter manifest: a path, or a name under MANIFESTS_DIR/<dataset>/filters/
    shuffle_buffer: int = 1000
    resampled: bool = True  # draw shards with replacement (open_clip's --dataset-resampled)
    num_workers: int = 2
    captions: str = "primary"  # CAPTIONS
    augment: str = "none"  # AUGMENTS


@dataclass(frozen=True)
class TrainConfig:
    """A fine-tuning run (`make train`). `batch_size` is per process; the global batch is batch_size x world size."""

    mode: str = "mat"
    dataset: str = "synth"
    clip: str | None = None  # HF id or local dir; default MODELS_DIR/<dataset>/clip (made by `make pretrain`)
    mlm: str | None = None  # masked LM for BERT-Attack; default MODELS_DIR/<dataset>/mlm
    steps: int = 150
    batch_size: int = 128
    accum_steps: int = 1
    precision: str = "auto"
    seed: int = 0
    log_every: int = 10
    save_every: int = 50
    keep_checkpoints: int = 2
    # auto: continue from the newest checkpoint of `run_dir` if it has one; latest: reuse the newest
    # RUNS_DIR/<mode>-<dataset>-* run and continue it; never: always start fresh
    resume: str = "auto"
    run_dir: str | None = None  # default RUNS_DIR/<mode>-<dataset>-<YYYYmmdd-HHMMSS>
    device: str = "auto"
    report_to: tuple[str, ...] = ("tensorboard",)  # tensorboard, wandb (pipeline/core/tracking.py); () for none
    wandb_mode: str = "offline"
    optim: OptimConfig = field(default_factory=OptimConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass(frozen=True)
class PretrainConfig:
    """`make pretrain`: a small CLIP and a small BERT masked LM from scratch, standing in for pretrained ones.

    About 6 minutes on 2 CPU cores with the defaults (the small CLIP at ~3.5 steps/s, batch 128).
    """

    dataset: str = "synth"
    clip_preset: str = "small"
    mlm_preset: str = "small"
    vocab_size: int = 1000
    steps: int = 1200
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    mlm_steps: int = 300
    mlm_batch_size: int = 64
    mlm_lr: float = 1e-3
    mask_prob: float = 0.15
    precision: str = "auto"
    seed: int = 0
    num_workers: int = 2
    device: str = "auto"
    report_to: tuple[str, ...] = ("tensorboard",)
    wandb_mode: str = "offline"


def check_train(cfg: TrainConfig, modes: tuple[str, ...]) -> None:
    """Raise ValueError naming the first bad value."""
    if cfg.mode not in modes:
        raise ValueError(f"mode={cfg.mode!r}: choose one of {', '.join(modes)}")
    _check_positive(cfg, ("steps", "batch_size", "accum_steps", "log_every", "save_every", "keep_checkpoints"))
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision={cfg.precision!r}: choose one of {PRECISIONS}")
    if cfg.resume not in RESUME:
        raise ValueError(f"resume={cfg.resume!r}: choose one of {RESUME}")
    if cfg.optim.lr <= 0 or cfg.optim.warmup < 0 or not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise ValueError(f"optim={cfg.optim}: lr must be > 0, warmup >= 0, min_lr_ratio in [0, 1]")
    a = cfg.attack
    if not 0 <= a.eps <= 1 or a.pgd_steps < 0 or (a.step_size is not None and a.step_size < 0):
        raise ValueError(f"attack eps={a.eps}, pgd_steps={a.pgd_steps}, step_size={a.step_size}: out of range")
    if a.order not in ORDERS:
        raise ValueError(f"attack.order={a.order!r}: choose one of {ORDERS}")
    if a.n_words < 1 or a.k < 1:
        raise ValueError(f"attack n_words={a.n_words}, k={a.k}: both must be >= 1")
    if cfg.data.num_workers < 0 or cfg.data.shuffle_buffer < 0:
        raise ValueError(f"data={cfg.data}: num_workers and shuffle_buffer must be >= 0")
    check_data(cfg.data)
    check_reporters(cfg.report_to, cfg.wandb_mode)
    if cfg.mode == "matplus" and not cfg.data.stages:
        raise ValueError("mode='matplus' needs augmentation stages (STAGES=i2t-human,eda,...)")


def check_data(data: DataConfig) -> None:
    """Raise ValueError naming a bad `captions` / `augment`, or captions='all' combined with stages."""
    if data.captions not in CAPTIONS:
        raise ValueError(f"data.captions={data.captions!r}: choose one of {CAPTIONS}")
    if data.augment not in AUGMENTS:
        raise ValueError(f"data.augment={data.augment!r}: choose one of {AUGMENTS}")
    if data.captions == "all" and data.stages:
        raise ValueError(f"data.captions='all' with stages {data.stages}: 'all' is the 1:1 all-captions baseline; "
                         f"one-to-many stages (i2t-human: the other captions) draw from the primary caption")


def check_pretrain(cfg: PretrainConfig) -> None:
    _check_positive(cfg, ("vocab_size", "steps", "batch_size", "mlm_batch_size", "lr", "mlm_lr"))
    if cfg.mlm_steps < 0 or cfg.warmup < 0:
        raise ValueError(f"mlm_steps={cfg.mlm_steps}, warmup={cfg.warmup}: must be >= 0")
    check_reporters(cfg.report_to, cfg.wandb_mode)
    if not 0 < cfg.mask_prob < 1:
        raise ValueError(f"mask_prob={cfg.mask_prob}: must be in (0, 1)")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision={cfg.precision!r}: choose one of {PRECISIONS}")


def _check_positive(cfg: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value <= 0:
            raise ValueError(f"{name}={value!r}: must be > 0")


def resolve_stages(cfg: TrainConfig) -> TrainConfig:
    """MAT+ without explicit stages gets DEFAULT_MATPLUS_STAGES."""
    if cfg.mode == "matplus" and not cfg.data.stages:
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, stages=DEFAULT_MATPLUS_STAGES))
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, payload: dict[str, Any]) -> Any:
    """Rebuild a (nested) config dataclass from `to_dict` output, e.g. a run's config.json."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in payload:
            continue
        value = payload[f.name]
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            value = from_dict(f.default_factory, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def override(cfg: Any, **changes: Any) -> Any:
    """Replace fields by dotted name (`optim.lr`, `attack.eps`); None values are ignored (CLI leaves them unset)."""
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for name, value in changes.items():
        if value is None:
            continue
        head, _, rest = name.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[name] = value
    for head, sub in nested.items():
        flat[head] = override(getattr(cfg, head), **sub)
    return dataclasses.replace(cfg, **flat)
