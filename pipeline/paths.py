"""Where things live. Every location is derived here so commands agree on it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    shards_dir: Path = Path("shards")
    manifests_dir: Path = Path("manifests")
    runs_dir: Path = Path("runs")
    models_dir: Path = Path("models")

    @classmethod
    def from_env(cls) -> "Layout":
        return cls(
            shards_dir=Path(os.environ.get("SHARDS_DIR", "shards")),
            manifests_dir=Path(os.environ.get("MANIFESTS_DIR", "manifests")),
            runs_dir=Path(os.environ.get("RUNS_DIR", "runs")),
            models_dir=Path(os.environ.get("MODELS_DIR", "models")),
        )

    def stage_dir(self, dataset: str, stage: str) -> Path:
        return self.shards_dir / dataset / stage

    def base_dir(self, dataset: str) -> Path:
        return self.stage_dir(dataset, "base")

    def manifest_path(self, dataset: str, stage: str) -> Path:
        return self.manifests_dir / dataset / f"{stage}.json"

    def dataset_manifests(self, dataset: str) -> Path:
        return self.manifests_dir / dataset

    def model_dir(self, dataset: str, kind: str) -> Path:
        """Models `make pretrain` trains for a dataset: kind is "clip" or "mlm"."""
        return self.models_dir / dataset / kind
