"""Karpathy split JSON (`dataset_coco.json`, `dataset_flickr30k.json`): the usual retrieval splits.

`images[]` with `filepath` (COCO only), `filename`, `split` (train/restval/val/test), `sentences[].raw`.
Images are looked up under DATA_ROOT/<filepath>/<filename>, else DATA_ROOT/images/, else beside the JSON.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pipeline.data.sources import Record, Skip, SourceError, SourceOptions, image_name_problem, make_record
from pipeline.data.sources.coco import load_json

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def _annotation_file(root: Path) -> Path:
    if root.is_file():
        return root
    candidates = sorted(root.glob("dataset_*.json")) or sorted(root.glob("*.json"))
    if not candidates:
        raise SourceError(f"no dataset_*.json (Karpathy split file) in {root}")
    return candidates[0]


def read_karpathy(options: SourceOptions) -> Iterator[Record | Skip]:
    annotation_file = _annotation_file(options.data_root)
    image_root = annotation_file.parent
    data = load_json(annotation_file)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SourceError(f"{annotation_file} is not a Karpathy split file (needs an 'images' list)")
    name = annotation_file.stem.removeprefix("dataset_")
    seen: set[str] = set()
    for index, entry in enumerate(data["images"]):
        if not isinstance(entry, dict):
            yield Skip(f"{annotation_file}#images[{index}]", "image entry is not an object")
            continue
        filename, filepath = entry.get("filename"), entry.get("filepath", "")
        relative = Path(str(filepath)) / str(filename)
        source = str(relative)
        if not filename:
            yield Skip(source, "image entry without filename")
            continue
        if (problem := image_name_problem(relative.as_posix())) is not None:
            yield Skip(source, problem)
            continue
        if source in seen:
            yield Skip(source, "duplicate image entry")
            continue
        seen.add(source)
        path = image_root / relative
        if not path.exists() and (image_root / "images" / filename).exists():
            path = image_root / "images" / filename
        split = KARPATHY_SPLITS.get(entry.get("split", ""), None)
        if split is None:
            yield Skip(source, f"unknown split {entry.get('split')!r}")
            continue
        raw = [s.get("raw") if isinstance(s, dict) else None for s in entry.get("sentences", [])]
        image_id = f"{name}{entry.get('cocoid', entry.get('imgid', Path(filename).stem))}"
        yield make_record(image_id, path, raw, split, source)
