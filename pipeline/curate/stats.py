"""`make stats`: one row per stage (counts, alignment, diversity, shift, Frechet distances) and plots.

Reads the manifests (counts, stage-level Frechet distances) and the stage shards' per-variant JSON (scores): the
dataset folder's, or those aligned with base shard URLs (BASE_DATA, found by the stage's name); writes
MANIFESTS_DIR/<dataset>/stats.json, stats.md and plots/*.png. Nothing is recomputed with a model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.paths import Layout
from pipeline.core.schema import SCORES, stage_record
from pipeline.core.shard_urls import expand_urls, read_url, stage_urls
from pipeline.core.shards import list_shards
from pipeline.core.fileio import atomic_write_json, atomic_write_text
from pipeline.core.figures import NA, bars, pyplot, save
from pipeline.core.ledger import claim_file
from pipeline.core.provenance import PROVENANCE_KEY, provenance

log = logging.getLogger(__name__)

QUANTILES = (0.1, 0.5, 0.9)
SCATTER_POINTS = 2000  # per stage, so the picture stays readable


@dataclass
class StageScores:
    """Every variant of a stage, flattened: key, variant index, op, and scores (NaN when not scored)."""

    stage: str
    keys: list[str]
    index: np.ndarray
    ops: list[str]
    alignment: np.ndarray
    src_sim: np.ndarray
    shift: np.ndarray
    modality: str  # "text", "image", "both" or "" when the stage has no variants
    samples: int
    samples_with_variants: int

    @property
    def scored(self) -> bool:
        return bool(len(self.alignment)) and not np.isnan(self.alignment).all()

    @property
    def diversity(self) -> np.ndarray:
        return 1.0 - self.src_sim


def read_stage_scores(stage: str, shards: Path | list[str]) -> StageScores:
    """Scores of a stage's shards: every tar in a folder, or a list of shard URLs."""
    keys, index, ops, rows, kinds = [], [], [], [], set()
    samples = with_variants = 0
    urls = [str(p) for p in list_shards(shards)] if isinstance(shards, Path) else shards
    for url in urls:
        for sample in read_url(url):
            record = stage_record(sample)
            samples += 1
            with_variants += bool(record.variants)
            for i, variant in enumerate(record.variants):
                keys.append(record.key)
                index.append(i)
                ops.append(str(variant.op or ""))
                rows.append([np.nan if score is None else score for score in (getattr(variant, n) for n in SCORES)])
                kinds.update(kind for kind, value in (("text", variant.text), ("image", variant.file)) if value is not None)
    scores = np.array(rows, dtype=np.float64).reshape(-1, 3)
    modality = "both" if len(kinds) == 2 else next(iter(kinds), "")
    return StageScores(stage, keys, np.array(index, dtype=np.int64), ops, *scores.T, modality, samples, with_variants)


def stage_manifests(layout: Layout, dataset: str) -> dict[str, dict[str, Any]]:
    """{stage: manifest} for every manifest of the dataset (base first), skipping stats and filter files."""
    found = {}
    for path in sorted(layout.dataset_manifests(dataset).glob("*.json")):
        manifest = json.loads(path.read_text())
        if isinstance(manifest, dict) and "stage" in manifest and "shards" in manifest:
            found[manifest["stage"]] = manifest
    if not found:
        raise FileNotFoundError(f"no manifests in {layout.dataset_manifests(dataset)}: run `make augment DATASET={dataset}`")
    return dict(sorted(found.items(), key=lambda item: item[0] != "base"))


def _mean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None


def stage_row(manifest: dict[str, Any], scores: StageScores | None) -> dict[str, Any]:
    stats = manifest.get("stats", {})
    features = stats.get("features") or {}
    scorer = (manifest.get("config") or {}).get("scorer") or {}
    row: dict[str, Any] = {
        "stage": manifest["stage"],
        "modality": scores.modality if scores else "",
        "images": manifest["counts"]["written"],
        "skipped": manifest["counts"]["skipped"],
        "with_variants": scores.samples_with_variants if scores else None,
        "variants": stats.get("variants", len(scores.keys) if scores else None),
        "variant_skips": stats.get("variant_skips"),
        "fd_image": features.get("fd_image"),
        "fd_text": features.get("fd_text"),
        "scorer": scorer.get("name"),
    }
    if scores is not None and scores.scored:
        alignment = scores.alignment[~np.isnan(scores.alignment)]
        row["alignment_mean"] = float(alignment.mean())
        row.update({f"alignment_p{round(q * 100)}": float(np.quantile(alignment, q)) for q in QUANTILES})
        row["diversity_mean"] = _mean(scores.diversity)
        row["shift_mean"] = _mean(scores.shift)
    return row


COLUMNS = [  # (row field, table header, format)
    ("stage", "stage", "{}"), ("modality", "mod.", "{}"), ("images", "images", "{:,}"), ("variants", "variants", "{:,}"),
    ("variant_skips", "var. skips", "{:,}"), ("alignment_mean", "align. mean", "{:.3f}"),
    ("alignment_p10", "p10", "{:.3f}"), ("alignment_p50", "p50", "{:.3f}"), ("alignment_p90", "p90", "{:.3f}"),
    ("diversity_mean", "diversity", "{:.3f}"), ("shift_mean", "shift", "{:.2f}"),
    ("fd_image", "FD image", "{:.4f}"), ("fd_text", "FD text", "{:.4f}"),
]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(header for _, header, _ in COLUMNS) + " |",
             "|" + "|".join("---" if name in ("stage", "modality") else "---:" for name, _, _ in COLUMNS) + "|"]
    for row in rows:
        cells = [fmt.format(row[name]) if row.get(name) not in (None, "") else "–" for name, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_histograms(scores: list[StageScores], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for stage in scores:
        ax.hist(stage.alignment[~np.isnan(stage.alignment)], bins=40, histtype="step", density=True,
                linewidth=1.5, label=f"{stage.stage} (n={len(stage.keys):,})")
    ax.set(xlabel="alignment (cosine image-text)", ylabel="density", title="Alignment of augmented pairs per stage")
    ax.legend(fontsize=8)
    fig.tight_layout()
    claim_file(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_scatter(scores: list[StageScores], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    rng = np.random.default_rng(0)
    for stage in scores:
        ok = np.flatnonzero(~np.isnan(stage.alignment) & ~np.isnan(stage.src_sim))
        shown = rng.choice(ok, size=min(len(ok), SCATTER_POINTS), replace=False) if len(ok) else ok
        points = ax.scatter(stage.diversity[shown], stage.alignment[shown], s=4, alpha=0.3)
        ax.scatter(stage.diversity[ok].mean(), stage.alignment[ok].mean(), s=120, marker="*", edgecolors="black",
                   color=points.get_facecolor()[0][:3], label=stage.stage, zorder=3)
    ax.set(xlabel="diversity (1 - cosine to the original)", ylabel="alignment (cosine image-text)",
           title="Augmentation quality: aligned and diverse is up and right")
    ax.legend(fontsize=8)
    fig.tight_layout()
    claim_file(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def frechet_figure(rows: list[dict[str, Any]]) -> Any:
    """One panel per modality (image features, text features), each on its own scale: a stage's Frechet distance
    to the originals, its value written above the bar (a zero drawn as a line with its value), n/a where the stage
    has no distance in that modality."""
    import numpy as np

    plt = pyplot()
    rows = [r for r in rows if r.get("fd_image") is not None or r.get("fd_text") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) + 2), 4))
    positions = np.arange(len(rows))
    for ax, side, color in zip(axes, ("image", "text"), ("tab:blue", "tab:orange")):
        bars(ax, positions, [r.get(f"fd_{side}") for r in rows], 0.6, color, value_format="{:.4f}")
        ax.set_xticks(positions, [r["stage"] for r in rows])
        ax.set(title=f"{side} features", ylabel=f"Frechet distance of {side} features")
        ax.set_ylim(0, max([r.get(f"fd_{side}") or 0.0 for r in rows] + [1e-3]) * 1.2)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Distribution shift per stage: Frechet distance to the originals (lower is closer; {NA}: the "
                 "stage has no distance in that modality)", fontsize=10)
    fig.tight_layout()
    return fig


def _plot_frechet(rows: list[dict[str, Any]], path: Path) -> None:
    save(frechet_figure(rows), path)


def run_stats(dataset: str, layout: Layout, base_data: str | None = None) -> dict[str, Any]:
    """Build the table and the plots; write stats.json, stats.md and plots/*.png; return the stats dict.

    base_data: base shard URLs (shard_urls); each stage's shards are then those beside them, not the folder's."""
    import matplotlib

    matplotlib.use("Agg")
    # 1. Read manifests and the variants' scores.
    manifests = stage_manifests(layout, dataset)
    base_urls = expand_urls(base_data) if base_data is not None else None
    scores = {stage: read_stage_scores(stage, layout.stage_dir(dataset, stage) if base_urls is None
                                       else stage_urls(base_urls, stage))
              for stage in manifests if stage != "base"}
    # 2. Rows.
    rows = [stage_row(manifest, scores.get(stage)) for stage, manifest in manifests.items()]
    # 3. Plots.
    out_dir = layout.dataset_manifests(dataset)
    plot_dir = out_dir / "plots"
    scored = [s for s in scores.values() if s.scored]
    plots = {}
    if scored:
        plots["alignment_hist"] = plot_dir / "alignment_hist.png"
        _plot_histograms(scored, plots["alignment_hist"])
        plots["alignment_vs_diversity"] = plot_dir / "alignment_vs_diversity.png"
        _plot_scatter(scored, plots["alignment_vs_diversity"])
    else:
        log.warning("no stage of %s has scores: run `make pretrain` (or pass SCORER=...) and `make augment`", dataset)
    if any(r.get("fd_image") is not None or r.get("fd_text") is not None for r in rows):
        plots["frechet"] = plot_dir / "frechet.png"
        _plot_frechet(rows, plots["frechet"])
    # 4. Write.
    result = {"dataset": dataset, "rows": rows, "plots": {name: str(path) for name, path in plots.items()},
              PROVENANCE_KEY: provenance()}
    atomic_write_json(out_dir / "stats.json", result)
    table = markdown_table(rows)
    images = "\n".join(f"![{name}](plots/{path.name})" for name, path in plots.items())
    atomic_write_text(out_dir / "stats.md", f"# Stats: {dataset}\n\n{table}\n\n{images}\n")
    result["markdown"] = table
    return result
