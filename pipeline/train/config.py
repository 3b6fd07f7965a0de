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
from pipeline.core.config import check_choice, check_choices, check_device, check_non_negative, check_positive, check_range, option, DATASET_OPTION, DEVICE_CHOICES
from pipeline.core.paths import plain_name
from pipeline.core.tracking import check_reporters, parse_report_to

# "auto": bf16 where the hardware runs it natively, fp32 elsewhere (pipeline.models.resolve_precision).
PRECISIONS = ("auto", "bf16", "fp32")
ORDERS = ("text-first", "image-first", "joint")
# primary: the primary caption per image (1:1; MAT+'s i2t-human then adds the others); all: each human caption
# its own pair (the ALBEF / Co-Attack-style baseline).
CAPTIONS = ("primary", "all")
# none: the evaluation's preprocessing (resize + centre crop); rrc: open_clip's training RandomResizedCrop.
AUGMENTS = ("none", "rrc")
RESUME = ("auto", "latest", "never")
# The model families `make pretrain` trains a stand-in of (names as pipeline.models.loading.FAMILIES), and each
# one's default steps: a few minutes on 2 CPU cores; a BLIP step costs ~3.5 CLIP steps (its ITM loss runs the
# text tower with cross-attention on 3 pairs per image).
PRETRAIN_FAMILIES = ("clip", "blip")
PRETRAIN_STEPS = {"clip": 1200, "blip": 300}
# contrastive: symmetric InfoNCE; itm: BLIP / ALBEF's image-text matching on hard negatives (BLIP models only)
LOSSES = ("contrastive", "itm")
PRECISION_HELP = ("auto (bf16 where the hardware runs it natively: CUDA with bf16, a CPU with AVX512-BF16/AMX; "
                  "else fp32), bf16 (autocast) or fp32")
DEVICE_HELP = f"One of {DEVICE_CHOICES}"
REPORT_TO_HELP = "Trackers: tensorboard, wandb, both comma-separated, or none"
WANDB_MODE_HELP = "W&B mode: offline (no network needed; `wandb sync` later), online or disabled"


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule: AdamW, linear warm-up then cosine decay to `min_lr_ratio * lr`."""

    lr: float = field(default=1e-4, metadata=option("LR", "Peak learning rate (e.g. 1e-5 for ViT-B/16)."))
    weight_decay: float = field(default=0.1, metadata=option("WEIGHT_DECAY", "AdamW weight decay."))
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup: int = field(default=20, metadata=option("WARMUP", "Warm-up steps."))
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
    order: str = field(default="text-first", metadata=option(  # MAT: the paper's order is text-first
        "ATTACK_ORDER", "text-first | image-first | joint (both attacks from the clean inputs).", flag="--order"))

    def __post_init__(self) -> None:
        check_range("attack.image.eps", self.image.eps, 0, 1)
        check_choice("attack.order", self.order, ORDERS)


@dataclass(frozen=True)
class DataConfig:
    """Which shards are streamed and how a pair is drawn from them."""

    split: str = "train"
    # Shard URLs (brace pattern, '::' list, pipe: command; pipeline/core/shard_urls.py) instead of
    # SHARDS_DIR/<dataset>/base/<split>-*.tar; stage shards sit beside them in folders named after the stage.
    urls: str | None = field(default=None, metadata=option("TRAIN_DATA", "Base shard URLs instead of SHARDS_DIR/<dataset>/base: a brace pattern (/data/coco/base/train-{000000..000226}.tar), a '::' list or pipe: commands; stage shards are found beside them by the stage's name.", flag="--train-data"))
    num_samples: int | None = field(default=None, metadata=option("TRAIN_NUM_SAMPLES", "Samples in TRAIN_DATA when no sizes.json lies beside the shards (logged only).", flag="--train-num-samples"))
    stages: tuple[str, ...] = field(default=(), metadata=option("STAGES", "Comma-separated augmentation stages zipped with the base shards (modes that need them; default the mode's own: matplus i2t-human)."))
    filter: str | None = field(default=None, metadata=option("FILTER", "Filter manifest (path, or name under MANIFESTS_DIR/<dataset>/filters/) that drops variants."))
    shuffle_buffer: int = field(default=1000, metadata=option("SHUFFLE_BUFFER", "Samples in the shuffle buffer."))
    resampled: bool = field(default=True, metadata=option("RESAMPLED", "Draw shards with replacement (open_clip's --dataset-resampled) or read epochs split by rank and worker.", flag="--resampled/--epochs"))
    num_workers: int = field(default=2, metadata=option("DATA_WORKERS", "Loader worker processes.", flag="--data-workers"))
    captions: str = field(default="primary", metadata=option("CAPTIONS", "primary (the primary caption per image) | all (every human caption its own pair; no STAGES)."))
    augment: str = field(default="none", metadata=option("TRAIN_AUGMENT", "none (the evaluation's resize + centre crop) | rrc (open_clip's RandomResizedCrop, scale 0.9-1).", flag="--train-augment"))

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

    mode: str = field(default="mat", metadata=option("MODE", " | ".join(MODES) + "."))
    dataset: str = field(default="synth", metadata=DATASET_OPTION)
    clip: str | None = field(default=None, metadata=option("CLIP", "CLIP to fine-tune: HF id or local dir (default MODELS_DIR/<dataset>/clip, made by `make pretrain`)."))
    mlm: str | None = field(default=None, metadata=option("MLM", "Masked LM of BERT-Attack (default MODELS_DIR/<dataset>/mlm)."))
    steps: int = field(default=150, metadata=option("STEPS", "Optimiser steps."))
    batch_size: int = field(default=128, metadata=option("BATCH_SIZE", "Batch per process (the global batch is this x world size)."))
    accum_steps: int = field(default=1, metadata=option("ACCUM_STEPS", "Gradient-accumulation micro-batches per step."))
    precision: str = field(default="auto", metadata=option("PRECISION", PRECISION_HELP + "."))
    seed: int = field(default=0, metadata=option("SEED", "Random seed."))
    log_every: int = field(default=10, metadata=option("LOG_EVERY", "Log every N steps."))
    save_every: int = field(default=50, metadata=option("SAVE_EVERY", "Checkpoint every N steps and at the end."))
    keep_checkpoints: int = 2
    resume: str = field(default="auto", metadata=option("RESUME", "auto (continue RUN_DIR's newest checkpoint) | latest (continue the newest RUNS_DIR/<mode>-<dataset>-* run) | never (start fresh)."))
    run_dir: str | None = field(default=None, metadata=option("RUN_DIR", "Run folder (default RUNS_DIR/<mode>-<dataset>-<YYYYmmdd-HHMMSS>)."))
    device: str = field(default="auto", metadata=option("DEVICE", DEVICE_HELP + "."))
    report_to: tuple[str, ...] = field(default=("tensorboard",), metadata=option("REPORT_TO", REPORT_TO_HELP + ".", parse=parse_report_to))
    wandb_mode: str = field(default="offline", metadata=option("WANDB_MODE", WANDB_MODE_HELP + "."))
    losses: tuple[str, ...] = field(default=("contrastive",), metadata=option("LOSSES", "Loss terms on the (adversarial) pairs: contrastive, and itm for BLIP's image-text matching with hard negatives mined from the contrastive similarities (BLIP's recipe: contrastive,itm)."))
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
        check_choices("losses", self.losses, LOSSES)
        if "contrastive" not in self.losses:
            raise ValueError(f"losses={','.join(self.losses)}: the contrastive loss is always trained (add itm to it)")
        if self.mode == "fare" and "itm" in self.losses:
            raise ValueError("losses=itm: fare trains the image embedding alone (its own loss), with no pairs to match")
        mode = MODES.get(self.mode)
        if not self.data.stages and mode.default("stages"):
            dataclasses.replace(self.data, stages=mode.default("stages"))  # checks captions='all' against them
        elif "stages" in mode.needs and not self.data.stages:
            raise ValueError(f"mode={self.mode!r} needs augmentation stages (STAGES=i2t-human,eda,...)")


@dataclass(frozen=True)
class PretrainConfig:
    """`make pretrain`: a small CLIP (or BLIP) and a small BERT masked LM from scratch, standing in for pretrained
    ones.

    About 6 minutes on 2 CPU cores with the defaults (the small CLIP at ~3.5 steps/s, batch 128); FAMILY=blip
    about 5 (the small BLIP at ~1.1 steps/s in fp32 on an AVX2 EPYC, 300 steps, after 35 s of masked LM).
    """

    dataset: str = field(default="synth", metadata=DATASET_OPTION)
    family: str = field(default="clip", metadata=option("FAMILY", f"Retrieval model to train: {' | '.join(PRETRAIN_FAMILIES)} (BLIP with its ITM head, on losses contrastive,itm, saved to MODELS_DIR/<dataset>/blip; its tokenizer the masked LM's)."))
    clip_preset: str = field(default="small", metadata=option("CLIP_PRESET", "Retrieval model size (CLIP_PRESETS, or BLIP_PRESETS with FAMILY=blip): tiny | small."))
    mlm_preset: str = field(default="small", metadata=option("MLM_PRESET", "Masked-LM size: tiny | small."))
    vocab_size: int = field(default=1000, metadata=option("VOCAB_SIZE", "Tokenizer vocabulary size."))
    steps: int | None = field(default=None, metadata=option("STEPS", f"Retrieval model training steps (default by FAMILY: {', '.join(f'{f} {n}' for f, n in PRETRAIN_STEPS.items())}; ~6 min on 2 CPU cores for CLIP)."))
    batch_size: int = field(default=128, metadata=option("BATCH_SIZE", "Retrieval model (CLIP / BLIP) batch size."))
    lr: float = field(default=1e-3, metadata=option("LR", "Retrieval model (CLIP / BLIP) peak learning rate."))
    warmup: int = field(default=100, metadata=option("WARMUP", "Warm-up steps."))
    mlm_steps: int = field(default=300, metadata=option("MLM_STEPS", "Masked-LM training steps."))
    mlm_batch_size: int = 64
    mlm_lr: float = 1e-3
    mask_prob: float = 0.15
    caption_steps: int = field(default=300, metadata=option("CAPTION_STEPS", "FAMILY=blip: steps of the captioner's decoder (BLIP's captioner on the BLIP's frozen vision encoder, saved to MODELS_DIR/<dataset>/blip-captioning; 0: none)."))
    caption_batch_size: int = 64
    caption_lr: float = 2e-3
    precision: str = field(default="auto", metadata=option("PRECISION", PRECISION_HELP + "."))
    seed: int = field(default=0, metadata=option("SEED", "Random seed."))
    num_workers: int = field(default=2, metadata=option("DATA_WORKERS", "Loader worker processes.", flag="--data-workers"))
    device: str = field(default="auto", metadata=option("DEVICE", DEVICE_HELP + "."))
    report_to: tuple[str, ...] = field(default=("tensorboard",), metadata=option("REPORT_TO", REPORT_TO_HELP + ".", parse=parse_report_to))
    wandb_mode: str = field(default="offline", metadata=option("WANDB_MODE", WANDB_MODE_HELP + "."))

    def __post_init__(self) -> None:
        check_choice("family", self.family, PRETRAIN_FAMILIES)
        check_positive(self, "vocab_size", "steps", "batch_size", "mlm_batch_size", "lr", "mlm_lr")
        check_non_negative(self, "mlm_steps", "warmup", "caption_steps")
        check_positive(self, "caption_batch_size", "caption_lr")
        check_reporters(self.report_to, self.wandb_mode)
        if not 0 < self.mask_prob < 1:
            raise ValueError(f"mask_prob={self.mask_prob}: must be in (0, 1)")
        check_choice("precision", self.precision, PRECISIONS)
        check_device("device", self.device)

    @property
    def train_steps(self) -> int:
        """``steps``, or the family's default (:data:`PRETRAIN_STEPS`)."""
        return PRETRAIN_STEPS[self.family] if self.steps is None else self.steps


def resolve_stages(cfg: TrainConfig) -> TrainConfig:
    """A mode with default stages (MAT+: i2t-human) and none given gets them."""
    default = MODES.get(cfg.mode).default("stages")
    if default and not cfg.data.stages:
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, stages=default))
    return cfg
