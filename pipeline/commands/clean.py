"""`make clean`: remove what the pipeline wrote, and only that, inside its four folders.

What the pipeline wrote is what its ledgers say (pipeline/core/ledger.py): every folder it writes into holds a
`.mat-pipeline` recording the files and folders written there and whether the pipeline created the folder.
Clean walks SHARDS_DIR, MANIFESTS_DIR and MODELS_DIR (only `<dataset>/` when a dataset is given) and RUNS_DIR
(with a dataset: the runs whose recorded `config.json` names it), never following a link, and in each folder

- removes every file and folder the ledger records as written (a recorded folder, such as a saved model, a
  checkpoint or TensorBoard's, goes whole), and the temporary files killed writes left (`.<name>.<random>.tmp`);
- then removes the folder itself if the pipeline created it and nothing else is left in it.

Anything else stays, whatever its name (a notes.txt, a package.json, a checkpoints/ of one's own), and so do the
folders that hold it; files kept in a folder the pipeline wrote into are listed. Outputs of versions before the
ledger are not recognised as the pipeline's either: they stay, and are removed by hand (`rm -r <folder>`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core import ledger
from pipeline.core.paths import Layout, plain_name

log = logging.getLogger(__name__)


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
        return (out or ["nothing to remove"]) + [f"kept {p} (not written by the pipeline)" for p in self.kept]


def _subdirs(folder: Path) -> list[Path]:
    """Real sub-folders (not links to elsewhere) of a folder that exists."""
    return [c for c in sorted(folder.iterdir()) if c.is_dir() and not c.is_symlink()] if folder.is_dir() else []


def _run_of(folder: Path, dataset: str) -> bool:
    """A run (a folder with a config.json the pipeline wrote) of the dataset."""
    config = folder / "config.json"
    if not ledger.is_recorded(config) or not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("dataset") == dataset
    except (OSError, ValueError):
        return False


def clean(layout: Layout, dataset: str | None = None) -> CleanReport:
    """Remove the pipeline's outputs (of one dataset, or of every dataset); return what was removed and kept."""
    report = CleanReport()
    roots = [layout.shards_dir, layout.manifests_dir, layout.models_dir, layout.runs_dir]
    if dataset is None:
        folders = roots
    else:
        plain_name(dataset, "dataset")
        folders = [root / dataset for root in roots[:3]]
        folders += [run for run in _subdirs(layout.runs_dir) if _run_of(run, dataset)]
    for folder in folders:
        removed, kept = ledger.remove_own_below(folder)
        report.removed += removed
        report.kept += kept
    for line in report.lines():
        log.debug(line)
    return report
