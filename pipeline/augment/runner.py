"""`augment`: make sure the base shards exist, then run the chosen stages over them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import apply_overrides, check_device, check_non_negative, check_positive, option, to_dict
from pipeline.data.ingest import IngestConfig, run_ingest
from pipeline.core.manifests import read_manifest, summary_lines
from pipeline.core.paths import Layout, plain_name
from pipeline.core.shards import list_shards, shard_is_done
from pipeline.data.sources import SplitFractions
from pipeline.augment.stage import StageContext, run_stage
from pipeline.core.executor import EXECUTORS, RunOptions
from pipeline.core.shard_urls import base_fingerprints, path_or_spec
from stages import DEFAULT_STAGES, STAGES, get_stage_class

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AugmentConfig:
    """Everything `augment` runs with. `ingest` names the dataset and says how its base shards are made when they
    are missing (an existing base is kept as it was made)."""

    ingest: IngestConfig = field(default_factory=IngestConfig)
    stages: tuple[str, ...] | None = field(default=None, metadata=option("STAGES", "Comma-separated stages (default every stage that can run here: no downloaded model needed, or its model given)."))
    # stage -> option -> value, e.g. {"eda": {"variants_per_caption": 2}}; strings are converted by field type
    stage_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    scorer: str | None = field(default=None, metadata=option("SCORER", "CLIP (HF id or local dir) that scores alignment / shift; default MODELS_DIR/<dataset>/clip when `make pretrain` made it; none: off."))
    seed: int = field(default=0, metadata=option("SEED", "Global seed mixed into every per-sample seed."))
    device: str = field(default="cpu", metadata=option("DEVICE", "cpu, cuda, cuda:N or mps, for the model-based stages."))
    workers: int = field(default=2, metadata=option("WORKERS", "Processes, one shard each at a time."))
    executor: str = field(default="local", metadata=option("EXECUTOR", " | ".join(f"{e.name} ({e.description})" for e in EXECUTORS.entries()) + "."))
    retries: int = field(default=1, metadata=option("RETRIES", "Times a failed shard is retried before it is recorded."))
    overwrite: bool = field(default=False, metadata=option("OVERWRITE", "Redo every stage shard with the settings given instead of resuming.", flag="--overwrite/--resume"))
    # Given, nothing is ingested, and the stage shards still go to SHARDS_DIR/<dataset>/<stage>/.
    base_data: str | None = field(default=None, metadata=option("BASE_DATA", "Base shard URLs instead of SHARDS_DIR/<dataset>/base: a brace pattern (/data/coco/base/train-{000000..000009}.tar), a '::' list or pipe: commands; stage shards are those beside them, by the stage's name."))

    def __post_init__(self) -> None:
        for name in self.stages or ():
            plain_name(name, "stage")
        if not isinstance(self.stage_options, dict) or not all(isinstance(v, dict) for v in self.stage_options.values()):
            raise ValueError(f"stage_options={self.stage_options!r}: must map stage -> option -> value")
        check_positive(self, "workers")
        check_non_negative(self, "retries")
        check_device("device", self.device)

    @property
    def dataset(self) -> str:
        return self.ingest.dataset

    def run_options(self, overwrite: bool | None = None) -> RunOptions:
        overwrite = self.overwrite if overwrite is None else overwrite
        return RunOptions(workers=self.workers, executor=self.executor, retries=self.retries,
                          mode="overwrite" if overwrite else "incremental")


def ensure_base(config: IngestConfig, layout: Layout, options: RunOptions) -> None:
    """Ingest when the base shards are missing (with `config`) or damaged (with the config the base was made with,
    so that the stage shards made from it stay aligned)."""
    dataset = config.dataset
    manifest_path = layout.manifest_path(dataset, "base")
    shards = list_shards(layout.base_dir(dataset))
    saved = _saved_ingest_config(manifest_path) if manifest_path.exists() else None
    if saved is not None:
        _warn_if_other_settings(saved, config)
    if saved is not None and shards and all(shard_is_done(p) for p in shards):
        return
    if saved is not None:
        log.warning("base shards of %s are missing or damaged: re-ingesting them", dataset)
        config = saved
    else:
        log.info("no base shards for %s yet: ingesting first", dataset)
    failed = run_ingest(config, layout, options)["failed_shards"]
    if failed:
        raise ValueError(f"ingest of {dataset}: {len(failed)} base shard(s) failed, first {failed[0]['shard']} "
                         f"({failed[0]['error']}); rerun to resume them")


def _saved_ingest_config(manifest_path: Path) -> IngestConfig:
    saved = read_manifest(manifest_path)["config"]
    saved["data_root"] = path_or_spec(saved["data_root"]) if saved.get("data_root") else None
    saved["fractions"] = SplitFractions(**saved["fractions"])
    return IngestConfig(**saved)


def _warn_if_other_settings(saved: IngestConfig, given: IngestConfig) -> None:
    """The base is kept as it was made: say so when this run asks for other (non-default) ingest settings."""
    old, new, default = to_dict(saved), to_dict(given), to_dict(IngestConfig(dataset=given.dataset))
    differing = [f"{name}={new[name]!r} (base: {old[name]!r})" for name in new
                 if new[name] != old.get(name) and new[name] != default[name] and name != "fmt"]
    if given.fmt is not None and given.fmt != saved.fmt:
        differing.append(f"fmt={given.fmt!r} (base: {saved.fmt!r})")
    if differing:
        log.warning("base shards of %s exist and are kept as they were made; ignoring %s (run `make ingest` with "
                    "them to remake the base)", given.dataset, ", ".join(differing))


def resolve_stages(stage_names: tuple[str, ...] | None, overrides: dict[str, dict[str, Any]]) -> list[tuple[type, Any]]:
    """The (stage class, config) pairs to run. By default, every stage that can run here."""
    explicit = stage_names is not None
    names = list(stage_names) if explicit else list(DEFAULT_STAGES)
    if not explicit:
        names += [name for name in STAGES if name not in names and "model" in overrides.get(name, {})]
    for name in overrides:
        if name not in STAGES:
            raise ValueError(f"--set names unknown stage {name!r}; stages: {', '.join(STAGES)}")
    chosen = []
    for name in names:
        stage_cls = get_stage_class(name)
        config = stage_config(stage_cls, overrides.get(name, {}))
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


def stage_config(stage_cls: type, options: dict[str, Any]) -> Any:
    """A stage's config: its defaults with `options` applied (strings converted by field type)."""
    try:
        return apply_overrides(stage_cls.Config(), {key: "none" if value is None else value for key, value in options.items()})
    except ValueError as error:
        raise ValueError(f"stage {stage_cls.name}: {error}") from error


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


def run_augment(config: AugmentConfig, layout: Layout) -> list[dict[str, Any]]:
    # 1. Validate the request before any work.
    chosen = resolve_stages(config.stages, config.stage_options)
    if not chosen:
        raise ValueError("no stage to run")
    # 2. Base shards (the dataset folder's, never overwritten here, or BASE_DATA's URLs), then the scorer (it fits
    # the reference statistics on the base).
    bases = None
    if config.base_data is not None:
        if config.ingest.data_root is not None:
            raise ValueError("give BASE_DATA (base shard URLs) or DATA_ROOT (a dataset to ingest), not both")
        bases = base_fingerprints(config.base_data)
    else:
        ensure_base(config.ingest, layout, config.run_options(overwrite=False))
    scorer = load_scorer_or_none(config.scorer, config.dataset, layout, bases)
    # 3. Stages, one after the other, each shard-parallel.
    manifests = []
    for stage_cls, stage_cfg in chosen:
        context = StageContext(config.dataset, config.seed, config.device)
        manifest = run_stage(stage_cls, stage_cfg, context, layout, config.run_options(), scorer, bases)
        for line in summary_lines(manifest):
            log.info(line)
        manifests.append(manifest)
    return manifests
