"""What every reader shares: the record types, caption cleaning, split assignment, reader options.

Readers (one module each, registered in pipeline/data/sources/__init__.py) import from here, never from the
package, so that the registry may name them without an import cycle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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
    """A reference to an image the worker reads: `TarMember` here, `SynthImage` (synth.py), `HFRow` (hf.py)."""

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
        if isinstance(self.image, (str, Path)):
            try:
                return Path(self.image).read_bytes()
            except FileNotFoundError:
                raise FileNotFoundError(f"missing image file: {self.image}") from None
        return self.image.read()


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
        if min(self.train, self.val, self.test) < 0 or abs(self.train + self.val + self.test - 1) > 1e-6:
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {self}")

    def assign(self, image_id: str) -> str:
        u = stable_fraction("split", image_id)
        if u < self.train:
            return "train"
        return "val" if u < self.train + self.val else "test"


def clean_caption(text: Any) -> str:
    """Collapse whitespace (newlines included); non-ASCII text is kept as it is."""
    if not isinstance(text, str):
        return ""
    return re.sub(r"\s+", " ", text).strip()


def make_record(
    image_id: str, image: ImageRef, raw_captions: list[Any], split: str, source: str
) -> Record | Skip:
    """Clean captions, recording each dropped one (empty, duplicate); skip the image if none is left."""
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
    data_root: Path | None = None
    fractions: SplitFractions = SplitFractions()
    synth_size: int = 4000
    synth_seed: int = 0
    image_column: str = "image"
    caption_column: str = "caption"
    id_column: str | None = None  # hf: the column naming the image (rows sharing it are one image)
    id_prefix: str | None = None  # hf / wds: prefix of the image ids they form (default the format's name)
    split_column: str = "split"  # hf: a column holding each row's split, used when the dataset has it


HF_FILE_SUFFIXES = (".parquet", ".arrow")
