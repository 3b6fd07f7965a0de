"""Manifests: one JSON per (dataset, stage), aggregated from the shards' stats files.

Every stage shard of a manifest was made with the same settings (`build_manifest` refuses otherwise).
Counts reconcile by construction: every input record of a shard is either written or listed in `skipped`
with its reason (a shard that failed after its retries counts all its records as skipped, reason
"shard failed", and is listed in `failed_shards`; rerunning the command resumes it).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.core.executor import TaskResult
from pipeline.core.metrics import frechet_summary, merge_feature_stats
from pipeline.core.shards import list_shards, read_stats, write_sizes
from pipeline.core.fileio import atomic_write_json
from pipeline.core.provenance import PROVENANCE_KEY, provenance

log = logging.getLogger(__name__)


def _merge_counters(stats_list: list[dict[str, Any]], field: str) -> dict[str, int]:
    total: Counter[str] = Counter()
    for stats in stats_list:
        total.update(stats.get(field, {}))
    return dict(sorted(total.items()))


def build_manifest(
    dataset: str,
    stage: str,
    shard_dir: Path,
    config: dict[str, Any],
    results: list[TaskResult] | None = None,
    extra_skipped: list[dict[str, str]] | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Aggregate the committed shards' stats files (plus failures and reader-level skips) into a manifest."""
    committed = [(path, read_stats(path)) for path in list_shards(shard_dir)]
    committed = [(path, stats) for path, stats in committed if stats is not None]
    stats_list = [stats for _, stats in committed]
    fingerprints = {json.dumps(stats["settings"], sort_keys=True) for stats in stats_list if "settings" in stats}
    if len(fingerprints) > 1:
        raise ValueError(f"{shard_dir}: its shards were made with {len(fingerprints)} different settings; "
                         "a manifest never mixes them (rerun the stage with --overwrite)")
    skipped: list[dict[str, str]] = list(extra_skipped or [])
    for stats in stats_list:
        skipped.extend(stats.get("skipped", []))
    failed = []
    for result in results or []:
        if not result.ok:
            first_line = result.error.splitlines()[0] if result.error else "unknown error"
            failed.append({"shard": result.task_id, "error": first_line})
            for source in result.stats.get("sources", []):
                skipped.append({"source": source, "reason": f"shard failed: {first_line}"})
    written = sum(int(stats["samples"]) for stats in stats_list)
    counts = {"input": written + len(skipped), "written": written, "skipped": len(skipped)}
    stage_stats: dict[str, Any] = {
        "splits": _merge_counters(stats_list, "splits"),
        "skip_reasons": dict(Counter(_reason_kind(s["reason"]) for s in skipped).most_common()),
    }
    if any("variants" in stats for stats in stats_list):
        stage_stats["variants"] = sum(int(stats.get("variants", 0)) for stats in stats_list)
        stage_stats["variant_skips"] = sum(int(stats.get("variant_skips", 0)) for stats in stats_list)
        stage_stats["ops"] = _merge_counters(stats_list, "ops")
        stage_stats["variant_skip_reasons"] = _merge_counters(stats_list, "variant_skip_reasons")
    if any("captions" in stats for stats in stats_list):
        stage_stats["captions"] = _merge_counters(stats_list, "captions")
        stage_stats["skipped_captions"] = [skip for stats in stats_list for skip in stats.get("caption_skips", [])]
    features = [stats["features"] for stats in stats_list if stats.get("features")]
    if features:
        stage_stats["features"] = frechet_summary(merge_feature_stats(features))  # only when the stage was scored
    return {
        "dataset": dataset,
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "counts": counts,
        "skipped": skipped,
        "failed_shards": failed,
        "shards": [
            {"path": str(path), "samples": int(stats["samples"]), "sha256": stats["sha256"]} for path, stats in committed
        ],
        "stats": stage_stats,
        PROVENANCE_KEY: provenance(device),
    }


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def write_manifest(path: Path, manifest: dict[str, Any], shard_dir: Path) -> None:
    write_sizes(shard_dir)
    atomic_write_json(path, manifest)
    counts = manifest["counts"]
    if counts["input"] != counts["written"] + counts["skipped"]:
        raise AssertionError(f"manifest counts do not reconcile: {counts}")
    log.info("manifest %s: %s", path, counts)


def read_manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"no manifest at {path}: run the stage first (e.g. `make ingest` / `make augment`)")
    return json.loads(path.read_text())


def summary_lines(manifest: dict[str, Any]) -> list[str]:
    """A few human lines for the terminal."""
    counts, stats = manifest["counts"], manifest["stats"]
    lines = [
        f"{manifest['dataset']}/{manifest['stage']}: {counts['written']} written, {counts['skipped']} skipped "
        f"of {counts['input']} input, {len(manifest['shards'])} shards"
    ]
    if stats.get("splits"):
        lines.append("  splits: " + ", ".join(f"{k}={v}" for k, v in stats["splits"].items()))
    if "variants" in stats:
        lines.append(f"  variants: {stats['variants']} ({stats['variant_skips']} could not be made)")
        if stats.get("variant_skip_reasons"):
            reasons = sorted(stats["variant_skip_reasons"].items(), key=lambda kv: -kv[1])
            lines.append("  variants not made: " + ", ".join(f"{k} ({v})" for k, v in reasons))
    if stats.get("skip_reasons"):
        lines.append("  skip reasons: " + ", ".join(f"{k} ({v})" for k, v in stats["skip_reasons"].items()))
    if manifest.get("failed_shards"):
        lines.append(f"  FAILED shards: {len(manifest['failed_shards'])} — rerun the same command to resume them")
    return lines
