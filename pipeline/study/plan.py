"""The study's plan: its settings (StudyConfig) and the cells of both tables (which modes, stages, steps and
attacks), shared by the runner (pipeline/study/run.py) and the report (pipeline/study/report.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pipeline.core.config import DATASET_OPTION, check_choice, check_choices, check_device, check_positive, option
from pipeline.attacks import ATTACKS as ALL_ATTACKS
from pipeline.core.executor import EXECUTORS
from pipeline.core.paths import plain_name
from pipeline.core.tracking import check_reporters, parse_report_to
from pipeline.train.config import DEVICE_HELP, LOSSES, REPORT_TO_HELP, WANDB_MODE_HELP
from pipeline.train.registry import MODES as TRAIN_MODES
from stages import STAGES

MODES = tuple(TRAIN_MODES)
ATTACKS = tuple(ALL_ATTACKS)
MULTIMODAL_ATTACKS = ALL_ATTACKS.names(tags={"image", "text"})
CPU_STAGES = STAGES.names(without={"model"})  # the stages the study augments itself: no downloaded model


def _tag(tags: frozenset[str], choices: tuple[str, str]) -> str:
    return next((t for t in choices if t in tags), "")


#: stage -> (modality of its variants, cross-modal or intra-modal): the paper's two axes, from the stages' tags.
STAGE_KINDS = {e.name: (_tag(e.tags, ("text", "image")), _tag(e.tags, ("cross", "intra"))) for e in STAGES.entries()}
STAGE_LABELS = STAGES.labels()  # display names (the stage's name unless it registers a label)
PAIRING = {"text": "1:N", "image": "N:1", "both": "N:N"}
# Relative costs for the time-left estimate (a mode or attack missing here counts 1): training per step in FT
# steps (bench: MAT step / FT step 4.3), evaluation per image in clean forwards (bench: attack_cost_*), and the
# demo's measured eval/train rate ratio.
MODE_COST = {"ft": 1.0, "tecoa": 2.0, "fare": 2.0, "mat": 4.3, "matplus": 4.3}
ATTACK_COST = {"pgd": 7.8, "bert": 10.2, "coattack": 17.2, "sga": 56.9}
EVAL_COST_SCALE = 0.0067  # one clean-forward-image in FT steps (demo: 0.23 s per FT step, 43 s per eval of 300)
DEFAULT_STEPS = 2000
TASKS = ("retrieval", "captioning", "grounding")  # the paper's three (pipeline/study/tasks.py)
#: The paper's training budget, by dataset name, taken when a released CLIP (``clip``) is fine-tuned and no steps
#: are given: 5k steps on Flickr30k, 10k on COCO (Waseda et al. 2024, implementation details).
PAPER_STEPS = {"coco": 10_000, "mscoco": 10_000, "flickr30k": 5_000, "f30k": 5_000}


def parse_mode_steps(spec: str) -> tuple[tuple[str, int], ...]:
    """STUDY_MODE_STEPS: `ft=500,mat=1000` -> (("ft", 500), ("mat", 1000))."""
    pairs = []
    for item in (v.strip() for v in spec.split(",") if v.strip()):
        mode, sep, number = item.partition("=")
        if not sep or not number.strip().isdigit():
            raise ValueError(f"want mode=steps pairs, got {item!r}")
        pairs.append((mode.strip(), int(number)))
    return tuple(pairs)


def parse_combos(spec: str) -> tuple[tuple[str, ...], ...] | None:
    """STUDY_COMBOS: `eda+randaug,i2t-internvl+t2i-sd` -> N:N cells; `none` -> no N:N cell; empty -> auto."""
    if not spec.strip():
        return None
    if spec.strip() == "none":
        return ()
    return tuple(tuple(s.strip() for s in combo.split("+") if s.strip()) for combo in spec.split(",") if combo.strip())


@dataclass(frozen=True)
class StudyConfig:
    """Budgets and choices of a study; defaults are sized for a GPU run on COCO / Flickr30k."""

    dataset: str = field(default="synth", metadata=DATASET_OPTION)
    clip: str | None = field(default=None, metadata=option("CLIP", "CLIP to fine-tune and evaluate (HF id or dir); default the stand-in MODELS_DIR/<dataset>/clip, pretrained first when missing."))
    mlm: str | None = field(default=None, metadata=option("MLM", "Masked LM of the text attacks (default MODELS_DIR/<dataset>/mlm)."))
    seeds: int = field(default=1, metadata=option("SEEDS", "Seeds per cell (3 gives a mean and spread)."))
    modes: tuple[str, ...] = field(default=MODES, metadata=option("STUDY_MODES", "Defences to train, comma-separated.", flag="--modes"))
    steps: int | None = field(default=None, metadata=option("STUDY_STEPS", f"Training steps of every mode (default {DEFAULT_STEPS}; with CLIP= the paper's budget by dataset: {', '.join(f'{d} {n}' for d, n in PAPER_STEPS.items())}).", flag="--steps"))
    losses: tuple[str, ...] = field(default=("contrastive",), metadata=option("STUDY_LOSSES", "Loss terms of every training cell but FARE's (its own loss): contrastive, or contrastive,itm for a BLIP model (BLIP's recipe: ITM on hard negatives).", flag="--losses"))
    mode_steps: tuple[tuple[str, int], ...] = field(default=(), metadata=option("STUDY_MODE_STEPS", "Per-mode steps, e.g. ft=500,mat=1000.", flag="--mode-steps", parse=parse_mode_steps))
    aug_steps: int | None = field(default=None, metadata=option("STUDY_AUG_STEPS", "Steps of the augmentation table's cells (default the matplus steps).", flag="--aug-steps"))
    batch_size: int = field(default=128, metadata=option("BATCH_SIZE", "Training batch per process."))
    lr: float | None = field(default=None, metadata=option("LR", "Peak learning rate (default train's; e.g. 1e-5 for ViT-B/16)."))
    precision: str = field(default="auto", metadata=option("PRECISION", "Training precision: auto, bf16 or fp32."))
    eval_size: int | None = field(default=None, metadata=option("EVAL_SIZE", "First N test images (default all: the published protocol)."))
    eval_split: str | None = field(default=None, metadata=option("EVAL_SPLIT", "Split to evaluate on (default test; val when the dataset has no test split)."))
    eval_batch: int = field(default=64, metadata=option("EVAL_BATCH", "Images attacked together."))
    eval_steps: int | None = None  # the attacks' iterations in evaluation; None = each attack's default
    eval_top_k: int | None = None  # BERT-Attack's candidates per word in evaluation; None = its default
    attacks: tuple[str, ...] = field(default=ATTACKS, metadata=option("ATTACKS", "Attacks of the defences table, comma-separated."))
    stages: tuple[str, ...] | None = field(default=None, metadata=option("STUDY_STAGES", "Stages of the augmentation table (default every available one).", flag="--stages"))
    combos: tuple[tuple[str, ...], ...] | None = field(default=None, metadata=option("STUDY_COMBOS", "N:N cells as text+image stage pairs, e.g. eda+randaug; none; default auto.", flag="--combos", parse=parse_combos))
    augmentation: bool = field(default=True, metadata=option("STUDY_AUGMENTATION", "Build the augmentation table.", flag="--augmentation/--no-augmentation"))
    pretrain_steps: int = field(default=1200, metadata=option("PRETRAIN_STEPS", "Steps of the stand-in CLIP when it must be pretrained."))
    resamples: int = field(default=1000, metadata=option("BOOTSTRAP_RESAMPLES", "Bootstrap resamples.", flag="--resamples"))
    level: float = 0.95
    device: str = field(default="auto", metadata=option("DEVICE", DEVICE_HELP + "."))
    workers: int = field(default=2, metadata=option("WORKERS", "Augmentation processes, for the stages the study makes; with EXECUTOR=ray and no RAY_ADDRESS, the CPUs of the local Ray instance."))
    executor: str = field(default="local", metadata=option("EXECUTOR", "local: the units one after the other in this process | ray: the trainings, then the evaluations, as Ray tasks (one GPU each on CUDA; RAY_ADDRESS, else a local Ray of WORKERS CPUs); the optional ray extra."))
    parallel: int = field(default=1, metadata=option("STUDY_PARALLEL", "EXECUTOR=local: trainings and evaluations N at a time, each in a worker process of its own (1: one after the other in this process).", flag="--parallel"))
    unit_threads: int | None = field(default=None, metadata=option("UNIT_THREADS", "Torch threads of each unit in a worker process (default the cores / STUDY_PARALLEL, at least 1); fixed, the numbers are the same on any machine.", flag="--unit-threads"))
    data_workers: int = field(default=2, metadata=option("DATA_WORKERS", "Training loader workers."))
    tasks: tuple[str, ...] = field(default=("retrieval",), metadata=option("STUDY_TASKS", "Tasks the defences are evaluated on: retrieval (always), captioning, grounding (these two need CLIP=<a BLIP>).", flag="--tasks"))
    caption_model: str | None = field(default=None, metadata=option("CAPTION_MODEL", "BLIP captioner of STUDY_TASKS=captioning (default MODELS_DIR/<dataset>/blip-captioning)."))
    grounding_data: str | None = field(default=None, metadata=option("GROUNDING_DATA", "RefCOCO+ as JSON for STUDY_TASKS=grounding (docs/grounding.md); default on synth: synth referring expressions."))
    # --set items for every training cell, as `make train` takes them, e.g. attack.text.variant=fast
    train_set: tuple[str, ...] = ()
    # Trackers of every training cell (TrainConfig.report_to: tensorboard, wandb; () for none), written in each
    # run's folder. Not part of a unit's fingerprint: changing them retrains nothing.
    report_to: tuple[str, ...] = field(default=("tensorboard",), metadata=option("REPORT_TO", REPORT_TO_HELP + " (every training cell).", parse=parse_report_to))
    wandb_mode: str = field(default="offline", metadata=option("WANDB_MODE", WANDB_MODE_HELP + "."))

    def __post_init__(self) -> None:
        plain_name(self.dataset, "dataset")
        if self.eval_split is not None:
            plain_name(self.eval_split, "eval_split")
        check_positive(self, "seeds", "steps", "batch_size", "eval_batch", "pretrain_steps", "resamples", "workers",
                       "aug_steps", "eval_steps", "eval_top_k")
        if not self.modes:
            raise ValueError(f"modes=(): choose among {', '.join(MODES)}")
        check_choices("modes", self.modes, MODES)
        check_choices("mode_steps", [m for m, _ in self.mode_steps], MODES)
        check_choices("losses", self.losses, LOSSES)
        if "contrastive" not in self.losses:
            raise ValueError(f"losses={','.join(self.losses)}: the contrastive loss is always trained (add itm to it)")
        check_choices("attacks", self.attacks, ATTACKS)
        check_choices("tasks", self.tasks, TASKS)
        check_choice("executor", self.executor, EXECUTORS.names())
        check_positive(self, "parallel", "unit_threads")
        if self.parallel > 1 and self.executor != "local":
            raise ValueError(f"parallel={self.parallel} is for executor=local; executor={self.executor!r} runs as many "
                             "units at a time as it holds")
        if self.executor == "ray" and self.device.startswith("cuda:"):
            raise ValueError(f"device={self.device!r} with executor=ray: Ray gives each unit a GPU of its own; "
                             "use device=cuda or auto")
        if self.eval_size is not None and self.eval_size < 2:
            raise ValueError(f"eval_size={self.eval_size}: need at least 2 test images")
        if not 0 < self.level < 1:
            raise ValueError(f"level={self.level}: must be in (0, 1)")
        check_reporters(self.report_to, self.wandb_mode)
        check_device("device", self.device)

    @property
    def train_steps(self) -> int:
        """``steps`` when given; else the paper's budget (:data:`PAPER_STEPS`) when a released CLIP is fine-tuned on
        COCO or Flickr30k; else :data:`DEFAULT_STEPS` (the stand-in CLIP, the demo, synth)."""
        if self.steps is not None:
            return self.steps
        return PAPER_STEPS.get(self.dataset, DEFAULT_STEPS) if self.clip else DEFAULT_STEPS

    @property
    def steps_source(self) -> str:
        """Where :attr:`train_steps` comes from, as the plan states it."""
        if self.steps is not None:
            return "given (steps)"
        if self.clip and self.dataset in PAPER_STEPS:
            return f"the paper's budget for {self.dataset} with a released CLIP (5k Flickr30k, 10k COCO)"
        return "the study's default (the stand-in CLIP, or a dataset outside PAPER_STEPS)"

    def steps_of(self, mode: str) -> int:
        return dict(self.mode_steps).get(mode, self.train_steps)


@dataclass(frozen=True)
class Cell:
    """One model of the tables; trained (unless pretrained) and evaluated once per seed."""

    id: str
    mode: str  # a training mode or "pretrained"
    stages: tuple[str, ...] = ()
    steps: int = 0
    tables: tuple[str, ...] = ()
    attacks: tuple[str, ...] = ()

    @property
    def modality(self) -> str:
        kinds = {STAGE_KINDS.get(s, ("", ""))[0] for s in self.stages} - {""}
        return "both" if len(kinds) == 2 else next(iter(kinds), "")

    @property
    def pairing(self) -> str:
        return PAIRING.get(self.modality, "1:1")


def auto_combos(stages: list[str]) -> list[tuple[str, ...]]:
    """N:N cells: the intra-modal pair (eda + randaug) and the cross-modal one (an I2T stage + t2i-sd)."""
    combos = []
    if "eda" in stages and "randaug" in stages:
        combos.append(("eda", "randaug"))
    i2t = next((s for s in ("i2t-internvl", "i2t-human") if s in stages), None)
    if i2t and "t2i-sd" in stages:
        combos.append((i2t, "t2i-sd"))
    return combos


def plan_cells(cfg: StudyConfig, stages: list[str]) -> list[Cell]:
    """The cells of both tables, shared cells merged (the union of their tables and attacks)."""
    multimodal = tuple(a for a in cfg.attacks if a in MULTIMODAL_ATTACKS) or cfg.attacks
    wanted: list[tuple[str, tuple[str, ...], int, str, tuple[str, ...]]] = [("pretrained", (), 0, "defences", cfg.attacks)]
    for mode in cfg.modes:
        wanted.append((mode, TRAIN_MODES.get(mode).default("stages", ()), cfg.steps_of(mode), "defences", cfg.attacks))
    if cfg.augmentation:
        steps = cfg.aug_steps or cfg.steps_of("matplus")
        chosen = [s for s in (cfg.stages if cfg.stages is not None else stages)]
        unknown = [s for s in chosen if s not in STAGE_KINDS]
        if unknown:
            raise ValueError(f"stages={unknown}: unknown; known: {sorted(STAGE_KINDS)}")
        combos = list(cfg.combos) if cfg.combos is not None else auto_combos(chosen)
        wanted.append(("mat", (), steps, "augmentation", multimodal))
        wanted += [("matplus", (s,), steps, "augmentation", multimodal) for s in chosen]
        wanted += [("matplus", tuple(c), steps, "augmentation", multimodal) for c in combos]
    cells: dict[tuple, Cell] = {}
    for mode, cell_stages, steps, table, attacks in wanted:
        key = (mode, cell_stages, steps)
        old = cells.get(key)
        if old is None:
            ident = "-".join([mode, *(["_".join(cell_stages)] if cell_stages else []),
                              *([f"{steps}steps"] if mode != "pretrained" and steps != cfg.steps_of(mode) else [])])
            cells[key] = Cell(plain_name(ident, "cell"), mode, cell_stages, steps, (table,), attacks)
        else:
            merged = tuple(a for a in ATTACKS if a in old.attacks or a in attacks)
            cells[key] = dataclasses.replace(old, tables=tuple(dict.fromkeys(old.tables + (table,))), attacks=merged)
    return list(cells.values())


def require_blip(cfg: StudyConfig, clip: str, what: str) -> None:
    """ValueError, before any unit runs, unless the study fine-tunes a BLIP (``what`` needs one)."""
    from pipeline.models.loading import model_family

    family = model_family(clip) if cfg.clip else "clip (the stand-in MODELS_DIR/<dataset>/clip)"
    if family != "blip":
        raise ValueError(f"{what}: needs a BLIP to fine-tune, and this study fine-tunes {family}; name one with "
                         f"CLIP=<BLIP dir or hub id> (`make pretrain FAMILY=blip` saves MODELS_DIR/{cfg.dataset}/blip)")


def eval_name(cell: Cell, seed: int) -> str:
    return f"study-{cell.id}-s{seed}"
