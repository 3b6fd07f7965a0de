"""Dataset readers ("sources"): each yields `Record`s (an image with its captions and split) and `Skip`s.

Readers only parse metadata; images are read and validated later, shard by shard, in the workers (a record
holds a path, or a reference such as `TarMember` / `HFRow` that the worker resolves, not the image bytes). A
reader raises `SourceError` for a malformed file (a clear error, nothing written) and yields a `Skip` with its
reason for a bad record, so that nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pipeline.core.registry import Registry
from pipeline.data.sources.base import (
    HF_FILE_SUFFIXES,
    SPLITS,
    ImageRef,
    Record,
    Skip,
    SourceError,
    SourceOptions,
    SplitFractions,
    TarMember,
    clean_caption,
    make_record,
)

# Each reader is a function taking SourceOptions and yielding Record | Skip. Needs: "data_root" (DATA_ROOT must be
# given), "local_files" (and must exist here: `hf` also takes a hub id already in the local cache).
SOURCES = Registry("format")
SOURCES.register("synth", "pipeline.data.sources.synth:read_synth", description="the embedded procedural dataset")
SOURCES.register("coco", "pipeline.data.sources.coco:read_coco", needs={"data_root", "local_files"},
                 description="COCO captions (annotations/captions_*.json + image folders)")
SOURCES.register("karpathy", "pipeline.data.sources.karpathy:read_karpathy", needs={"data_root", "local_files"},
                 description="Karpathy split JSON (dataset_coco.json, dataset_flickr30k.json)")
SOURCES.register("albef", "pipeline.data.sources.albef:read_albef", needs={"data_root", "local_files"},
                 description="ALBEF / SGA JSON list of {image, caption}")
SOURCES.register("csv", "pipeline.data.sources.table:read_table", needs={"data_root", "local_files"},
                 description="CSV / TSV table of image paths and captions")
SOURCES.register("imagefolder", "pipeline.data.sources.imagefolder:read_imagefolder",
                 needs={"data_root", "local_files"}, description="Hugging Face imagefolder (metadata.jsonl)")
SOURCES.register("hf", "pipeline.data.sources.hf:read_hf", needs={"data_root"},
                 description="Hugging Face dataset (save_to_disk folder, parquet / arrow files, cached hub id)")
SOURCES.register("wds", "pipeline.data.sources.wds:read_wds", needs={"data_root", "local_files"},
                 description="WebDataset / img2dataset tar shards")

__all__ = [
    "HF_FILE_SUFFIXES", "SOURCES", "SPLITS", "ImageRef", "Record", "Skip", "SourceError", "SourceOptions",
    "SplitFractions", "TarMember", "clean_caption", "detect_format", "make_record", "read_source",
]


def detect_format(data_root: Path) -> str:
    """Guess the input format from the files under data_root."""
    if not data_root.exists():
        raise SourceError(f"DATA_ROOT {data_root} does not exist")
    if data_root.is_file():
        return _format_of_file(data_root)
    if list(data_root.glob("annotations/captions_*20*.json")):
        return "coco"
    if (data_root / "metadata.jsonl").exists() or list(data_root.glob("*/metadata.jsonl")):
        return "imagefolder"
    # Before the *.json check: shard folders hold *.stats.json / *_stats.json, save_to_disk folders state.json.
    if list(data_root.glob("*.tar")):
        return "wds"
    if (data_root / "dataset_dict.json").exists() or (data_root / "state.json").exists():
        return "hf"
    if any(p.suffix in HF_FILE_SUFFIXES for p in data_root.iterdir()):
        return "hf"
    for path in sorted(data_root.glob("*.json")):
        return _format_of_file(path)
    if list(data_root.glob("*.csv")) or list(data_root.glob("*.tsv")) or list(data_root.glob("*.txt")):
        return "csv"
    raise SourceError(f"cannot tell the format of {data_root}: pass FORMAT={'|'.join(SOURCES.names(needs={'data_root'}))}")


def _format_of_file(path: Path) -> str:
    if path.suffix in (".csv", ".tsv", ".txt"):
        return "csv"
    if path.suffix == ".tar":
        return "wds"
    if path.suffix in HF_FILE_SUFFIXES:
        return "hf"
    if path.name.startswith("dataset_") and path.suffix == ".json":
        return "karpathy"
    if path.suffix == ".json":
        with open(path, encoding="utf-8") as handle:
            head = handle.read(4096).lstrip()
        return "albef" if head.startswith("[") else "karpathy"
    raise SourceError(f"cannot tell the format of {path}: pass FORMAT=...")


def read_source(fmt: str, options: SourceOptions) -> Iterator[Record | Skip]:
    entry = SOURCES.get(fmt)
    if "data_root" in entry.needs and options.data_root is None:
        raise ValueError(f"format {fmt!r} needs DATA_ROOT (the dataset folder or annotation file)")
    if options.data_root is not None and not options.data_root.exists() and "local_files" in entry.needs:
        raise SourceError(f"DATA_ROOT {options.data_root} does not exist")
    return entry.load()(options)
