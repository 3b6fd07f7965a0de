"""`ingest`: a source → base shards `SHARDS_DIR/<dataset>/base/<split>-NNNNNN.tar` + the base manifest.

A re-ingest that changes the base (another SHARD_SIZE, source, limit, ...) makes the stages built on it stale:
their shards made from a base shard that is gone or different are removed, with their stage's manifest, and a
warning names each stage to augment again (`invalidate_stages`). Stage shards of an unchanged base shard stay.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import DATASET_OPTION, check_positive, option
from pipeline.core.executor import TaskResult, get_executor
from pipeline.core.images import DEFAULT_MAX_PIXELS, ImageError, prepare_image
from pipeline.core.manifests import build_manifest, write_manifest
from pipeline.core.paths import Layout, plain_name
from pipeline.core.ledger import make_dirs, remove_own, remove_own_temps
from pipeline.core.schema import BaseRecord
from pipeline.core.shard_urls import expand_urls, is_local, path_or_spec
from pipeline.core.shards import (list_shards, read_stats, sample_key, shard_is_done, shard_name, stats_path, write_sizes,
                                  write_stats, write_tar)
from pipeline.data.sources import SOURCES, Record, Skip, SourceOptions, SplitFractions, detect_format, read_source
from pipeline.core.executor import RunOptions

log = logging.getLogger(__name__)


def parse_fractions(spec: str) -> dict[str, float]:
    """SPLIT_FRACTIONS: "0.8,0.1,0.1" -> the train, val and test fractions."""
    parts = spec.split(",")
    if len(parts) > 3:
        raise ValueError("give train,val,test")
    return {name: float(part) for name, part in zip(("train", "val", "test"), parts)}


@dataclass(frozen=True)
class IngestConfig:
    dataset: str = field(default="synth", metadata=DATASET_OPTION)
    fmt: str | None = field(default=None, metadata=option("FORMAT", f"{' | '.join(SOURCES)} (detected from DATA_ROOT when empty).", flag="--format"))
    # a str: shard URLs (pipeline/core/shard_urls.py), read by FORMAT=wds
    data_root: Path | str | None = field(default=None, metadata=option("DATA_ROOT", "Dataset folder or annotation file; FORMAT=wds: also shard URLs (a brace pattern, a '::' list, pipe: commands).", parse=path_or_spec))
    shard_size: int = field(default=500, metadata=option("SHARD_SIZE", "Images per shard."))
    max_side: int | None = field(default=None, metadata=option("MAX_SIDE", "Resize images whose longer side exceeds this (default: keep as is)."))
    max_pixels: int = DEFAULT_MAX_PIXELS
    fractions: SplitFractions = field(default=SplitFractions(), metadata=option("SPLIT_FRACTIONS", "train,val,test fractions for sources without splits (default 0.8,0.1,0.1).", flag="--split-fractions", parse=parse_fractions))
    synth_size: int = field(default=4000, metadata=option("SYNTH_SIZE", "Images in the embedded synth dataset."))
    synth_seed: int = field(default=0, metadata=option("SYNTH_SEED", "Seed of the synth dataset."))
    image_column: str = field(default="image", metadata=option("IMAGE_COLUMN", "CSV/TSV/hf: the image column (hf: an Image feature, bytes or paths)."))
    caption_column: str = field(default="caption", metadata=option("CAPTION_COLUMN", "CSV/TSV/imagefolder/hf: the caption column (hf: a list, or one caption per row)."))
    id_column: str | None = field(default=None, metadata=option("ID_COLUMN", "hf: the column naming the image (rows sharing it are one image); default the image path."))
    id_prefix: str | None = field(default=None, metadata=option("ID_PREFIX", "hf/wds: prefix of the image ids they form (default hf / wds)."))
    split_column: str = field(default="split", metadata=option("SPLIT_COLUMN", "hf: a column holding each row's split, used when present."))
    limit: int | None = field(default=None, metadata=option("LIMIT", "Only the first N images of the source, bad ones included (a quick try on a big dataset)."))

    def __post_init__(self) -> None:
        check_positive(self, "limit", "shard_size", "max_pixels", "synth_size")
        if self.max_side is not None and self.max_side < 8:
            raise ValueError(f"max_side={self.max_side!r}: must be >= 8 pixels")
        plain_name(self.dataset, "dataset")
        if isinstance(self.data_root, str) and self.fmt not in (None, "wds"):
            raise ValueError(f"DATA_ROOT {self.data_root!r} is a shard URL spec: only FORMAT=wds reads one")

    def source_options(self) -> SourceOptions:
        """What the source reader takes (the rest is how shards are cut and images prepared)."""
        return SourceOptions(
            data_root=self.data_root, fractions=self.fractions, synth_size=self.synth_size,
            synth_seed=self.synth_seed, image_column=self.image_column, caption_column=self.caption_column,
            id_column=self.id_column, id_prefix=self.id_prefix, split_column=self.split_column,
        )

    def resolved_format(self) -> str:
        if self.fmt:
            return self.fmt
        if self.data_root is None:
            if self.dataset == "synth":
                return "synth"
            raise ValueError(f"dataset {self.dataset!r} needs DATA_ROOT (and FORMAT unless it can be detected)")
        if isinstance(self.data_root, str):
            return "wds"
        return detect_format(self.data_root)


@dataclass(frozen=True)
class IngestJob:
    out_tar: Path
    split: str
    shard_index: int
    records: tuple[Record, ...]
    max_side: int | None
    max_pixels: int

    def plan_hash(self) -> str:
        text = "\n".join(f"{r.image_id}\t{r.source}\t{'|'.join(r.captions)}" for r in self.records)
        return hashlib.sha256(f"{self.max_side}|{self.max_pixels}\n{text}".encode()).hexdigest()


def ingest_shard(job: IngestJob) -> TaskResult:
    started = time.perf_counter()
    samples, skipped, keys = [], [], []
    caption_skips: list[dict[str, str]] = []
    captions_in = captions_out = 0
    for index, record in enumerate(job.records):
        captions_in += len(record.captions) + len(record.caption_skips)
        caption_skips.extend(record.caption_skips)
        try:
            prepared = prepare_image(record.read_image(), job.max_side, job.max_pixels)
        except (ImageError, OSError) as error:
            skipped.append({"source": record.source, "reason": str(error)})
            caption_skips.extend({"source": f"{record.source}#caption{i}", "reason": "image skipped"} for i in range(len(record.captions)))
            continue
        key = sample_key(job.split, job.shard_index, index)
        meta = BaseRecord(captions=list(record.captions), primary=0, key=key, image_id=record.image_id,
                          split=record.split, source=record.source, width=prepared.width, height=prepared.height,
                          converted=prepared.converted)
        samples.append({"__key__": key, "jpg": prepared.jpeg, "txt": record.captions[0], "json": meta.to_json()})
        keys.append(key)
        captions_out += len(record.captions)
    sha256 = write_tar(job.out_tar, samples)
    stats = {
        "shard": job.out_tar.name,
        "sha256": sha256,
        "plan": job.plan_hash(),
        "input": len(job.records),
        "samples": len(samples),
        "skipped": skipped,
        "keys": keys,
        "splits": {job.split: len(samples)},
        "captions": {"input": captions_in, "written": captions_out, "skipped": len(caption_skips)},
        "caption_skips": caption_skips,
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_stats(job.out_tar, stats)
    return TaskResult(job.out_tar.name, ok=True, stats=stats)


def plan_shards(records: list[Record], out_dir: Path, config: IngestConfig) -> list[IngestJob]:
    by_split: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_split[record.split].append(record)
    jobs = []
    for split in sorted(by_split):
        split_records = sorted(by_split[split], key=lambda r: r.image_id)
        for shard_index, start in enumerate(range(0, len(split_records), config.shard_size)):
            chunk = tuple(split_records[start : start + config.shard_size])
            jobs.append(IngestJob(out_dir / shard_name(split, shard_index), split, shard_index, chunk, config.max_side, config.max_pixels))
    return jobs


def _local_roots(data_root: Path | str | None) -> list[Path]:
    if isinstance(data_root, str):
        return [Path(url).expanduser() for url in expand_urls(data_root) if is_local(url)]
    return [] if data_root is None else [data_root]


def invalidate_stages(layout: Layout, dataset: str) -> list[str]:
    """Remove every stage shard of `dataset` not made from the base shard of its name as it is now (a stage shard's
    stats record the `base_sha256` it was made from), and the manifest of each stage that lost shards; return those
    stages. Folders whose shards record no base (not a stage's) are left alone."""
    base_dir = layout.base_dir(dataset)
    current = {p.name: (read_stats(p) or {}).get("sha256") for p in list_shards(base_dir)}
    stale_stages = []
    for stage_dir in sorted(p for p in layout.dataset_shards(dataset).iterdir() if p.is_dir() and p != base_dir):
        stale = [tar for tar in list_shards(stage_dir)
                 if "base_sha256" in (stats := read_stats(tar) or {}) and stats["base_sha256"] != current.get(tar.name)]
        if not stale:
            continue
        for tar in stale:  # the ledger's: a shard or manifest the pipeline did not write stops it, named
            remove_own(stats_path(tar))
            remove_own(tar)
        write_sizes(stage_dir)
        remove_own(layout.manifest_path(dataset, stage_dir.name))
        stale_stages.append(stage_dir.name)
        log.warning("the base of %s changed: removed %d shard(s) of stage %s made from the old base and its manifest; "
                    "run `make augment DATASET=%s STAGES=%s` to rebuild it", dataset, len(stale), stage_dir.name,
                    dataset, stage_dir.name)
    return stale_stages


def run_ingest(config: IngestConfig, layout: Layout, options: RunOptions = RunOptions()) -> dict[str, Any]:
    """Read the source, write the base shards (resuming done ones), and write the base manifest."""
    # 1. Read the source's metadata (images are read in the workers).
    fmt = config.resolved_format()
    out_dir = layout.base_dir(config.dataset)
    if any(Path(root).resolve().is_relative_to(out_dir.resolve()) for root in _local_roots(config.data_root)):
        # e.g. a wds ingest of shards/<dataset>/base into the same dataset would overwrite what it reads
        raise ValueError(f"DATA_ROOT {config.data_root} is inside the output {out_dir}: ingest into another DATASET")
    source_options = config.source_options()
    records: list[Record] = []
    reader_skips: list[dict[str, str]] = []
    # The limit is part of the config (manifest, settings); another limit changes the records, so the shard plans.
    for item in itertools.islice(read_source(fmt, source_options), config.limit):
        if isinstance(item, Skip):
            reader_skips.append({"source": item.source, "reason": item.reason})
        else:
            records.append(item)
    if not records:
        raise ValueError(f"no usable record in the {fmt} source {config.data_root or ''} ({len(reader_skips)} skipped)")
    log.info("%s (%s): %d images, %d skipped while reading", config.dataset, fmt, len(records), len(reader_skips))

    # 2. Plan shards; keep those already done with the same plan, remove shards no longer in the plan.
    make_dirs(out_dir)
    remove_own_temps(out_dir)  # left by a killed run
    jobs = plan_shards(records, out_dir, config)
    planned = {job.out_tar.name for job in jobs}
    for stale in list_shards(out_dir):
        if stale.name not in planned:
            log.warning("removing %s: not part of this ingest plan", stale)
            remove_own(stats_path(stale))
            remove_own(stale)
    todo = [
        (job.out_tar.name, job)
        for job in jobs
        if options.mode == "overwrite" or not shard_is_done(job.out_tar) or (read_stats(job.out_tar) or {}).get("plan") != job.plan_hash()
    ]
    log.info("%d of %d base shards to write", len(todo), len(jobs))

    # 3. Write shards.
    results = get_executor(options.executor)(ingest_shard, todo, options.workers, "ingest", options.retries)
    for result, (_, job) in zip(results, todo):
        if not result.ok:
            result.stats["sources"] = [r.source for r in job.records]

    # 4. Stages made from a base shard that changed or is gone are stale; then the manifest.
    invalidate_stages(layout, config.dataset)
    config_record = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()}
    config_record["fmt"] = fmt
    manifest = build_manifest(config.dataset, "base", out_dir, config_record, results, extra_skipped=reader_skips)
    write_manifest(layout.manifest_path(config.dataset, "base"), manifest, out_dir)
    return manifest
