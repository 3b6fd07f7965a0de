"""`make export`: a dataset's filtered one-to-many pairs as a plain WebDataset, for any trainer (open_clip's included).

The pairs are the ones training draws from (pipeline/curate/pairs.py): the base
image and primary caption plus every variant of the chosen stages that the filter keeps (pipeline/curate/filters.py),
each image with every text it pairs with (an image variant depicting caption c only with the texts of caption
c). Training draws one of them at random per image and step; the export writes them all, one sample each:

- `<key>.jpg`: the image (the base image is repeated in each of its pairs);
- `<key>.txt`: the text;
- `<key>.json`: provenance (base key, image id, split; for the image and the text: stage, variant index and
  caption index) and the scores the scorer gave each variant against its original (alignment, src_sim,
  shift), under "image" / "text", when the stage was scored.

Output folder OUT (default SHARDS_DIR/<dataset>/export-<split>): `<split>-NNNNNN.tar` of SHARD_SIZE pairs, each
written under a temporary name and renamed into place, with its `.stats.json`; then `sizes.json` (open_clip
reads it); then `export.json` last: the settings, their fingerprint (inputs' sha256 included), the counts and
the shards. A folder without an `export.json` matching the settings and the shards on disk is an interrupted or
outdated export: its export files are removed and it is written again.

OUT is the export's own: it must be new, empty, or a folder an earlier export claimed in its ledger
(pipeline/core/ledger.py) holding nothing the ledger does not record. Anything else (a folder of one's own, a
stage's shards, an export of a version before the ledger) is refused before anything is written or removed, with
the first foreign file named: choose another EXPORT_DIR, or move that folder away.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import DATASET_OPTION, check_positive, option
from pipeline.core import ledger
from pipeline.core.paths import Layout, plain_name
from pipeline.core.schema import base_record, stage_record
from pipeline.core.shards import list_shards, read_stats, shard_is_done, shard_name, write_sizes, write_stats, write_tar
from pipeline.core.fileio import atomic_write_json, sha256_file
from pipeline.core.provenance import PROVENANCE_KEY, provenance

log = logging.getLogger(__name__)

DONE_FILE = "export.json"
OWNER = "export"  # the claim in the output folder's ledger


def export_stages(spec: str) -> tuple[str, ...]:
    """STAGES as export takes it: comma-separated; `base` (base pairs only) adds no stage."""
    return tuple(s.strip() for s in spec.split(",") if s.strip() and s.strip() != "base")


@dataclass(frozen=True)
class ExportConfig:
    dataset: str = field(default="synth", metadata=DATASET_OPTION)
    split: str = field(default="train", metadata=option("EXPORT_SPLIT", "Split to export.", flag="--split"))
    stages: tuple[str, ...] | None = field(default=None, metadata=option("STAGES", "Comma-separated stages whose variants are exported (default every augmented stage of the dataset; `base`: base pairs only).", parse=export_stages))
    filter: str | None = field(default=None, metadata=option("FILTER", "Filter manifest (path or name) that drops variants, as in training."))
    shard_size: int = field(default=1000, metadata=option("SHARD_SIZE", "Pairs per output shard."))
    out: Path | None = field(default=None, metadata=option("EXPORT_DIR", "Output folder, empty or the pipeline's (default SHARDS_DIR/<dataset>/export-<split>).", flag="--out"))

    def __post_init__(self) -> None:
        plain_name(self.dataset, "dataset")
        plain_name(self.split, "split")
        for stage in self.stages or ():
            plain_name(stage, "stage")
        check_positive(self, "shard_size")


def out_dir(config: ExportConfig, layout: Layout) -> Path:
    return config.out or layout.dataset_shards(config.dataset) / f"export-{config.split}"


def _stages(config: ExportConfig, layout: Layout) -> tuple[str, ...]:
    if config.stages is not None:
        return config.stages
    from pipeline.curate.stats import stage_manifests

    return tuple(stage for stage in stage_manifests(layout, config.dataset) if stage != "base")


def _side(option: Any) -> dict[str, Any]:
    side: dict[str, Any] = {"stage": option.source, "variant": option.variant, "caption_index": option.caption_index}
    scores = option.record.scores() if option.record is not None else {}
    if scores:
        side["scores"] = scores
    return side


def iter_pairs(base_urls: list[str], stages: tuple[str, ...], keep: Any, counts: Counter) -> Iterator[dict[str, Any]]:
    """Every pair as a WebDataset sample, in base order; counts images, variants read and kept."""
    import webdataset as wds

    from pipeline.curate.pairs import compatible_texts, pair_options, zip_stages

    for sample in wds.DataPipeline(wds.SimpleShardList(base_urls), zip_stages(stages)):
        meta = base_record(sample)
        counts["images"] += 1
        for stage in stages:
            counts[f"variants_read/{stage}"] += len(stage_record(sample[stage]).variants)
        images, texts = pair_options(sample, meta, stages, keep)
        for option in images[1:] + texts[1:]:
            counts[f"variants_kept/{option.source}"] += 1
        number = 0
        for image in images:
            for text in compatible_texts(texts, image.caption_index, meta):
                key = f"{sample['__key__']}_{number:04d}"
                number += 1
                counts[f"pairs/{image.source}+{text.source}"] += 1
                info = {"key": key, "base_key": sample["__key__"], "image_id": meta.image_id,
                        "split": meta.split, "image": _side(image), "text": _side(text)}
                yield {"__key__": key, "jpg": image.data, "txt": text.data, "json": info}


def _fingerprint(config: ExportConfig, stages: tuple[str, ...], filter_path: Path | None, base_dir: Path) -> str:
    inputs = {}
    for tar in list_shards(base_dir, config.split):
        for stage_dir in [base_dir] + [base_dir.parent / s for s in stages]:
            inputs[f"{stage_dir.name}/{tar.name}"] = (read_stats(stage_dir / tar.name) or {}).get("sha256")
    settings = {"dataset": config.dataset, "split": config.split, "stages": stages, "shard_size": config.shard_size,
                "filter": sha256_file(filter_path) if filter_path else None, "inputs": inputs}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _is_done(out: Path, fingerprint: str) -> dict[str, Any] | None:
    """The export.json of a complete export with this fingerprint, else None."""
    done = out / DONE_FILE
    if not done.exists():
        return None
    try:
        summary = json.loads(done.read_text())
    except json.JSONDecodeError:
        return None
    listed = [out / Path(s["path"]).name for s in summary.get("shards", [])]
    if summary.get("fingerprint") != fingerprint or sorted(listed) != list_shards(out):
        return None
    return summary if all(shard_is_done(p) for p in listed) else None


def _claim_out(out: Path) -> None:
    """Make `out` the export's folder, or refuse one that is not: see the module docstring."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"export folder {out} is a file: choose another EXPORT_DIR")
    entries = sorted(p for p in out.iterdir() if p.name != ledger.LEDGER) if out.is_dir() else []
    claimed = ledger.read(out).claim == OWNER
    foreign = [p for p in entries if not (claimed and (ledger.is_recorded(p) or ledger.is_own_temp(p)))]
    if foreign:
        raise ledger.ForeignFileError(
            f"refusing to export into {out}: it holds {foreign[0].name}"
            f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, which no earlier export wrote; "
            "set EXPORT_DIR to a new or empty folder, or move this folder's files away")
    ledger.make_dirs(out)
    if not claimed:
        ledger.claim(out, OWNER)


def _remove_export_files(out: Path) -> None:
    """An interrupted or outdated export's files, every one recorded in the folder's ledger."""
    for name in sorted(ledger.read(out).written):
        ledger.remove_own(out / name)
    ledger.remove_own_temps(out)


def run_export(config: ExportConfig, layout: Layout) -> dict[str, Any]:
    """Write (or find up to date) the export; return its summary (the content of export.json)."""
    from pipeline.curate.filters import find_filter, load_filter
    from pipeline.curate.pairs import base_shard_urls

    base_dir = layout.base_dir(config.dataset)
    stages = _stages(config, layout)
    base_urls = base_shard_urls(base_dir, config.split, stages)
    filter_path = find_filter(config.filter, config.dataset, layout) if config.filter else None
    keep = load_filter(filter_path).keeps if filter_path else None
    out = out_dir(config, layout)
    fingerprint = _fingerprint(config, stages, filter_path, base_dir)
    summary = _is_done(out, fingerprint)
    if summary is not None:
        log.info("export %s is up to date (%d pairs)", out, summary["counts"]["pairs"])
        return summary
    _claim_out(out)
    if ledger.read(out).written:
        log.info("export %s is interrupted or outdated: writing it again", out)
        _remove_export_files(out)

    counts: Counter = Counter()
    shards: list[dict[str, Any]] = []
    buffer: list[dict[str, Any]] = []

    def flush() -> None:
        tar = out / shard_name(config.split, len(shards))
        sha256 = write_tar(tar, buffer)
        write_stats(tar, {"shard": tar.name, "sha256": sha256, "samples": len(buffer)})
        shards.append({"path": str(tar), "samples": len(buffer), "sha256": sha256})
        buffer.clear()

    for pair in iter_pairs(base_urls, stages, keep, counts):
        buffer.append(pair)
        if len(buffer) == config.shard_size:
            flush()
    if buffer:
        flush()
    summary = {"dataset": config.dataset, "split": config.split, "stages": list(stages),
               "filter": str(filter_path) if filter_path else None, "shard_size": config.shard_size,
               "fingerprint": fingerprint, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "counts": _reconcile(counts, shards, base_dir, stages, config.split), "shards": shards,
               "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
               PROVENANCE_KEY: provenance()}
    write_sizes(out)
    atomic_write_json(out / DONE_FILE, summary)
    log.info("export %s: %d pairs of %d images in %d shards", out, summary["counts"]["pairs"],
             summary["counts"]["images"], len(shards))
    return summary


def _reconcile(counts: Counter, shards: list[dict[str, Any]], base_dir: Path, stages: tuple[str, ...],
               split: str) -> dict[str, Any]:
    """Counts of the export, checked against the shards' own stats (images, variants) and the written shards."""
    by_pair = {k.split("/", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("pairs/")}
    result: dict[str, Any] = {"images": counts["images"], "pairs": sum(by_pair.values()), "pairs_by_source": by_pair,
                              "variants": {}}
    tars = list_shards(base_dir, split)
    expected_images = sum(int((read_stats(t) or {}).get("samples", 0)) for t in tars)
    problems = []
    if counts["images"] != expected_images:
        problems.append(f"read {counts['images']} base images, the base shards' stats say {expected_images}")
    if sum(s["samples"] for s in shards) != result["pairs"]:
        problems.append(f"wrote {sum(s['samples'] for s in shards)} samples for {result['pairs']} pairs")
    for stage in stages:
        read, kept = counts[f"variants_read/{stage}"], counts[f"variants_kept/{stage}"]
        result["variants"][stage] = {"read": read, "kept": kept, "dropped": read - kept}
        stats = [read_stats(base_dir.parent / stage / t.name) or {} for t in tars]
        if all("variants" in s for s in stats) and sum(int(s["variants"]) for s in stats) != read:
            problems.append(f"stage {stage}: read {read} variants, its shards' stats say "
                            f"{sum(int(s['variants']) for s in stats)}")
    if problems:
        raise ValueError("export counts do not reconcile (shards changed while exporting?): " + "; ".join(problems))
    return result
