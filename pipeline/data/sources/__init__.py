"""Dataset readers ("sources"): each yields `Record`s (an image with its captions and split) and `Skip`s.

Readers only parse metadata; images are read and validated later, shard by shard, in the workers (a record
holds a path, or a reference such as `TarMember` / `HFRow` that the worker resolves, not the image bytes). A
reader raises `SourceError` for a malformed file (a clear error, nothing written) and yields a `Skip` with its
reason for a bad record, so that nothing is dropped silently.

Readers import their shared types from this package, and the package never imports a reader: `SOURCES` names
each one lazily ("module:function"), and the image references a reader defines (`SynthImage` in synth.py,
`HFRow` in hf.py) read themselves.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from pipeline.core.config import check_positive, check_range
from pipeline.core.registry import Registry
from pipeline.core.seeding import stable_fraction

SPLITS = ("train", "val", "test")


class SourceError(ValueError):
    """The input cannot be read at all (malformed JSON/CSV, missing annotation file, unknown layout)."""


@dataclass(frozen=True)
class TarMember:
    """An image stored in an uncompressed tar (an existing WebDataset shard), read by offset in the worker."""

    tar: Path
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.tar, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(self.size)
        if len(data) != self.size:
            raise OSError(f"truncated tar member in {self.tar} at byte {self.offset}")
        return data


class ImageReader(Protocol):
    """A reference to an image that the worker reads: `TarMember` here, `SynthImage` (synth.py), `HFRow` (hf.py)."""

    def read(self) -> bytes: ...


ImageRef = Path | bytes | ImageReader


@dataclass
class Record:
    image_id: str
    image: ImageRef
    captions: list[str]
    split: str
    source: str
    caption_skips: list[dict[str, str]] = field(default_factory=list)

    def read_image(self) -> bytes:
        if isinstance(self.image, bytes):
            return self.image
        if not isinstance(self.image, (str, Path)):
            return self.image.read()
        try:
            return Path(self.image).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"missing image file: {self.image}") from None


@dataclass(frozen=True)
class Skip:
    source: str
    reason: str


@dataclass(frozen=True)
class SplitFractions:
    """Deterministic split by hashing the image id, for sources without their own splits."""

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):
            check_range(f"fractions.{name}", getattr(self, name), 0.0, 1.0)
        if abs(self.train + self.val + self.test - 1) > 1e-6:
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {self}")

    def assign(self, image_id: str) -> str:
        u = stable_fraction("split", image_id)
        if u < self.train:
            return "train"
        return "val" if u < self.train + self.val else "test"


def clean_caption(text: Any) -> str:
    """Collapse whitespace (newlines and other control characters included); non-ASCII text is kept as it is.
    A caption with no visible character (only control, format such as zero-width spaces, or space) is empty."""
    if not isinstance(text, str):
        return ""
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)
    text = re.sub(r"\s+", " ", text).strip()
    if all(unicodedata.category(c)[0] in "CZ" for c in text):
        return ""
    return text


def image_name_problem(name: Any, allow_absolute: bool = False) -> str | None:
    """Why an image name from an annotation file cannot be used, or None: it must be a non-empty string naming a
    file, relative and inside the image folder (no `..`) unless absolute paths are allowed."""
    if not isinstance(name, str) or not name.strip():
        return f"image name {name!r} is not a non-empty string"
    path = PurePosixPath(name)
    if path.name in ("", ".", ".."):
        return f"image name {name!r} names no file"
    if not allow_absolute and (path.is_absolute() or ".." in path.parts):
        return f"image name {name!r} leaves the image folder"
    return None


def make_record(
    image_id: str, image: ImageRef, raw_captions: list[Any], split: str, source: str
) -> Record | Skip:
    """Clean captions, recording each dropped one (empty, duplicate); skip the image if none is left."""
    if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9]+", split):  # it names shards and keys
        return Skip(source, f"split {split!r} is not a name of letters and digits")
    captions: list[str] = []
    caption_skips: list[dict[str, str]] = []
    for index, raw in enumerate(raw_captions):
        caption = clean_caption(raw)
        if not caption:
            caption_skips.append({"source": f"{source}#caption{index}", "reason": "empty caption"})
        elif caption in captions:
            caption_skips.append({"source": f"{source}#caption{index}", "reason": "duplicate caption"})
        else:
            captions.append(caption)
    if not captions:
        reason = "no caption" if not raw_captions else "no usable caption (all empty or duplicate)"
        return Skip(source, reason)
    return Record(image_id, image, captions, split, source, caption_skips)


@dataclass(frozen=True)
class SourceOptions:
    data_root: Path | str | None = None  # a str: shard URLs (pipeline/core/shard_urls.py), for wds
    fractions: SplitFractions = SplitFractions()
    synth_size: int = 4000
    synth_seed: int = 0
    image_column: str = "image"
    caption_column: str = "caption"
    id_column: str | None = None  # hf: the column naming the image (rows sharing it are one image)
    id_prefix: str | None = None  # hf / wds: prefix of the image ids they form (default the format's name)
    split_column: str = "split"  # hf: a column holding each row's split, used when the dataset has it

    def __post_init__(self) -> None:
        check_positive(self, "synth_size")


# Each reader takes SourceOptions and yields Record | Skip. Needs: "data_root" (DATA_ROOT must be given),
# "local_files" (and must exist here; `hf` also takes a hub id already in the local cache).
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

HF_FILE_SUFFIXES = (".parquet", ".arrow")


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
        with open(path, encoding="utf-8", errors="replace") as handle:  # the reader names a non-UTF-8 file
            head = handle.read(4096).lstrip()
        return "albef" if head.startswith("[") else "karpathy"
    raise SourceError(f"cannot tell the format of {path}: pass FORMAT=...")


def read_source(fmt: str, options: SourceOptions) -> Iterator[Record | Skip]:
    entry = SOURCES.get(fmt)
    if "data_root" in entry.needs and options.data_root is None:
        raise ValueError(f"format {fmt!r} needs DATA_ROOT (the dataset folder or annotation file)")
    # `hf` also takes a hub id already in the local cache, which is no local path; a str is a shard URL spec.
    if isinstance(options.data_root, Path) and not options.data_root.exists() and "local_files" in entry.needs:
        raise SourceError(f"DATA_ROOT {options.data_root} does not exist")
    return entry.load()(options)
