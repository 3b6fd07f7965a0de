"""`augment`: make sure the base shards exist, then run the chosen stages over them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.data.ingest import IngestConfig, run_ingest
from pipeline.core.manifests import read_manifest, summary_lines
from pipeline.core.paths import Layout
from pipeline.core.shards import list_shards, shard_is_done
from pipeline.data.sources import SplitFractions
from pipeline.augment.stage import StageContext, config_from_overrides, run_stage
from pipeline.core.executor import RunOptions
from pipeline.core.shard_urls import base_fingerprints, path_or_spec
from stages import DEFAULT_STAGES, STAGES, get_stage_class

log = logging.getLogger(__name__)


def ensure_base(dataset: str, data_root: Path | None, fmt: str | None, layout: Layout, options: RunOptions) -> None:
    """Ingest when the base shards are missing or damaged, with the config the base was made with if known."""
    manifest_path = layout.manifest_path(dataset, "base")
    shards = list_shards(layout.base_dir(dataset))
    if manifest_path.exists() and shards and all(shard_is_done(p) for p in shards):
        return
    if manifest_path.exists():
        saved = read_manifest(manifest_path)["config"]
        saved["data_root"] = path_or_spec(saved["data_root"]) if saved.get("data_root") else None
        saved["fractions"] = SplitFractions(**saved["fractions"])
        config = IngestConfig(**saved)
        log.warning("base shards of %s are missing or damaged: re-ingesting them", dataset)
    else:
        config = IngestConfig(dataset=dataset, data_root=data_root, fmt=fmt)
        log.info("no base shards for %s yet: ingesting first", dataset)
    run_ingest(config, layout, options)


def resolve_stages(stage_names: str | None, overrides: dict[str, dict[str, str]]) -> list[tuple[type, Any]]:
    """The (stage class, config) pairs to run. By default, every stage that can run here."""
    explicit = stage_names is not None
    names = [n.strip() for n in stage_names.split(",") if n.strip()] if explicit else list(DEFAULT_STAGES)
    if not explicit:
        names += [name for name in STAGES if name not in names and "model" in overrides.get(name, {})]
    for name in overrides:
        if name not in STAGES:
            raise ValueError(f"--set names unknown stage {name!r}; stages: {', '.join(STAGES)}")
    chosen = []
    for name in names:
        stage_cls = get_stage_class(name)
        config = config_from_overrides(stage_cls.Config, overrides.get(name, {}))
        available, reason = stage_cls.availability(config)
        if not available:
            if explicit:
                raise ValueError(f"stage {name} cannot run: {reason}")
            log.warning("stage %s skipped: %s", name, reason)
            continue
        chosen.append((stage_cls, config))
    if not explicit:
        skipped = [name for name in STAGES if name not in names]
        if skipped:
            log.info("generative stages not run: %s (give I2T_MODEL=<dir> / T2I_MODEL=<dir> to enable them)", ", ".join(skipped))
    return chosen


def load_scorer_or_none(scorer_spec: str | None, dataset: str, layout: Layout, bases: list | None = None) -> Any:
    from pipeline.augment.scoring import load_scorer

    scorer = load_scorer(scorer_spec, dataset, layout)
    if scorer is None:
        log.warning(
            "scoring skipped: no scorer for %s (run `make pretrain DATASET=%s` or pass SCORER=<CLIP dir or id>)", dataset, dataset
        )
        return None
    scorer.prepare(layout.base_dir(dataset) if bases is None else bases)
    return scorer


def run_augment(
    *,
    dataset: str,
    data_root: Path | None,
    fmt: str | None,
    stage_names: str | None,
    overrides: dict[str, dict[str, str]],
    scorer_spec: str | None,
    seed: int,
    device: str,
    workers: int,
    executor: str,
    retries: int,
    overwrite: bool,
    layout: Layout,
    base_data: str | None = None,
) -> list[dict[str, Any]]:
    # 1. Validate the request before any work.
    options = RunOptions(workers=workers, executor=executor, retries=retries, mode="overwrite" if overwrite else "incremental")
    chosen = resolve_stages(stage_names, overrides)
    if not chosen:
        raise ValueError("no stage to run")
    # 2. Base shards (the dataset folder's, or BASE_DATA's URLs), then the scorer (it fits the reference on the base).
    bases = None
    if base_data is not None:
        if data_root is not None:
            raise ValueError("give BASE_DATA (base shard URLs) or DATA_ROOT (a dataset to ingest), not both")
        bases = base_fingerprints(base_data)
    else:
        ensure_base(dataset, data_root, fmt, layout, RunOptions(workers=workers, executor=executor, retries=retries))
    scorer = load_scorer_or_none(scorer_spec, dataset, layout, bases)
    # 3. Stages, one after the other, each shard-parallel.
    manifests = []
    for stage_cls, config in chosen:
        manifest = run_stage(stage_cls, config, StageContext(dataset, seed, device), layout, options, scorer, bases)
        for line in summary_lines(manifest):
            log.info(line)
        manifests.append(manifest)
    return manifests
