"""The stage contract, and the runner that turns a stage into shards aligned with the base.

A stage module only says how to augment a batch of base samples (`Stage.augment_batch`). The runner does the
rest, once for every stage: read base shard i, batch, call the stage, score the variants, write shard i with
the same keys in the same order (tar, then stats file last, each atomically), resume, manifest.

Every stage shard's stats file records the settings it was made with (`stage_settings`: the stage's options,
the seed, the scorer, and data outside the config the stage names, e.g. EDA's WordNet and tagger) and the sha256 of the base shard it was made from. A rerun skips a finished shard only
when both still hold; a shard whose base changed is redone, and finished shards made with other settings stop
the run with the differing settings named (`--overwrite` redoes them), so one manifest never mixes settings.

The base shards are the dataset folder's, or a shard URL list (`BASE_DATA`, pipeline/core/shard_urls.py: paths,
brace patterns, `pipe:` commands); a base shard's sha256 and keys are its `fingerprint` there (the stats file
beside a local shard, else the bytes as read). Outputs always go to the dataset folder, named after the base shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from pipeline.core.executor import RunOptions, TaskResult, get_executor
from pipeline.core.images import decode_rgb
from pipeline.core.ledger import make_dirs, remove_own, remove_own_temps
from pipeline.core.manifests import build_manifest, write_manifest
from pipeline.core.paths import Layout
from pipeline.core.schema import StageRecord, VariantRecord, base_record
from pipeline.core.seeding import derive_seed
from pipeline.core.shard_urls import Fingerprint, fingerprint, read_shard
from pipeline.core.shards import ShardError, list_shards, read_stats, shard_is_done, stats_path, write_stats, write_tar

log = logging.getLogger(__name__)




@dataclass
class BaseSample:
    """One image of a base shard with all its captions (captions[meta["primary"]] is the primary one)."""

    key: str
    image_bytes: bytes
    captions: list[str]
    meta: dict[str, Any]

    @cached_property
    def _image(self) -> Image.Image:
        return decode_rgb(self.image_bytes)

    def image(self) -> Image.Image:
        return self._image

    @classmethod
    def from_tar_sample(cls, sample: dict[str, Any]) -> "BaseSample":
        record = base_record(sample)
        return cls(key=sample["__key__"], image_bytes=sample["jpg"], captions=list(record.captions),
                   meta=record.to_dict())


@dataclass
class Variant:
    """One augmented variant. Text stages fill `text`; image stages fill `image_jpeg`.

    caption_index: the caption a text variant was made from, or the caption an image variant depicts;
    None for variants that pair with every caption (an image transform) or describe the image (I2T).
    extra: further metadata stored with the variant (scores land here: alignment, src_sim, shift).
    """

    seed: int
    op: str
    caption_index: int | None
    text: str | None = None
    image_jpeg: bytes | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SampleResult:
    variants: list[Variant] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # [{"caption_index"?, "variant"?, "reason"}]


@dataclass(frozen=True)
class StageContext:
    dataset: str
    seed: int = 0
    device: str = "cpu"


class Stage:
    """Base class of an augmentation stage. Subclasses set `name`, `modality`, `Config` and `augment_batch`."""

    name: ClassVar[str]
    modality: ClassVar[str]  # "text" or "image"

    @dataclass(frozen=True)
    class Config:
        batch_size: int = 32

    def __init__(self, config: Any, context: StageContext):
        self.config = config
        self.context = context

    @classmethod
    def availability(cls, config: Any) -> tuple[bool, str]:
        """Whether the stage can run on this machine, and if not, why and how to enable it."""
        return True, ""

    def setup(self) -> None:
        """Load models or resources; called once per worker process before the first batch."""

    def augment_batch(self, samples: list[BaseSample]) -> list[SampleResult]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Facts for the manifest: model ids and revisions, library versions, settings not in the config."""
        return {}

    @classmethod
    def resource_settings(cls, config: Any) -> dict[str, Any]:
        """Data outside the config that changes the output (e.g. EDA's WordNet and tagger), fingerprinted with
        the settings as ``resources`` when not empty; called once per run in the main process."""
        return {}

    def seed_for(self, key: str, variant: int) -> int:
        return derive_seed(self.context.dataset, self.name, key, variant, self.context.seed)


# ---------------------------------------------------------------- the runner


@dataclass(frozen=True)
class StageJob:
    """One shard of work: everything a worker needs, picklable."""

    stage_cls: type
    config: Any
    context: StageContext
    base_tar: Path | str  # a path, or a shard URL (pipeline/core/shard_urls.py)
    out_tar: Path
    scorer: Any = None
    settings: dict[str, Any] = field(default_factory=dict)  # stage_settings(), recorded in the stats file


_STAGES_IN_PROCESS: dict[tuple, Stage] = {}


def _stage_in_process(job: StageJob) -> Stage:
    """Each worker process builds (and sets up) a stage once, however many shards it processes."""
    cache_key = (job.stage_cls, job.config, job.context)
    if cache_key not in _STAGES_IN_PROCESS:
        stage = job.stage_cls(job.config, job.context)
        stage.setup()
        _STAGES_IN_PROCESS[cache_key] = stage
    return _STAGES_IN_PROCESS[cache_key]


def variant_record(variant: Variant, file_name: str | None) -> VariantRecord:
    record: dict[str, Any] = {"caption_index": variant.caption_index, "seed": variant.seed, "op": variant.op}
    if variant.text is not None:
        record["text"] = variant.text
    if file_name is not None:
        record["file"] = file_name
    record.update(variant.extra)  # the scores, and whatever else the stage stores with the variant
    return VariantRecord.from_dict(record)


def process_shard(job: StageJob) -> TaskResult:
    started = time.perf_counter()
    try:
        base_samples, base_sha256 = read_shard(str(job.base_tar))
        samples = [BaseSample.from_tar_sample(s) for s in base_samples]
    except (ShardError, KeyError, ValueError) as error:
        # Unusable base shard: run_stage records every key it should hold as skipped.
        return TaskResult(job.out_tar.name, ok=False, error=f"base shard unreadable: {error}")
    stage = _stage_in_process(job)
    batch_size = int(getattr(job.config, "batch_size", 32))
    results: list[SampleResult] = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        batch_results = stage.augment_batch(batch)
        if len(batch_results) != len(batch):
            raise RuntimeError(f"stage {stage.name} returned {len(batch_results)} results for {len(batch)} samples")
        results.extend(batch_results)
    features = job.scorer.score_shard(samples, results, stage.modality) if job.scorer is not None else None

    out_samples, ops, skip_reasons = [], Counter(), Counter()
    variants = variant_skips = 0
    for sample, result in zip(samples, results):
        out: dict[str, Any] = {"__key__": sample.key}
        records = []
        for index, variant in enumerate(result.variants):
            file_name = None
            if variant.image_jpeg is not None:
                file_name = f"v{index}.jpg"
                out[file_name] = variant.image_jpeg
            records.append(variant_record(variant, file_name))
            ops[variant.op] += 1
        out["json"] = StageRecord(records, result.skipped, key=sample.key, stage=stage.name).to_json()
        out_samples.append(out)
        variants += len(result.variants)
        variant_skips += len(result.skipped)
        skip_reasons.update(str(s.get("reason", "")).split(":", 1)[0] for s in result.skipped)
    sha256 = write_tar(job.out_tar, out_samples)
    stats = {
        "shard": job.out_tar.name,
        "sha256": sha256,
        "input": len(samples),
        "samples": len(out_samples),
        "skipped": [],
        "keys": [s.key for s in samples],
        "splits": {samples[0].meta.get("split", "?"): len(samples)} if samples else {},
        "variants": variants,
        "variant_skips": variant_skips,
        "variant_skip_reasons": dict(skip_reasons),
        "ops": dict(ops),
        "features": features,
        "settings": job.settings,
        "base_sha256": base_sha256,
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_stats(job.out_tar, stats)
    return TaskResult(job.out_tar.name, ok=True, stats=stats)


def _scorer_settings(scorer: Any) -> dict[str, Any] | None:
    """What of the scorer changes the scores: its weights (a content digest for a local dir) and its options."""
    if scorer is None:
        return None
    facts = scorer.describe()
    kept = {k: facts.get(k) for k in ("revision", "precision", "shrinkage", "reference_samples")}
    if not str(kept["revision"]).startswith("sha256:"):  # a hub model: its id and commit say which weights
        kept["name"] = facts.get("name")
    return kept


def stage_settings(config: Any, context: StageContext, scorer: Any = None,
                   resources: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings fingerprinted in every shard's stats file, as JSON values (tuples become lists).

    A config field with `metadata={"fingerprint": False}` (whom to trust, not what to compute) is left out.
    ``resources`` (``Stage.resource_settings``) is recorded only when not empty, so that stages without any keep
    the fingerprints of shards made before it existed."""
    skipped = {f.name for f in dataclasses.fields(config) if not f.metadata.get("fingerprint", True)}
    options = {k: v for k, v in dataclasses.asdict(config).items() if k not in skipped}
    settings = {"stage": options, "seed": context.seed, "scorer": _scorer_settings(scorer)}
    if resources:
        settings["resources"] = resources
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def settings_differences(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """'name: old -> new' for every setting that differs ('(not recorded)' for shards of older versions)."""
    if old is None:
        return ["settings: (not recorded) -> " + settings_digest(new)]
    before, after = _flatten(old), _flatten(new)
    return [f"{name}: {before.get(name, '(unset)')!r} -> {after.get(name, '(unset)')!r}"
            for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]


class SettingsChanged(ValueError):
    """Finished shards were made with other settings than this run's."""


def _plan(base: Fingerprint, out_tar: Path, settings: dict[str, Any], mode: str) -> tuple[bool, list[str]]:
    """(redo this shard?, settings that differ from the finished shard's)."""
    if mode == "overwrite" or not shard_is_done(out_tar) or not _aligned(base, out_tar):
        return True, []
    out_stats = read_stats(out_tar) or {}
    differences = settings_differences(out_stats.get("settings"), settings)
    if differences:
        return False, differences
    if out_stats.get("base_sha256") != base.sha256:
        log.info("%s: its base shard changed since it was made: redoing it", out_tar)
        return True, []
    return False, []


def run_stage(
    stage_cls: type,
    config: Any,
    context: StageContext,
    layout: Layout,
    options: RunOptions = RunOptions(),
    scorer: Any = None,
    bases: list[Fingerprint] | None = None,
) -> dict[str, Any]:
    """Run a stage over every base shard of the dataset, or over `bases` (shard_urls.base_fingerprints of a URL
    spec); return the manifest (also written to disk)."""
    # 1. Check inputs.
    if bases is None:
        base_dir = layout.base_dir(context.dataset)
        bases = [fingerprint(str(p)) for p in list_shards(base_dir) if read_stats(p) is not None]
        if not bases:
            raise FileNotFoundError(f"no base shards in {base_dir}: run `make ingest DATASET={context.dataset}` first")
    base_of = {base.name: base for base in bases}
    out_dir = layout.stage_dir(context.dataset, stage_cls.name)
    make_dirs(out_dir)
    remove_own_temps(out_dir)  # left by a killed run

    # 2. Plan: one job per base shard, skipping shards already done with these settings (unless overwriting).
    settings = stage_settings(config, context, scorer, stage_cls.resource_settings(config))
    jobs, changed = [], {}
    for base in bases:
        out_tar = out_dir / base.name
        redo, differences = _plan(base, out_tar, settings, options.mode)
        if differences:
            changed[out_tar.name] = differences
        elif redo:
            jobs.append((out_tar.name, StageJob(stage_cls, config, context, base.url, out_tar, scorer, settings)))
    if changed:
        names = sorted({d for diffs in changed.values() for d in diffs})
        raise SettingsChanged(
            f"stage {stage_cls.name}: {len(changed)} finished shard(s) in {out_dir} were made with other settings "
            f"({'; '.join(names)}). Rerun with --overwrite to redo the stage with the new settings, or write "
            f"the new run elsewhere (other SHARDS_DIR and MANIFESTS_DIR) to keep both."
        )
    for _, job in jobs:  # until redone, a shard is not finished: a failure cannot leave old-settings shards behind
        remove_own(stats_path(job.out_tar))
    log.info("%s/%s: %d of %d shards to do", context.dataset, stage_cls.name, len(jobs), len(bases))

    # 3. Run.
    results = get_executor(options.executor)(process_shard, jobs, options.workers, stage_cls.name, options.retries)
    for (_, job), result in zip(jobs, results):
        if not result.ok:  # unreadable base, raised, or its process died: its keys count as skipped
            result.stats["sources"] = list(base_of[job.out_tar.name].keys)

    # 4. Manifest, from the stats files.
    stage = stage_cls(config, context)
    manifest_config = {
        "stage": dataclasses.asdict(config),
        "seed": context.seed,
        "device": context.device,
        "describe": stage.describe(),
        "scorer": scorer.describe() if scorer is not None else None,
        "settings": settings,
        "fingerprint": settings_digest(settings),
    }
    manifest = build_manifest(context.dataset, stage_cls.name, out_dir, manifest_config, results, device=context.device)
    write_manifest(layout.manifest_path(context.dataset, stage_cls.name), manifest, out_dir)
    return manifest


def _aligned(base: Fingerprint, out_tar: Path) -> bool:
    """A stage shard is current only if it was made from the base shard there now (same keys)."""
    out_stats = read_stats(out_tar)
    return bool(out_stats and list(base.keys) == out_stats.get("keys"))

