"""The per-sample JSON of the shards, as dataclasses: one reader and one writer of each record.

- :class:`BaseRecord`: ``<key>.json`` of a base shard (``make ingest``): the image's captions, which is primary,
  split, source, size;
- :class:`StageRecord`: ``<key>.json`` of a stage shard (``make augment``): the variants (:class:`VariantRecord`,
  a text or an image file, the caption it derives from, seed, op and the scorer's scores) and the skips.

Versions: :data:`SCHEMA_VERSION` is the version these classes write. Version 1 carries no version field (every
shard written so far), so its bytes stay what they were; a later version will write ``"schema_version"``, and a
reader refuses a version it does not know (:class:`SchemaVersionError`) rather than misread it. Keys a class does
not know are kept in ``extra`` and written back, so a record as the writers write it reads and writes back byte
for byte.

``to_json`` gives the member's text as the shard writer encodes a dict (:func:`pipeline.core.shards.json_text`:
sorted keys, no ASCII escaping). A field that may be absent is written only when it is not None; the fields every
writer writes (captions, primary, variants, skipped, caption_index) are always written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.shards import json_text, read_tar, require_shards

SCHEMA_VERSION = 1
VERSION_KEY = "schema_version"
#: The scores the scorer gives a variant (pipeline/augment/scoring.py), stored with it.
SCORES = ("alignment", "src_sim", "shift")


class SchemaError(ValueError):
    """A per-sample JSON that is not a record of the expected kind."""


class SchemaVersionError(SchemaError):
    """A record written by a schema version this code does not know."""


def _parse(text: str | bytes, what: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SchemaError(f"{what} is not valid JSON: {error}") from error


def _load(value: Any, what: str) -> dict[str, Any]:
    """The record's fields once its version is checked (the version field itself left out)."""
    if not isinstance(value, dict):
        raise SchemaError(f"{what} must be a JSON object, got {type(value).__name__}")
    version = value.get(VERSION_KEY, 1)  # files without the field are version 1
    if type(version) is not int or version != SCHEMA_VERSION:  # true == 1 and 1.0 == 1 in Python: not versions
        raise SchemaVersionError(f"{what} has {VERSION_KEY}={version!r}; this code reads version {SCHEMA_VERSION} "
                                 "only: update the pipeline, or re-create the shards with this version")
    return {k: v for k, v in value.items() if k != VERSION_KEY}


def _list(value: Any, name: str, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise SchemaError(f"{what}: {name!r} must be a list, got {type(value).__name__}")
    return value


def _with_optional(record: dict[str, Any], optional: dict[str, Any]) -> dict[str, Any]:
    record.update((k, v) for k, v in optional.items() if v is not None)
    return record


@dataclass
class BaseRecord:
    """A base sample's metadata; ``captions[primary]`` is the primary caption (the ``.txt`` member)."""

    captions: list[str] = field(default_factory=list)
    primary: int = 0
    key: str | None = None
    image_id: str | None = None
    split: str | None = None
    source: str | None = None
    width: int | None = None
    height: int | None = None
    converted: str = ""  # what ingest did to the image ("RGBA->RGB", "resized"...); written only when non-empty
    extra: dict[str, Any] = field(default_factory=dict)

    _FIELDS = ("captions", "primary", "key", "image_id", "split", "source", "width", "height", "converted")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseRecord:
        data = _load(data, "base record")
        captions = _list(data.get("captions", []), "captions", "base record")
        return cls(captions=list(captions), primary=int(data.get("primary", 0)), key=data.get("key"),
                   image_id=data.get("image_id"), split=data.get("split"), source=data.get("source"),
                   width=data.get("width"), height=data.get("height"), converted=data.get("converted") or "",
                   extra={k: v for k, v in data.items() if k not in cls._FIELDS})

    @classmethod
    def from_json(cls, text: str | bytes) -> BaseRecord:
        return cls.from_dict(_parse(text, "base record"))

    def to_dict(self) -> dict[str, Any]:
        record = _with_optional({"captions": list(self.captions), "primary": self.primary},
                                {"key": self.key, "image_id": self.image_id, "split": self.split,
                                 "source": self.source, "width": self.width, "height": self.height,
                                 "converted": self.converted or None})
        record.update(self.extra)
        return record

    def to_json(self) -> str:
        return json_text(self.to_dict())

    @property
    def primary_caption(self) -> str:
        return self.captions[self.primary]


@dataclass
class VariantRecord:
    """One variant of a stage record: ``text`` for a text variant, ``file`` (the member, ``vN.jpg``) for an image.

    caption_index: the caption it derives from or depicts; None when it pairs with every caption.
    alignment / src_sim / shift: the scorer's scores (None when not scored; src_sim and shift also when the
    variant changes nothing). extra: anything else a stage stored with it.
    """

    caption_index: int | None = None
    seed: int | None = None
    op: str | None = None
    text: str | None = None
    file: str | None = None
    alignment: float | None = None
    src_sim: float | None = None
    shift: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _FIELDS = ("caption_index", "seed", "op", "text", "file", *SCORES)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantRecord:
        if not isinstance(data, dict):
            raise SchemaError(f"a variant must be a JSON object, got {type(data).__name__}")
        return cls(**{name: data.get(name) for name in cls._FIELDS},
                   extra={k: v for k, v in data.items() if k not in cls._FIELDS})

    def to_dict(self) -> dict[str, Any]:
        record = _with_optional({"caption_index": self.caption_index},
                                {"seed": self.seed, "op": self.op, "text": self.text, "file": self.file,
                                 **self.scores()})
        record.update(self.extra)
        return record

    def scores(self) -> dict[str, float]:
        """The scores it has, by name (alignment, src_sim, shift)."""
        return {name: getattr(self, name) for name in SCORES if getattr(self, name) is not None}

    @property
    def is_image(self) -> bool:
        return self.file is not None


@dataclass
class StageRecord:
    """A stage sample's metadata: the variants the stage made of the base sample of the same key, and what it skipped
    (``{"caption_index"?, "variant"?, "reason"}`` each)."""

    variants: list[VariantRecord] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    key: str | None = None
    stage: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _FIELDS = ("variants", "skipped", "key", "stage")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageRecord:
        data = _load(data, "stage record")
        variants = _list(data.get("variants", []), "variants", "stage record")
        return cls(variants=[VariantRecord.from_dict(v) for v in variants],
                   skipped=list(_list(data.get("skipped", []), "skipped", "stage record")),
                   key=data.get("key"), stage=data.get("stage"),
                   extra={k: v for k, v in data.items() if k not in cls._FIELDS})

    @classmethod
    def from_json(cls, text: str | bytes) -> StageRecord:
        return cls.from_dict(_parse(text, "stage record"))

    def to_dict(self) -> dict[str, Any]:
        record = _with_optional({"variants": [v.to_dict() for v in self.variants], "skipped": list(self.skipped)},
                                {"key": self.key, "stage": self.stage})
        record.update(self.extra)
        return record

    def to_json(self) -> str:
        return json_text(self.to_dict())


def base_record(sample: dict[str, Any]) -> BaseRecord:
    """The record of a base shard sample ({"__key__", "jpg", "json", ...} as the shard readers give it)."""
    return BaseRecord.from_json(sample["json"])


def stage_record(sample: dict[str, Any]) -> StageRecord:
    """The record of a stage shard sample."""
    return StageRecord.from_json(sample["json"])


def read_captions(base_dir: Path, split: str = "train") -> list[str]:
    """Every caption of every base sample of `split` (captions are small; images are not decoded)."""
    captions: list[str] = []
    for tar in require_shards(base_dir, split):
        for sample in read_tar(tar):
            captions.extend(base_record(sample).captions)
    if not captions:
        raise FileNotFoundError(f"no {split} captions in {base_dir}: run `make ingest` first")
    return captions
