"""COCO caption JSON: `annotations/captions_<split>2017.json` + `<split>2017/<file_name>`."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from pipeline.data.sources import Record, Skip, SourceError, SourceOptions, image_name_problem, make_record

COCO_SPLITS = {"train": "train", "val": "val", "test": "test"}


def load_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise SourceError(f"malformed JSON in {path}: {error}") from error
    except UnicodeDecodeError as error:
        raise SourceError(f"{path} is not UTF-8 text: {error}") from error


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
        for part in ("images", "annotations"):
            if not isinstance(data[part], list):
                raise SourceError(f"{annotation_file}: '{part}' is a {type(data[part]).__name__}, not a list")
        captions: dict[object, list[str]] = defaultdict(list)
        for index, annotation in enumerate(data["annotations"]):
            image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
            if not isinstance(image_id, (int, str)):
                yield Skip(f"{annotation_file}#annotations[{index}]", "annotation without an image_id")
                continue
            captions[image_id].append(annotation.get("caption"))
        image_dir = root / f"{split_name}{year}"
        seen: set[object] = set()
        listed: set[object] = set()  # every id an image entry names, usable or not: the others' captions are orphans
        for index, image in enumerate(data["images"]):
            if not isinstance(image, dict):
                yield Skip(f"{annotation_file}#images[{index}]", "image entry is not an object")
                continue
            image_id, file_name = image.get("id"), image.get("file_name")
            source = str(image_dir / str(file_name)) if isinstance(file_name, str) else f"{annotation_file}#images[{index}]"
            if not isinstance(image_id, (int, str)):
                yield Skip(source, "image entry without an id")
                continue
            listed.add(image_id)
            if (problem := image_name_problem(file_name)) is not None:
                yield Skip(source, f"file_name: {problem}")
                continue
            if image_id in seen:
                yield Skip(source, "duplicate image id")
                continue
            seen.add(image_id)
            yield make_record(f"coco{image_id}", image_dir / file_name, captions.get(image_id, []), split, source)
        for image_id in sorted(captions.keys() - listed, key=str):
            count = len(captions[image_id])
            yield Skip(f"{annotation_file}#image_id={image_id}", f"{count} caption(s) for an image_id no image has")
