"""Where things live. Every location is derived here so commands agree on it.

User-given names that become parts of paths (dataset, stage, filter, evaluation and run names) pass through
`plain_name` first: a plain name is one path component of letters, digits, `_`, `-` and `.`, starting with a
letter or digit, at most `NAME_MAX` characters, so it can never climb out of (`..`), jump over (`/etc`) or
reach below (`a/b`) the folder it is joined to. Paths the user gives as paths (SHARDS_DIR, RUN_DIR, CKPT) are
taken as they are.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

NAME_MAX = 100
SIZES_FILE = "sizes.json"  # samples per shard, beside the shards (the file open_clip reads)
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def is_plain_name(value: object) -> bool:
    return (isinstance(value, str) and 0 < len(value) <= NAME_MAX and _PLAIN.fullmatch(value) is not None
            and ".." not in value)


def plain_name(value: str, what: str = "name") -> str:
    """`value` if it is a plain name (see the module docstring); ValueError naming `what` and the value if not."""
    if not is_plain_name(value):
        shown = value if not isinstance(value, str) or len(value) <= 40 else value[:40] + "..."
        raise ValueError(
            f"{what} {shown!r} is not a plain name: use 1-{NAME_MAX} letters, digits, '_', '-' or '.', "
            "starting with a letter or digit (no '/', no '..')"
        )
    return value


def as_plain_name(text: str, fallback: str = "model", max_length: int = NAME_MAX) -> str:
    """A plain name made from `text` (a model spec, a folder name): every run of other characters becomes one
    '-', '..' becomes '.', what is not a letter or digit is cut from both ends, at most `max_length` characters;
    `fallback` when nothing is left."""
    name = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9_.-]+", "-", text))
    name = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", name[:max_length])
    return name or fallback


def sizes_path(shard_dir: Path) -> Path:
    """The `sizes.json` of a folder of shards (any folder: stage, export, or one given by URL)."""
    return shard_dir / SIZES_FILE


@dataclass(frozen=True)
class Layout:
    shards_dir: Path = Path("shards")
    manifests_dir: Path = Path("manifests")
    runs_dir: Path = Path("runs")
    models_dir: Path = Path("models")

    @classmethod
    def from_env(cls) -> "Layout":
        return cls(
            shards_dir=Path(os.environ.get("MAT_SHARDS_DIR", "shards")),
            manifests_dir=Path(os.environ.get("MAT_MANIFESTS_DIR", "manifests")),
            runs_dir=Path(os.environ.get("MAT_RUNS_DIR", "runs")),
            models_dir=Path(os.environ.get("MAT_MODELS_DIR", "models")),
        )

    def dataset_shards(self, dataset: str) -> Path:
        return self.shards_dir / plain_name(dataset, "dataset")

    def stage_dir(self, dataset: str, stage: str) -> Path:
        return self.dataset_shards(dataset) / plain_name(stage, "stage")

    def base_dir(self, dataset: str) -> Path:
        return self.stage_dir(dataset, "base")

    def manifest_path(self, dataset: str, stage: str) -> Path:
        return self.dataset_manifests(dataset) / f"{plain_name(stage, 'stage')}.json"

    def dataset_manifests(self, dataset: str) -> Path:
        return self.manifests_dir / plain_name(dataset, "dataset")

    def named_output(self, dataset: str, kind: str, name: str) -> Path:
        """MANIFESTS_DIR/<dataset>/<kind>/<name>.json: an evaluation (kind "evals") or a filter ("filters")."""
        return self.dataset_manifests(dataset) / kind / f"{plain_name(name, kind[:-1] + ' name')}.json"

    def evals_dir(self, dataset: str) -> Path:
        """MANIFESTS_DIR/<dataset>/evals: one JSON per evaluation, which `make report` gathers."""
        return self.dataset_manifests(dataset) / "evals"

    def eval_path(self, dataset: str, name: str) -> Path:
        return self.named_output(dataset, "evals", name)

    def eval_partial_dir(self, dataset: str) -> Path:
        """Finished batches and attacks of unfinished evaluations (pipeline/evaluation/resume.py)."""
        return self.evals_dir(dataset) / "partial"

    def synth_labelled_dir(self, labels: str, images: int, seed: int) -> Path:
        """The labelled synth ImageFolder `eval-zeroshot` draws (by shape or colour), kept for reruns."""
        return self.shards_dir / "synth" / f"zeroshot-{plain_name(labels, 'labels')}-{images}-seed{seed}"

    def eval_tracking_dir(self, dataset: str, name: str) -> Path:
        """evals/tracking/<name>/{tensorboard,wandb}/ of an evaluation."""
        return self.evals_dir(dataset) / "tracking" / plain_name(name, "eval name")

    def study_dir(self, dataset: str) -> Path:
        return self.dataset_manifests(dataset) / "study"

    def dataset_models(self, dataset: str) -> Path:
        return self.models_dir / plain_name(dataset, "dataset")

    def model_dir(self, dataset: str, kind: str) -> Path:
        """Models `make pretrain` trains for a dataset: kind is "clip" or "mlm"."""
        return self.dataset_models(dataset) / plain_name(kind, "model kind")

    def run_dir(self, name: str) -> Path:
        """RUNS_DIR/<name> for a run named by the pipeline or the user (RUN_DIR, a path, is taken as given)."""
        return self.runs_dir / plain_name(name, "run name")
