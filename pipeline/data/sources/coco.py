"""COCO caption JSON: `annotations/captions_<split>2017.json` + `<split>2017/<file_name>`."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from pipeline.data.sources import Record, Skip, SourceError, SourceOptions, make_record

COCO_SPLITS = {"train": "train", "val": "val", "test": "test"}


def load_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise SourceError(f"malformed JSON in {path}: {error}") from error


def read_coco(options: SourceOptions) -> Iterator[Record | Skip]:
    root = options.data_root
    annotation_files = sorted(root.glob("annotations/captions_*.json"))
    if not annotation_files:
        raise SourceError(f"no annotations/captions_<split>2017.json under {root}")
    for annotation_file in annotation_files:
        match = re.match(r"captions_([a-z]+)(\d*)\.json$", annotation_file.name)
        if not match:
            continue
        split_name, year = match.groups()
        split = COCO_SPLITS.get(split_name, split_name)
        data = load_json(annotation_file)
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise SourceError(f"{annotation_file} is not a COCO caption file (needs 'images' and 'annotations')")
        captions: dict[object, list[str]] = defaultdict(list)
        for annotation in data["annotations"]:
            captions[annotation.get("image_id")].append(annotation.get("caption"))
        image_dir = root / f"{split_name}{year}"
        seen: set[object] = set()
        for image in data["images"]:
            image_id = image.get("id")
            source = str(image_dir / str(image.get("file_name", "?")))
            if "file_name" not in image or image_id is None:
                yield Skip(source, "image entry without id or file_name")
                continue
            if image_id in seen:
                yield Skip(source, "duplicate image id")
                continue
            seen.add(image_id)
            yield make_record(f"coco{image_id}", image_dir / image["file_name"], captions.get(image_id, []), split, source)
