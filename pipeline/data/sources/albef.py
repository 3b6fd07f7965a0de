"""ALBEF-style JSON, as used by SGA / Co-Attack: a list of {"image": path, "caption": str or [str]}.

Several entries for the same image are merged (their captions joined). Split: from an optional "split" field,
else from the file name (`*train*`, `*val*`, `*test*`), else by hashing the image path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pipeline.data.sources import SPLITS, Record, Skip, SourceError, SourceOptions, image_name_problem, make_record
from pipeline.data.sources.coco import load_json


def read_albef(options: SourceOptions) -> Iterator[Record | Skip]:
    root = options.data_root
    files = [root] if root.is_file() else sorted(root.glob("*.json"))
    if not files:
        raise SourceError(f"no ALBEF-style *.json in {root}")
    for annotation_file in files:
        data = load_json(annotation_file)
        if not isinstance(data, list):
            raise SourceError(f"{annotation_file} is not an ALBEF-style list of {{image, caption}} entries")
        file_split = next((s for s in SPLITS if s in annotation_file.stem), None)
        merged: dict[str, list] = {}
        splits: dict[str, str | None] = {}
        for index, entry in enumerate(data):
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                yield Skip(f"{annotation_file}[{index}]", "entry without an 'image' path")
                continue
            if (problem := image_name_problem(entry["image"], allow_absolute=True)) is not None:
                yield Skip(f"{annotation_file}[{index}]", problem)
                continue
            caption = entry.get("caption", [])
            captions = caption if isinstance(caption, list) else [caption]
            merged.setdefault(entry["image"], []).extend(captions)
            splits.setdefault(entry["image"], entry.get("split"))
        image_root = annotation_file.parent
        for image, captions in merged.items():
            split = splits[image] or file_split or options.fractions.assign(image)
            path = Path(image) if Path(image).is_absolute() else image_root / image
            # the extension stays in the id: a.jpg and a.png are two images
            yield make_record(f"albef{Path(image).as_posix()}", path, captions, split, image)
