"""`hf`: a Hugging Face `datasets` dataset, read offline.

DATA_ROOT is one of
- a `save_to_disk` folder (a `DatasetDict` with its splits, or a single `Dataset`);
- Parquet / Arrow files: one file, or a folder of them (files named `train-*`, `validation-*`, `test-*` give
  the splits);
- a hub id already in the local cache (`datasets.load_dataset(id)` with HF_DATASETS_OFFLINE=1 by default).

Columns (SourceOptions): `image_column` holds an `Image` feature (embedded bytes or a path), raw bytes, or a
path string (relative paths are taken from the data folder); `caption_column` holds a list of captions per
row, or one caption per row, in which case rows of the same image are merged in first-seen order. Rows are the
same image when they share `id_column`, or, without one, the same embedded bytes or the same path. Image ids are
`id_prefix` (default "hf") + the id column's value, else the image file's stem (plus a digest when two
images share a stem), else a digest of the bytes.

Split: a `split_column` present in the data wins (train / restval / val / validation / test), then the
dataset's own split names when all are known split names, else the hash split of SourceOptions.fractions.

Embedded images are not copied into the records: a record holds an `HFRow` and the worker reloads the dataset
(memory-mapped) to read the bytes.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.sources import HF_FILE_SUFFIXES, ImageRef, Record, Skip, SourceError, SourceOptions, make_record

SPLIT_NAMES = {"train": "train", "restval": "train", "validation": "val", "val": "val", "test": "test"}
CAPTION_FALLBACKS = ("captions", "caption", "text")
BATCH_ROWS = 1000


def _datasets():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    return datasets


def loader_of(root: Path) -> tuple[str, ...]:
    """How to load DATA_ROOT: ("disk", dir) | ("files", builder, file...) | ("hub", id)."""
    if not root.exists():
        return ("hub", str(root))
    if root.is_dir() and ((root / "dataset_dict.json").exists() or (root / "state.json").exists()):
        return ("disk", str(root))
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in HF_FILE_SUFFIXES)
    suffixes = {p.suffix for p in files}
    if not files or not suffixes <= set(HF_FILE_SUFFIXES):
        raise SourceError(f"{root} is no save_to_disk folder and holds no .parquet / .arrow files")
    if len(suffixes) > 1:
        raise SourceError(f"{root} mixes .parquet and .arrow files: point DATA_ROOT at one kind")
    return ("files", suffixes.pop().lstrip("."), *map(str, files))


def _file_split(path: str) -> str | None:
    tokens = re.split(r"[^a-z]+", Path(path).stem.lower())
    return next((t for t in tokens if t in SPLIT_NAMES), None)


@functools.lru_cache(maxsize=4)
def load_splits(loader: tuple[str, ...]) -> tuple[dict[str, Any], bool]:
    """({split name: Dataset}, whether the names are the dataset's own splits)."""
    datasets = _datasets()
    kind, target = loader[0], loader[1]
    try:
        if kind == "disk":
            loaded = datasets.load_from_disk(target)
            if isinstance(loaded, datasets.DatasetDict):
                return dict(loaded), True
            return {"all": loaded}, False
        if kind == "hub":
            return dict(datasets.load_dataset(target)), True
        files = loader[2:]
        by_split = {f: _file_split(f) for f in files}
        if all(by_split.values()):
            data_files: dict[str, list[str]] = {}
            for name, split in by_split.items():
                data_files.setdefault(split, []).append(name)
            return dict(datasets.load_dataset(target, data_files=data_files)), True
        return {"all": datasets.load_dataset(target, data_files=list(files), split="train")}, False
    except SourceError:
        raise
    except Exception as error:  # datasets raises many types (FileNotFoundError, ConnectionError, DatasetNotFoundError...)
        where = "a local folder or file, nor in the local HF cache (offline)" if kind == "hub" else "loadable"
        raise SourceError(f"cannot load the HF dataset {target} (not {where}): {type(error).__name__}: {error}") from error


@functools.lru_cache(maxsize=8)
def _image_column(loader: tuple[str, ...], split: str, column: str) -> Any:
    dataset = load_splits(loader)[0][split]
    datasets = _datasets()
    if isinstance(dataset.features[column], datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset.select_columns([column])


@dataclass(frozen=True)
class HFRow:
    """An image embedded in a Hugging Face dataset: row `row` of `split`, reloaded (memory-mapped) in the worker."""

    loader: tuple[str, ...]  # how `_image_column` loads the dataset again
    split: str
    row: int
    column: str

    def read(self) -> bytes:
        return read_row_image(self)


def read_row_image(ref: HFRow) -> bytes:
    value = _image_column(ref.loader, ref.split, ref.column)[ref.row][ref.column]
    data = value.get("bytes") if isinstance(value, dict) else value
    if not data:
        raise OSError(f"no image bytes in row {ref.row} of split {ref.split!r}")
    return data


@dataclass
class _Image:
    """One image being gathered from its rows."""

    image_id: str
    image: ImageRef
    source: str
    split: str | None
    captions: list[Any] = field(default_factory=list)


def _find_column(columns: list[str], wanted: str, fallbacks: tuple[str, ...], what: str, env: str, where: str) -> str:
    found = next((c for c in (wanted, *fallbacks) if c in columns), None)
    if found is None:
        also = f" (also looked for {', '.join(map(repr, fallbacks))})" if fallbacks else ""
        raise SourceError(f"HF dataset {where}: no {what} column {wanted!r}{also}; its columns: {columns}; set {env}")
    return found


def _image_values(table: Any, column: str, digests: bool) -> tuple[list[str | None], list[str | None]]:
    """(path or None, embedded) per row; embedded is None without bytes, else their digest ("" unless `digests`).

    The bytes are hashed from Arrow's buffers, never copied into Python objects.
    """
    import pyarrow as pa

    array = table.column(column).combine_chunks()
    if pa.types.is_struct(array.type):
        paths = array.field("path").to_pylist() if array.type.get_field_index("path") >= 0 else [None] * len(array)
        data = array.field("bytes") if array.type.get_field_index("bytes") >= 0 else pa.nulls(len(array), pa.binary())
    elif pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type):
        paths, data = [None] * len(array), array
    elif pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return array.to_pylist(), [None] * len(array)
    else:
        raise SourceError(f"image column {column!r} holds {array.type}: want an Image feature, bytes or a path string")
    embedded = [(hashlib.sha256(value.as_buffer()).hexdigest()[:16] if digests else "") if value.is_valid else None
                for value in data]
    return paths, embedded


def read_hf(options: SourceOptions) -> Iterator[Record | Skip]:
    root = options.data_root
    loader = loader_of(root)
    splits, own_splits = load_splits(loader)
    own_splits = own_splits and all(name in SPLIT_NAMES for name in splits)
    base = root if root.is_dir() else root.parent
    prefix = "hf" if options.id_prefix is None else options.id_prefix
    images: dict[object, _Image] = {}
    for split_name, dataset in splits.items():
        where = f"{root} (split {split_name!r})"
        columns = list(dataset.column_names)
        image_column = _find_column(columns, options.image_column, (), "image", "IMAGE_COLUMN", where)
        caption_column = _find_column(columns, options.caption_column, CAPTION_FALLBACKS, "caption", "CAPTION_COLUMN", where)
        id_column = options.id_column and _find_column(columns, options.id_column, (), "image id", "ID_COLUMN", where)
        split_column = options.split_column if options.split_column in columns else None
        wanted = [c for c in dict.fromkeys((image_column, caption_column, id_column, split_column)) if c]
        row = 0
        for table in dataset.select_columns(wanted).with_format("arrow").iter(batch_size=BATCH_ROWS):
            paths, embedded = _image_values(table, image_column, digests=not id_column)
            captions = table.column(caption_column).to_pylist()
            ids = table.column(id_column).to_pylist() if id_column else [None] * len(paths)
            row_splits = table.column(split_column).to_pylist() if split_column else [None] * len(paths)
            for path, digest, caption, id_value, row_split in zip(paths, embedded, captions, ids, row_splits):
                item = _row_image(loader, split_name, row, image_column, path, digest, id_column, id_value, base, root)
                row += 1
                if isinstance(item, Skip):
                    yield item
                    continue
                group, image = item
                if split_column:
                    image.split = SPLIT_NAMES.get(str(row_split).lower())
                    if image.split is None:
                        yield Skip(image.source, f"unknown split {row_split!r} in column {split_column!r}")
                        continue
                elif own_splits:
                    image.split = SPLIT_NAMES[split_name]
                entry = images.setdefault(group, image)
                entry.captions.extend(caption if isinstance(caption, list) else [caption])
    seen: set[str] = set()
    for group, image in images.items():
        image_id = prefix + image.image_id
        if image_id in seen:  # two images whose files share a stem: the later one's id names its group too
            image_id += "-" + hashlib.sha256(repr(group).encode()).hexdigest()[:8]
        seen.add(image_id)
        split = image.split or options.fractions.assign(image_id)
        yield make_record(image_id, image.image, image.captions, split, image.source)


def _row_image(loader: tuple[str, ...], split: str, row: int, column: str, path: str | None, digest: str | None,
               id_column: str | None, id_value: Any, base: Path, root: Path) -> tuple[object, _Image] | Skip:
    """(group key, image) for one row, or a Skip when it names no image.

    Rows are one image when they share the id (with an id column), the embedded bytes (an embedded image keeps
    only its file's base name, which need not be unique), or the path.
    """
    where = f"{root}[{split}][{row}]"
    if digest is not None:
        ref: ImageRef = HFRow(loader, split, row, column)
        source = where
    elif path:
        ref = Path(path) if Path(path).is_absolute() else base / path
        source = str(ref)
    else:
        return Skip(where, f"no image in column {column!r}")
    if id_column:
        if id_value is None:
            return Skip(source, f"no image id in column {id_column!r}")
        return ("id", id_value), _Image(str(id_value), ref, source, None)
    image_id = Path(path).stem if path else digest
    return (("bytes", digest) if digest is not None else ("path", source)), _Image(image_id, ref, source, None)
