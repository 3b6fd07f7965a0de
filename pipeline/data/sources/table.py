"""CSV / TSV with a header naming the image and caption columns, one row per caption (Flickr8k's captions.txt)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from pipeline.data.sources import SPLITS, Record, Skip, SourceError, SourceOptions, image_name_problem, make_record


def _table_file(root: Path) -> Path:
    if root.is_file():
        return root
    candidates = sorted(root.glob("*.csv")) + sorted(root.glob("*.tsv")) + sorted(root.glob("captions*.txt"))
    if not candidates:
        raise SourceError(f"no .csv/.tsv caption table in {root}")
    return candidates[0]


def read_table(options: SourceOptions) -> Iterator[Record | Skip]:
    table = _table_file(options.data_root)
    try:
        yield from _read_table(table, options)
    except UnicodeDecodeError as error:
        raise SourceError(f"{table} is not UTF-8 text: {error}") from error


def _read_table(table: Path, options: SourceOptions) -> Iterator[Record | Skip]:
    image_dir = table.parent / "images" if (table.parent / "images").is_dir() else table.parent
    # utf-8-sig: a byte order mark (Excel writes one) is not part of the first column's name
    with open(table, encoding="utf-8-sig", newline="") as handle:
        sample = handle.read(4096)
        handle.seek(0)
        delimiter = "\t" if table.suffix == ".tsv" or ("\t" in sample and "," not in (sample.splitlines() or [""])[0]) else ","
        reader = csv.DictReader(handle, delimiter=delimiter)
        columns = reader.fieldnames or []
        for column in (options.image_column, options.caption_column):
            if column not in columns:
                raise SourceError(f"{table}: no column {column!r} in header {columns}; set IMAGE_COLUMN/CAPTION_COLUMN")
        captions: dict[str, list] = {}
        splits: dict[str, str] = {}
        try:
            for line, row in enumerate(reader, start=2):
                if None in row or any(v is None for v in row.values()):
                    raise SourceError(f"{table}:{line}: wrong number of fields")
                image = row[options.image_column].strip()
                captions.setdefault(image, []).append(row[options.caption_column])
                if row.get("split") in SPLITS:
                    splits[image] = row["split"]
        except csv.Error as error:
            raise SourceError(f"{table}: malformed CSV: {error}") from error
    for image, image_captions in captions.items():
        if not image:
            yield Skip(f"{table}", f"row(s) without an image name ({len(image_captions)} caption(s))")
            continue
        if (problem := image_name_problem(image)) is not None:
            yield Skip(f"{table}:{image}", problem)
            continue
        split = splits.get(image) or options.fractions.assign(image)
        yield make_record(f"csv{Path(image).with_suffix('').as_posix()}", image_dir / image, image_captions, split, image)
