"""Every default of training and pretraining, in one place; each config checks itself when built
(pipeline/core/config.py: ``--config FILE`` and ``--set a.b=c`` reach every field).

Attack budgets follow the attack papers the evaluation uses (Co-Attack, SGA; see docs): an L-inf ball of 2/255
on [0, 1] pixels and one replaced word with top-10 masked-LM candidates. MAT trains with a cheap inner
maximisation: 2 PGD steps of eps/2 from a random start (enough to reach any corner of the ball), the text
attacked first. The attacks are the evaluation's own classes (``attack.image``: :class:`PGD`, ``attack.text``:
:class:`BERTAttack`, the reference variant: the paper trains with BERT-Attack), so every setting of theirs is a
training option too (``--set attack.text.variant=fast`` restores the earlier always-replace attack). The step counts,
learning rates and batch sizes below are the CPU demo's (small preset, minutes of training); for ViT-B/16 on a
GPU raise the batch size and lower the learning rate (e.g. 1e-5).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pipeline.train.registry import MODES
from pipeline.attacks.bert_attack import BERTAttack
from pipeline.attacks.pgd import PGD
from pipeline.core.config import check_choice, check_device, check_non_negative, check_positive, check_range
from pipeline.core.paths import plain_name
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

    def __post_init__(self) -> None:
        check_positive(self, "lr")
        check_non_negative(self, "warmup")
        check_range("optim.min_lr_ratio", self.min_lr_ratio, 0, 1)


def training_pgd() -> PGD:
    """Training's PGD: 2 steps of eps / 2 (1/255 at 2/255) from a random start, so the ball's corners stay in
    reach; ``step_size`` fixes the step instead."""
    return PGD(steps=2, step_ratio=0.5)


def training_bert_attack() -> BERTAttack:
    """Training's BERT-Attack: the evaluation's reference decisions (1 word, top-10 candidates, the original kept
    when no candidate lowers the similarity, words of several pieces attacked through their combinations)."""
    return BERTAttack()


@dataclass(frozen=True)
class TrainAttackConfig:
    """Inner maximisation used while training (evaluation has its own, stronger, settings)."""

    image: PGD = field(default_factory=training_pgd)
    text: BERTAttack = field(default_factory=training_bert_attack)
    order: str = "text-first"  # MAT: text-first (the paper's), image-first, or joint (both from clean inputs)

    def __post_init__(self) -> None:
        check_range("attack.image.eps", self.image.eps, 0, 1)
        check_choice("attack.order", self.order, ORDERS)


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

    def __post_init__(self) -> None:
        plain_name(self.split, "data.split")
        check_choice("data.captions", self.captions, CAPTIONS)
        check_choice("data.augment", self.augment, AUGMENTS)
        check_non_negative(self, "num_workers", "shuffle_buffer")
        if self.captions == "all" and self.stages:
            raise ValueError(f"data.captions='all' with stages {self.stages}: 'all' is the 1:1 all-captions baseline; "
                             f"one-to-many stages (i2t-human: the other captions) draw from the primary caption")


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
    attack: TrainAttackConfig = field(default_factory=TrainAttackConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: choose one of {', '.join(MODES)}")
        check_positive(self, "steps", "batch_size", "accum_steps", "log_every", "save_every", "keep_checkpoints")
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("resume", self.resume, RESUME)
        check_device("device", self.device)
        check_reporters(self.report_to, self.wandb_mode)
        mode = MODES.get(self.mode)
        if not self.data.stages and mode.default("stages"):
            dataclasses.replace(self.data, stages=mode.default("stages"))  # checks captions='all' against them
        elif "stages" in mode.needs and not self.data.stages:
            raise ValueError(f"mode={self.mode!r} needs augmentation stages (STAGES=i2t-human,eda,...)")


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

    def __post_init__(self) -> None:
        check_positive(self, "vocab_size", "steps", "batch_size", "mlm_batch_size", "lr", "mlm_lr")
        check_non_negative(self, "mlm_steps", "warmup")
        check_reporters(self.report_to, self.wandb_mode)
        if not 0 < self.mask_prob < 1:
            raise ValueError(f"mask_prob={self.mask_prob}: must be in (0, 1)")
        check_choice("precision", self.precision, PRECISIONS)
        check_device("device", self.device)


def resolve_stages(cfg: TrainConfig) -> TrainConfig:
    """A mode with default stages (MAT+: i2t-human) and none given gets them."""
    default = MODES.get(cfg.mode).default("stages")
    if default and not cfg.data.stages:
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, stages=default))
    return cfg
