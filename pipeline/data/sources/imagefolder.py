"""A Hugging Face `datasets` imagefolder with metadata.jsonl (`file_name` + a caption or captions column), offline.

Split folders (train/, validation/, test/) become the splits; otherwise images are split by hashing.
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Iterator

from pipeline.data.sources import Record, Skip, SourceError, SourceOptions, make_record

HF_SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}


def read_imagefolder(options: SourceOptions) -> Iterator[Record | Skip]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    try:
        dataset_dict = datasets.load_dataset("imagefolder", data_dir=str(options.data_root))
    except Exception as error:  # datasets raises several types for bad folders / metadata
        raise SourceError(f"cannot load imagefolder {options.data_root}: {error}") from error
    has_own_splits = len(dataset_dict) > 1
    for split_name, dataset in dataset_dict.items():
        caption_column = next((c for c in (options.caption_column, "captions", "text") if c in dataset.column_names), None)
        if caption_column is None:
            raise SourceError(f"imagefolder metadata has no caption column (looked for {options.caption_column!r}, 'captions', 'text')")
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
        for row in dataset:
            image = row["image"]
            source = image.get("path") or f"{split_name}[?]"
            raw = row[caption_column]
            captions = raw if isinstance(raw, list) else [raw]
            name = os.path.splitext(os.path.basename(source))[0]
            split = HF_SPLITS.get(split_name, split_name) if has_own_splits else options.fractions.assign(name)
            # Keep a path when there is one: images are read later, in the workers, not held in memory here.
            data = Path(image["path"]) if image.get("path") else image["bytes"]
            yield make_record(f"hf{name}", data, captions, split, source)
