"""`make clean`: remove what the pipeline wrote, and only that, inside its own folders.

What counts as the pipeline's is listed here, by folder and name pattern (see docs/architecture.md):

- SHARDS_DIR/<dataset>/<stage>/ holding a `sizes.json` or a stats file: `<split>-NNNNNN.tar`, their
  `.stats.json`, `sizes.json`, `*.tmp`, and `export.json` in an export folder (`export-<split>`, pipeline/curate/export.py);
- MANIFESTS_DIR/<dataset>/: the manifests, stats and report files, `plots/`, `filters/`, `evals/` (and the
  interrupted evaluations' `evals/partial/`); and
  MANIFESTS_DIR/bench.json;
- RUNS_DIR/<run>/ holding a `config.json` (a training or pretraining run): its config, metrics, TensorBoard
  events, checkpoints and models;
- MODELS_DIR/<dataset>/{clip,mlm} and the tiny generative models of `make tiny-models`.

Anything else (a notes.txt, a README, a folder of one's own) stays, and so do folders that still hold it. A
symbolic link is removed as a link and never followed; nothing outside the four roots is touched.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.paths import SIZES_FILE, Layout, is_plain_name, plain_name

log = logging.getLogger(__name__)

_SHARD = "*-[0-9][0-9][0-9][0-9][0-9][0-9]"  # <split>-NNNNNN, as shards.shard_name writes it
SHARD_FILES = (f"{_SHARD}.tar", f"{_SHARD}.stats.json", SIZES_FILE, "*.tmp", "export.json")
MANIFEST_FILES = ("*.json", "stats.md", "report.md", "report.png", "*.tmp")
MANIFEST_DIRS = {"plots": ("*.png", "*.tmp"), "filters": ("*.json", "*.tmp"),
                 "evals/partial": ("*.json", "*.tmp"), "evals": ("*.json", "*.tmp")}  # partial before its parent
# Folders removed whole (each holds tracker output the pipeline wrote, nothing of the user's).
MANIFEST_TREES = ("evals/tracking",)
RUN_FILES = ("config.json", "pretrain.json", "metrics.csv", "*.tmp")
RUN_DIRS = ("tensorboard", "checkpoints", "clip", "mlm", "init")
MODEL_KINDS = ("clip", "mlm")
TINY_MODELS = ("tiny-internvl", "tiny-sd")


@dataclass
class CleanReport:
    removed: list[Path] = field(default_factory=list)  # files, links and whole folders the pipeline wrote
    kept: list[Path] = field(default_factory=list)  # files found in the pipeline's folders but not its own

    def lines(self) -> list[str]:
        """One line per folder the removed entries were in (a count and the first name), then what was kept."""
        by_parent: dict[Path, list[str]] = {}
        for path in self.removed:
            by_parent.setdefault(path.parent, []).append(path.name)
        out = []
        for parent, names in by_parent.items():
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            out.append(f"removed from {parent}/: {names[0]}{more}")
        out += [f"kept {p} (not written by the pipeline)" for p in self.kept]
        return out or ["nothing to remove"]


def _inside(root: Path, path: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _remove(path: Path, root: Path, report: CleanReport) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        if not _inside(root, path):
            raise ValueError(f"refusing to remove {path}: it lies outside {root}")
        shutil.rmtree(path)
    else:
        return
    report.removed.append(path)


def _matching(folder: Path, patterns: tuple[str, ...]) -> Iterator[Path]:
    for child in sorted(folder.iterdir()):
        if (child.is_file() or child.is_symlink()) and any(fnmatch.fnmatch(child.name, p) for p in patterns):
            yield child


def _subdirs(folder: Path) -> list[Path]:
    """Real sub-folders (not links to elsewhere) of a folder that exists."""
    return [c for c in sorted(folder.iterdir()) if c.is_dir() and not c.is_symlink()] if folder.is_dir() else []


def _prune(folder: Path, report: CleanReport) -> None:
    """Remove the folder if cleaning emptied it; otherwise note what kept it."""
    if not folder.is_dir():
        return
    left = sorted(folder.iterdir())
    if left:
        report.kept.extend(p for p in left if p not in report.removed and not p.is_dir())
    else:
        folder.rmdir()


def _clean_shards(root: Path, datasets: list[Path], report: CleanReport) -> None:
    for dataset_dir in datasets:
        for stage_dir in _subdirs(dataset_dir):
            if not any(_matching(stage_dir, SHARD_FILES[1:3])):
                continue  # not a folder of shards the pipeline wrote
            for path in _matching(stage_dir, SHARD_FILES):
                _remove(path, root, report)
            _prune(stage_dir, report)
        _prune(dataset_dir, report)


def _clean_manifests(root: Path, datasets: list[Path], report: CleanReport) -> None:
    for dataset_dir in datasets:
        for path in _matching(dataset_dir, MANIFEST_FILES):
            _remove(path, root, report)
        for name in MANIFEST_TREES:
            tree = dataset_dir / name
            if tree.is_dir() and not tree.is_symlink():
                _remove(tree, root, report)
        for name, patterns in MANIFEST_DIRS.items():
            sub = dataset_dir / name
            if sub.is_dir() and not sub.is_symlink():
                for path in _matching(sub, patterns):
                    _remove(path, root, report)
                _prune(sub, report)
        _prune(dataset_dir, report)


def _is_run(folder: Path, dataset: str | None) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    if dataset is None:
        return True
    try:
        return json.loads(config.read_text()).get("dataset") == dataset
    except (OSError, ValueError):
        return False


def _clean_runs(root: Path, dataset: str | None, report: CleanReport) -> None:
    for run in _subdirs(root):
        if not _is_run(run, dataset):
            continue
        for path in _matching(run, RUN_FILES):
            _remove(path, root, report)
        for name in RUN_DIRS:
            if (run / name).is_dir() or (run / name).is_symlink():
                _remove(run / name, root, report)
        _prune(run, report)


def _clean_models(root: Path, datasets: list[Path], report: CleanReport) -> None:
    for dataset_dir in datasets:
        for kind in MODEL_KINDS:
            if (dataset_dir / kind).is_dir() or (dataset_dir / kind).is_symlink():
                _remove(dataset_dir / kind, root, report)
        _prune(dataset_dir, report)


def clean(layout: Layout, dataset: str | None = None) -> CleanReport:
    """Remove the pipeline's outputs (of one dataset, or of every dataset); return what was removed and kept."""
    report = CleanReport()
    if dataset is not None:
        plain_name(dataset, "dataset")

    def dataset_dirs(root: Path) -> list[Path]:
        if dataset is not None:
            folder = root / dataset
            return [folder] if folder.is_dir() and not folder.is_symlink() else []
        return [d for d in _subdirs(root) if is_plain_name(d.name)]

    _clean_shards(layout.shards_dir, dataset_dirs(layout.shards_dir), report)
    _clean_manifests(layout.manifests_dir, dataset_dirs(layout.manifests_dir), report)
    if layout.runs_dir.is_dir():
        _clean_runs(layout.runs_dir, dataset, report)
    models = dataset_dirs(layout.models_dir)
    if dataset is None:
        bench = layout.manifests_dir / "bench.json"
        if bench.is_file():
            _remove(bench, layout.manifests_dir, report)
        for name in TINY_MODELS:
            if (layout.models_dir / name).is_dir():
                _remove(layout.models_dir / name, layout.models_dir, report)
        models = [d for d in models if d.name not in TINY_MODELS]
    _clean_models(layout.models_dir, models, report)
    for line in report.lines():
        log.debug(line)
    return report
