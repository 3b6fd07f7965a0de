"""The evaluations' settings, apart from the code that runs them so that the CLI builds its options and checks
a value without importing torch: `EvalConfig` (`make eval`, pipeline/evaluation/evaluate.py),
`ZeroShotConfig` (`make eval-zeroshot`, pipeline/evaluation/zeroshot.py), `GroundingConfig` (`make
eval-grounding`, pipeline/evaluation/grounding.py) and `CaptioningConfig` (`make eval-captioning`,
pipeline/evaluation/captioning.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.attacks import ATTACKS
from pipeline.core.config import DATASET_OPTION, check_choice, check_device, check_positive, option
from pipeline.core.paths import plain_name
from pipeline.core.tracking import check_reporters, parse_report_to
from pipeline.train.config import DEVICE_HELP, PRECISIONS, REPORT_TO_HELP, WANDB_MODE_HELP

DEFAULT_ATTACKS = ATTACKS.names()
IMAGE_ATTACKS = ATTACKS.names(tags={"image"})  # what a captioner can be attacked with: it sees only the image


def read_templates(path: str) -> tuple[str, ...]:
    """ZS_TEMPLATES: a text file, one prompt template per line."""
    try:
        return tuple(line.strip() for line in open(path, encoding="utf-8").read().splitlines() if line.strip())
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from error


def budgets_in_255ths(spec: str) -> tuple[float, ...]:
    """ZS_EPS: "1,2,4" -> (1/255, 2/255, 4/255)."""
    return tuple(float(part) / 255 for part in spec.split(",") if part.strip())
TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a picture of a {}.", "an image of a {}.",
             "a photo of a small {}.", "a photo of a large {}.")
EPS = (1 / 255, 2 / 255, 4 / 255)
SYNTH_LABELS = ("shape", "colour")
# Grounding: PGD on the ITM match logit (the image-only attack), then the multimodal attacks with the expression.
GROUNDING_ATTACKS = ("pgd", *ATTACKS.names(tags={"image", "text"}))


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation. ``checkpoint`` (required by :func:`evaluate`): a training run dir (its ``clip/``), or any
    CLIP dir / hub id."""

    checkpoint: str = ""  # the command's --ckpt (which takes several, comma-separated)
    dataset: str = field(default="synth", metadata=DATASET_OPTION)
    mlm: str | None = field(default=None, metadata=option("MLM", "Masked LM of the text attacks (default MODELS_DIR/<dataset>/mlm)."))
    name: str | None = field(default=None, metadata=option("EVAL_NAME", "Output name, evals/<name>.json (default the model's name, with -on-<dataset> when the model was made on another dataset).", flag="--name"))
    mode: str | None = field(default=None, metadata=option("EVAL_MODE", "Row label (default the run's training mode, 'pretrained' for a bare CLIP dir).", flag="--mode"))
    split: str = field(default="test", metadata=option("EVAL_SPLIT", "Split to evaluate on.", flag="--split"))
    data: str | None = field(default=None, metadata=option("EVAL_DATA", "Test shard URLs (brace pattern, '::' list, pipe: commands) instead of SHARDS_DIR/<dataset>/base/<split>-*.tar.", flag="--eval-data"))
    size: int | None = field(default=None, metadata=option("EVAL_SIZE", "First N test images (default all: the published protocol).", flag="--size"))
    batch_size: int = field(default=64, metadata=option("EVAL_BATCH", "Images attacked together, with all their captions.", flag="--batch-size"))
    attacks: tuple[str, ...] = field(default=DEFAULT_ATTACKS, metadata=option("ATTACKS", "Comma-separated attacks; an empty value: clean only."))
    # Overrides of every attack's defaults (None keeps the published defaults of each attack):
    eps: float | None = field(default=None, metadata=option("EPS", "L-inf budget on [0, 1] pixels of every image attack (default each attack's, 2/255)."))
    steps: int | None = field(default=None, metadata=option("ATTACK_STEPS", "PGD steps of every image attack (default each attack's; PGD 10).", flag="--steps"))
    step_size: float | None = field(default=None, metadata=option("ATTACK_STEP_SIZE", "PGD step size of every image attack (default each attack's).", flag="--step-size"))
    top_k: int | None = field(default=None, metadata=option("TOP_K", "BERT-Attack masked-LM candidates (default 10)."))
    n_words: int | None = field(default=None, metadata=option("N_WORDS", "BERT-Attack words replaced (default 1)."))
    mlm_threshold: float | None = None
    constraint: str | None = field(default=None, metadata=option("ATTACK_CONSTRAINT", "BERT-Attack candidate filter: synonyms (WordNet synonyms of the replaced word only); default none, as the reference code.", flag="--constraint"))
    precision: str = field(default="fp32", metadata=option("EVAL_PRECISION", "fp32 (the reference protocol), auto or bf16 (faster, not comparable to published numbers).", flag="--precision"))
    device: str = field(default="auto", metadata=option("DEVICE", DEVICE_HELP + "."))
    seed: int = field(default=0, metadata=option("EVAL_SEED", "Seed of the attacks' random starts and noise; batch i uses a seed derived from it and i.", flag="--seed"))
    normalise_captions: bool = field(default=True, metadata=option("CAPTION_NORMALISE", "Normalise captions as the reference evaluations do (lower case, punctuation stripped, 30 words); off: captions as stored.", flag="--normalise-captions/--no-normalise-captions"))
    report_to: tuple[str, ...] = field(default=("tensorboard",), metadata=option("REPORT_TO", REPORT_TO_HELP + ".", parse=parse_report_to))
    wandb_mode: str = field(default="offline", metadata=option("WANDB_MODE", WANDB_MODE_HELP + "."))
    itm_k: int = field(default=0, metadata=option("ITM_K", "BLIP: re-rank each query's contrastive top k with the ITM head, as BLIP/ALBEF evaluate (0: off)."))
    attack_source: str | None = field(default=None, metadata=option("ATTACK_SOURCE", "Transfer: craft the attacks on this model (dir, run dir, open_clip:... spec) and evaluate CKPT on them."))

    def attack_options(self) -> dict[str, Any]:
        options = {"eps": self.eps, "steps": self.steps, "step_size": self.step_size, "top_k": self.top_k,
                   "n_words": self.n_words, "mlm_threshold": self.mlm_threshold, "constraint": self.constraint}
        return {k: v for k, v in options.items() if v is not None}

    def __post_init__(self) -> None:
        plain_name(self.split, "split")  # a shard-name prefix: '*', '../x' or '/abs' would read other shards
        check_reporters(self.report_to, self.wandb_mode)
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown:
            raise ValueError(f"attacks={unknown}: unknown; valid: {sorted(ATTACKS)}")
        if self.size is not None and self.size < 2:
            raise ValueError(f"size={self.size}: need at least 2 test images")
        check_positive(self, "batch_size")
        check_choice("precision", self.precision, PRECISIONS)
        check_device("device", self.device)
        if self.eps is not None and not 0 <= self.eps <= 1:
            raise ValueError(f"eps={self.eps}: must be in [0, 1] (pixels in [0, 1]; 2/255 = {2 / 255:.5f})")
        if self.itm_k < 0:
            raise ValueError(f"itm_k={self.itm_k}: must be >= 0 (0: contrastive ranking only)")


@dataclass(frozen=True)
class ZeroShotConfig:
    checkpoint: str | None = field(default=None, metadata=option("CKPT", "Any model load_model reads: a training run dir, an HF CLIP / BLIP dir or hub id, open_clip:<model>[:<pretrained>].", flag="--ckpt"))
    data: str | None = field(default=None, metadata=option("ZS_DATA", "An ImageFolder (class folders; '_' reads as a space) or a datasets dataset saved with save_to_disk.", flag="--data"))
    synth_labels: str | None = field(default=None, metadata=option("ZS_LABELS", "Without ZS_DATA: a labelled set from the synth generator, by shape or colour.", flag="--labels"))
    synth_images: int = field(default=200, metadata=option("ZS_SYNTH_IMAGES", "Images of the synth labelled set.", flag="--synth-images"))
    dataset: str = field(default="synth", metadata=DATASET_OPTION)  # the JSON goes to MANIFESTS_DIR/<dataset>/evals/zeroshot/
    name: str | None = field(default=None, metadata=option("EVAL_NAME", "Output name (evals/zeroshot/<name>.json).", flag="--name"))
    split: str = field(default="test", metadata=option("ZS_SPLIT", "Split of a saved DatasetDict.", flag="--split"))
    image_column: str = "image"
    label_column: str = "label"
    size: int | None = field(default=None, metadata=option("EVAL_SIZE", "First N images (classes interleaved; default all).", flag="--size"))
    templates: tuple[str, ...] = field(default=TEMPLATES, metadata=option("ZS_TEMPLATES", "A text file of prompt templates, one per line, each with {} for the class name.", flag="--templates", parse=read_templates))
    eps: tuple[float, ...] = field(default=EPS, metadata=option("ZS_EPS", "Comma-separated L-inf budgets in 1/255 units (default 1,2,4).", flag="--eps", parse=budgets_in_255ths))
    pgd_steps: int = field(default=100, metadata=option("ZS_PGD_STEPS", "PGD steps of eps/4.", flag="--pgd-steps"))
    apgd: bool = field(default=True, metadata=option("ZS_APGD", "APGD-CE and APGD-T via torchattacks (skipped with a note when not installed).", flag="--apgd/--no-apgd"))
    apgd_steps: int = field(default=100, metadata=option("ZS_APGD_STEPS", "APGD iterations.", flag="--apgd-steps"))
    batch_size: int = field(default=64, metadata=option("EVAL_BATCH", "Images per forward / attack batch.", flag="--batch-size"))
    device: str = field(default="auto", metadata=option("DEVICE", DEVICE_HELP + "."))
    seed: int = field(default=0, metadata=option("EVAL_SEED", "Seed of the attacks' random starts.", flag="--seed"))

    def __post_init__(self) -> None:
        if self.synth_labels is not None:
            check_choice("synth_labels", self.synth_labels, SYNTH_LABELS)
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ValueError("templates: every template needs a '{}' for the class name")
        if any(not 0 < e <= 1 for e in self.eps):
            raise ValueError(f"eps={self.eps}: each must be in (0, 1] (pixels in [0, 1])")
        check_positive(self, "pgd_steps", "apgd_steps", "batch_size", "synth_images", "size")
        check_device("device", self.device)

    def check_runnable(self) -> None:
        """What a run needs beyond valid values (a config file may leave these to the command line)."""
        if not self.checkpoint:
            raise ValueError("checkpoint: required (CKPT=<training run dir, model dir or spec>)")
        if self.data is None and self.synth_labels is None:
            raise ValueError("give data (an ImageFolder or a saved datasets dataset) or synth_labels (shape|colour)")




@dataclass(frozen=True)
class GroundingConfig:
    """`make eval-grounding`: weakly supervised grounding by Grad-CAM of a BLIP's ITM cross-attention."""

    checkpoint: str | None = field(default=None, metadata=option("CKPT", "A BLIP with an ITM head: a training run dir or a BLIP model dir / hub id.", flag="--ckpt"))
    data: str | None = field(default=None, metadata=option("GROUNDING_DATA", "A folder with RefCOCO+ as JSON in ALBEF's layout (docs/grounding.md); default on DATASET=synth: synth referring expressions.", flag="--data"))
    dataset: str = field(default="synth", metadata=DATASET_OPTION)  # the JSON goes to MANIFESTS_DIR/<dataset>/evals/grounding/
    synth_images: int = field(default=150, metadata=option("GROUNDING_SYNTH_IMAGES", "Images of the synth set (a third per split, one expression per shape).", flag="--synth-images"))
    synth_seed: int = field(default=0, metadata=option("GROUNDING_SYNTH_SEED", "Seed of the synth set.", flag="--synth-seed"))
    name: str | None = field(default=None, metadata=option("EVAL_NAME", "Output name (evals/grounding/<name>.json; default the model's name, with the data folder's).", flag="--name"))
    mode: str | None = field(default=None, metadata=option("EVAL_MODE", "Row label (default the run's training mode, 'pretrained' for a model dir).", flag="--mode"))
    mlm: str | None = field(default=None, metadata=option("MLM", "Masked LM of the text attacks (default MODELS_DIR/<dataset>/mlm)."))
    size: int | None = field(default=None, metadata=option("EVAL_SIZE", "First N expressions of each split (default all).", flag="--size"))
    batch_size: int = field(default=32, metadata=option("EVAL_BATCH", "Expressions per forward / attack batch.", flag="--batch-size"))
    attacks: tuple[str, ...] = field(default=GROUNDING_ATTACKS, metadata=option("ATTACKS", "Comma-separated: pgd (PGD on the ITM match logit) and the multimodal attacks, with the expression as the text; an empty value: clean only."))
    eps: float | None = field(default=None, metadata=option("EPS", "L-inf budget on [0, 1] pixels of every image attack (default each attack's, 2/255)."))
    steps: int | None = field(default=None, metadata=option("ATTACK_STEPS", "PGD steps of every image attack (default each attack's; PGD 10).", flag="--steps"))
    step_size: float | None = field(default=None, metadata=option("ATTACK_STEP_SIZE", "PGD step size of every image attack (default each attack's).", flag="--step-size"))
    top_k: int | None = field(default=None, metadata=option("TOP_K", "BERT-Attack masked-LM candidates (default 10)."))
    n_words: int | None = field(default=None, metadata=option("N_WORDS", "BERT-Attack words replaced (default 1)."))
    layer: int | None = field(default=None, metadata=option("GROUNDING_LAYER", "Text-encoder layer whose cross-attention Grad-CAM reads (0-based; default two thirds deep: 8 of 12, ALBEF's block_num).", flag="--layer"))
    device: str = field(default="auto", metadata=option("DEVICE", DEVICE_HELP + "."))
    seed: int = field(default=0, metadata=option("EVAL_SEED", "Seed of the attacks' random starts and noise; batch i uses a seed derived from it and i.", flag="--seed"))

    def attack_options(self) -> dict[str, Any]:
        options = {"eps": self.eps, "steps": self.steps, "step_size": self.step_size, "top_k": self.top_k,
                   "n_words": self.n_words}
        return {k: v for k, v in options.items() if v is not None}

    def __post_init__(self) -> None:
        unknown = [a for a in self.attacks if a not in GROUNDING_ATTACKS]
        if unknown:
            raise ValueError(f"attacks={unknown}: unknown for grounding; valid: {list(GROUNDING_ATTACKS)}")
        check_positive(self, "batch_size", "synth_images", "size")
        check_device("device", self.device)
        if self.eps is not None and not 0 <= self.eps <= 1:
            raise ValueError(f"eps={self.eps}: must be in [0, 1] (pixels in [0, 1]; 2/255 = {2 / 255:.5f})")
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"layer={self.layer}: a 0-based layer index, >= 0")

    def check_runnable(self) -> None:
        """What a run needs beyond valid values (a config file may leave these to the command line)."""
        if not self.checkpoint:
            raise ValueError("checkpoint: required (CKPT=<BLIP training run dir or BLIP model dir>)")
        if self.data is None and self.dataset != "synth":
            raise ValueError(f"GROUNDING_DATA: required for DATASET={self.dataset} (a folder with RefCOCO+ as JSON, "
                             "docs/grounding.md); without it, grounding runs on synth expressions (DATASET=synth)")


@dataclass(frozen=True)
class CaptioningConfig:
    """One captioning evaluation (:mod:`pipeline.evaluation.captioning`); the attack options mean what they mean
    in :class:`EvalConfig`."""

    checkpoint: str | None = field(default=None, metadata=option("CKPT", "BLIP training run dir or BLIP model dir / hub id whose vision encoder the captioner uses (default: the captioner as it is).", flag="--ckpt"))
    caption_model: str | None = field(default=None, metadata=option("CAPTION_MODEL", "BLIP captioning model (BlipForConditionalGeneration dir or cached hub id; default MODELS_DIR/<dataset>/blip-captioning)."))
    dataset: str = field(default="synth", metadata=DATASET_OPTION)
    name: str | None = field(default=None, metadata=option("EVAL_NAME", "Output name, evals/captioning/<name>.json (default the model's name).", flag="--name"))
    split: str = field(default="test", metadata=option("EVAL_SPLIT", "Split to evaluate on.", flag="--split"))
    data: str | None = field(default=None, metadata=option("EVAL_DATA", "Test shard URLs instead of SHARDS_DIR/<dataset>/base/<split>-*.tar.", flag="--eval-data"))
    size: int | None = field(default=None, metadata=option("EVAL_SIZE", "First N test images (default all).", flag="--size"))
    batch_size: int = field(default=16, metadata=option("EVAL_BATCH", "Images captioned and attacked together.", flag="--batch-size"))
    white_box: bool = field(default=True, metadata=option("CAPTION_PGD", "White-box PGD on the captioner's LM loss of the reference captions.", flag="--white-box/--no-white-box"))
    attacks: tuple[str, ...] = field(default=IMAGE_ATTACKS, metadata=option("ATTACKS", "Image attacks crafted on ATTACK_SOURCE and transferred (SGA's cross-task protocol); an empty value: none."))
    attack_source: str | None = field(default=None, metadata=option("ATTACK_SOURCE", "Retrieval model the transferred attacks are crafted on (dir, run dir, open_clip:... spec); without it no transfer rows."))
    mlm: str | None = field(default=None, metadata=option("MLM", "Masked LM of the multimodal attacks' text part (default MODELS_DIR/<dataset>/mlm)."))
    eps: float | None = field(default=None, metadata=option("EPS", "L-inf budget on [0, 1] pixels of every image attack (default 2/255)."))
    steps: int | None = field(default=None, metadata=option("ATTACK_STEPS", "PGD steps of every image attack (default 10).", flag="--steps"))
    step_size: float | None = field(default=None, metadata=option("ATTACK_STEP_SIZE", "PGD step size of every image attack (default each attack's; PGD eps / 4).", flag="--step-size"))
    top_k: int | None = field(default=None, metadata=option("TOP_K", "BERT-Attack masked-LM candidates (default 10)."))
    n_words: int | None = field(default=None, metadata=option("N_WORDS", "BERT-Attack words replaced (default 1)."))
    mlm_threshold: float | None = None
    constraint: str | None = field(default=None, metadata=option("ATTACK_CONSTRAINT", "BERT-Attack candidate filter: synonyms; default none.", flag="--constraint"))
    num_beams: int = field(default=3, metadata=option("CAPTION_BEAMS", "Beam search width (BLIP: 3).", flag="--beams"))
    max_length: int = field(default=20, metadata=option("CAPTION_MAX_LENGTH", "Most tokens of a caption with the prompt (BLIP: 20).", flag="--max-length"))
    min_length: int = field(default=5, metadata=option("CAPTION_MIN_LENGTH", "Fewest tokens of a caption with the prompt (BLIP: 5).", flag="--min-length"))
    prompt: str = field(default="a picture of ", metadata=option("CAPTION_PROMPT", "Decoder prompt, removed from the output (BLIP: 'a picture of ').", flag="--prompt"))
    meteor: bool = field(default=True, metadata=option("CAPTION_METEOR", "METEOR through java (about 20 s to start; skipped with a note without java).", flag="--meteor/--no-meteor"))
    device: str = field(default="auto", metadata=option("DEVICE", DEVICE_HELP + "."))
    seed: int = field(default=0, metadata=option("EVAL_SEED", "Seed of the attacks' random starts and noise; batch i uses a seed derived from it and i.", flag="--seed"))
    normalise_captions: bool = field(default=True, metadata=option("CAPTION_NORMALISE", "Feed the attacks' losses the captions normalised as the reference evaluations do (the metrics always use the captions as stored).", flag="--normalise-captions/--no-normalise-captions"))

    def attack_options(self) -> dict[str, Any]:
        options = {"eps": self.eps, "steps": self.steps, "step_size": self.step_size, "top_k": self.top_k,
                   "n_words": self.n_words, "mlm_threshold": self.mlm_threshold, "constraint": self.constraint}
        return {k: v for k, v in options.items() if v is not None}

    def __post_init__(self) -> None:
        plain_name(self.split, "split")
        wrong = [a for a in self.attacks if a not in IMAGE_ATTACKS]
        if wrong:
            raise ValueError(f"attacks={wrong}: a captioner sees only images; image attacks: {list(IMAGE_ATTACKS)}")
        if self.size is not None and self.size < 1:
            raise ValueError(f"size={self.size}: need at least 1 test image")
        check_positive(self, "batch_size", "num_beams", "max_length")
        if not 0 <= self.min_length <= self.max_length:
            raise ValueError(f"min_length={self.min_length}: must be in [0, max_length={self.max_length}]")
        check_device("device", self.device)
        if self.eps is not None and not 0 <= self.eps <= 1:
            raise ValueError(f"eps={self.eps}: must be in [0, 1] (pixels in [0, 1]; 2/255 = {2 / 255:.5f})")
