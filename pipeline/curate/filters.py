"""`make filter`: choose which augmented variants training uses, without rewriting any shard.

Criteria (combined with AND): alignment >= MIN_ALIGNMENT, shift <= MAX_SHIFT, shift within the
SHIFT_PERCENTILE of the originals' own shift (per modality, from the scorer's reference), and the TOP_FRACTION of
variants by alignment (DataComp's CLIP-score filtering), ranked per stage or over all stages (scope). The filter
manifest MANIFESTS_DIR/<dataset>/filters/<name>.json holds kept/dropped counts and the kept variant indices per
key; training calls `load_filter(path).keeps(stage, key, variant_index)`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import check_choice, check_positive, check_range, option
from pipeline.core.paths import Layout, is_plain_name, plain_name
from pipeline.core.fileio import atomic_write_json
from pipeline.core.provenance import PROVENANCE_KEY, provenance
from pipeline.curate.stats import StageScores, read_stage_scores, stage_manifests

SCOPES = ("stage", "global")


@dataclass(frozen=True)
class FilterConfig:
    name: str = field(default="default", metadata=option("FILTER", "Filter name: MANIFESTS_DIR/<dataset>/filters/<name>.json.", flag="--name"))
    min_alignment: float | None = field(default=None, metadata=option("MIN_ALIGNMENT", "Keep variants with alignment >= this cosine."))
    max_shift: float | None = field(default=None, metadata=option("MAX_SHIFT", "Keep variants with shift <= this (about 1 = a typical original)."))
    shift_percentile: float | None = field(default=None, metadata=option("SHIFT_PERCENTILE", "Drop variants farther from the originals than this percentile (0-100] of the originals themselves."))
    top_fraction: float | None = field(default=None, metadata=option("TOP_FRACTION", "Keep this fraction of variants with the highest alignment (DataComp style)."))
    scope: str = field(default="stage", metadata=option("FILTER_SCOPE", "Rank TOP_FRACTION per stage or global (all stages together).", flag="--scope"))
    stages: tuple[str, ...] = field(default=(), metadata=option("FILTER_STAGES", "Comma-separated stages to filter (default all).", flag="--stages"))

    def __post_init__(self) -> None:
        plain_name(self.name, "filter name")
        if all(v is None for v in (self.min_alignment, self.max_shift, self.shift_percentile, self.top_fraction)):
            raise ValueError("a filter needs at least one of min_alignment, max_shift, shift_percentile, top_fraction")
        check_positive(self, "shift_percentile", "max_shift", "top_fraction")
        check_range("shift_percentile", self.shift_percentile, 0.0, 100.0)
        check_range("min_alignment", self.min_alignment, -1.0, 1.0)  # a cosine
        check_range("top_fraction", self.top_fraction, 0.0, 1.0)
        check_choice("scope", self.scope, SCOPES)
        for stage in self.stages:
            plain_name(stage, "stage")


def _threshold_mask(scores: StageScores, config: FilterConfig, shift_limit: float | None) -> np.ndarray:
    keep = np.ones(len(scores.keys), dtype=bool)
    if config.min_alignment is not None:
        keep &= scores.alignment >= config.min_alignment  # NaN compares False: unscored variants drop
    for limit in (config.max_shift, shift_limit):
        if limit is not None:
            keep &= scores.shift <= limit
    return keep


def shift_limit(manifest: dict[str, Any], scores: StageScores, percentile: float | None) -> float | None:
    """The given percentile of the originals' own shift, on the side(s) the stage changes (from the scorer)."""
    if percentile is None:
        return None
    table = ((manifest.get("config") or {}).get("scorer") or {}).get("reference_shift_percentiles") or {}
    sides = ("image", "text") if scores.modality == "both" else (scores.modality,)
    if not all(side in table for side in sides):
        raise ValueError(f"stage {manifest['stage']!r}: its manifest has no reference shift percentiles "
                         "(scored by an older scorer): rerun `make augment --overwrite` or use MAX_SHIFT")
    return float(np.mean([np.interp(percentile, np.arange(101), table[side]) for side in sides]))


def _top_mask(alignments: np.ndarray, fraction: float) -> np.ndarray:
    """Exactly ceil(fraction * n) variants with the highest alignment (ties broken by position)."""
    keep = np.zeros(len(alignments), dtype=bool)
    count = math.ceil(fraction * len(alignments))
    order = np.argsort(-alignments, kind="stable")
    keep[order[:count]] = True
    return keep


def select(scores: dict[str, StageScores], config: FilterConfig,
           shift_limits: dict[str, float | None] | None = None) -> dict[str, np.ndarray]:
    """{stage: boolean keep mask over its variants}."""
    limits = shift_limits or {}
    masks = {stage: _threshold_mask(s, config, limits.get(stage)) for stage, s in scores.items()}
    if config.top_fraction is not None:
        if config.scope == "stage":
            tops = {stage: _top_mask(s.alignment, config.top_fraction) for stage, s in scores.items()}
        else:
            pooled = _top_mask(np.concatenate([s.alignment for s in scores.values()]), config.top_fraction)
            bounds = np.cumsum([0] + [len(s.keys) for s in scores.values()])
            tops = {stage: pooled[a:b] for stage, a, b in zip(scores, bounds, bounds[1:])}
        masks = {stage: masks[stage] & tops[stage] for stage in masks}
    return masks


def filter_path(layout: Layout, dataset: str, name: str) -> Path:
    return layout.named_output(dataset, "filters", name)


def run_filter(dataset: str, config: FilterConfig, layout: Layout) -> dict[str, Any]:
    """Score-based selection over the dataset's stage shards; writes and returns the filter manifest."""
    # 1. Stages and their scores.
    manifests = stage_manifests(layout, dataset)
    available = [stage for stage in manifests if stage != "base"]
    unknown = sorted(set(config.stages) - set(available))
    if unknown:
        raise ValueError(f"filter stages {unknown} have no manifest for {dataset}; available: {available}")
    chosen = list(config.stages) or available
    scores = {stage: read_stage_scores(stage, layout.stage_dir(dataset, stage)) for stage in chosen}
    unscored = [stage for stage, s in scores.items() if s.keys and not s.scored]
    if unscored:
        raise ValueError(f"stages {unscored} have no scores: rerun `make augment` with a scorer "
                         "(`make pretrain` or SCORER=...), or leave them out with --stages")
    # 2. Select.
    limits = {stage: shift_limit(manifests[stage], s, config.shift_percentile) for stage, s in scores.items() if s.keys}
    masks = select(scores, config, limits)
    # 3. Write.
    stages_out = {}
    for stage, s in scores.items():
        keep: dict[str, list[int]] = {}
        for key, index in zip(np.asarray(s.keys)[masks[stage]], s.index[masks[stage]]):
            keep.setdefault(str(key), []).append(int(index))
        kept = int(masks[stage].sum())
        stages_out[stage] = {"variants": len(s.keys), "kept": kept, "dropped": len(s.keys) - kept,
                             "shift_limit": limits.get(stage), "keep": keep}
    scorers = {stage: (manifests[stage].get("config") or {}).get("scorer") for stage in chosen}
    result = {"name": config.name, "dataset": dataset, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "config": asdict(config), "scorers": scorers, "stages": stages_out, PROVENANCE_KEY: provenance()}
    atomic_write_json(filter_path(layout, dataset, config.name), result)
    return result


@dataclass(frozen=True)
class Filter:
    """Read side: which variants a filter keeps. Stages the filter does not name keep everything."""

    name: str
    kept: dict[str, dict[str, frozenset[int]]]

    def keeps(self, stage: str, key: str, variant_index: int) -> bool:
        if stage not in self.kept:
            return True
        return variant_index in self.kept[stage].get(key, ())

    def counts(self) -> dict[str, int]:
        return {stage: sum(len(v) for v in keys.values()) for stage, keys in self.kept.items()}


def load_filter(path: str | Path) -> Filter:
    data = json.loads(Path(path).read_text())
    kept = {stage: {key: frozenset(indices) for key, indices in info["keep"].items()}
            for stage, info in data["stages"].items()}
    return Filter(data["name"], kept)


def find_filter(name_or_path: str, dataset: str, layout: Layout) -> Path:
    """A filter given as a path, or by name under MANIFESTS_DIR/<dataset>/filters/."""
    candidates = [Path(name_or_path)] + ([filter_path(layout, dataset, name_or_path)] if is_plain_name(name_or_path) else [])
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"filter {name_or_path!r} not found (tried {', '.join(map(str, candidates))}); "
                                f"make it with `make filter DATASET={dataset} FILTER={name_or_path} ...`")
    return found

