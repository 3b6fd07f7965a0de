"""Every reader on real or generated fixtures, and the bad inputs each must record or refuse."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.sources import Record, Skip, SourceError, SourceOptions, SplitFractions, detect_format, read_source
from pipeline.data.sources.synth import CAPTIONS_PER_IMAGE

COCO_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"


def jpeg(color=(200, 10, 10), size=(8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def split_items(items):
    records = [i for i in items if isinstance(i, Record)]
    skips = [i for i in items if isinstance(i, Skip)]
    return records, skips


@pytest.mark.skipif(not COCO_MINI.exists(), reason="needs ../shared/data/coco-mini")
def test_coco_mini_has_159_images_with_5_captions_and_its_splits():
    records, skips = split_items(list(read_source("coco", SourceOptions(data_root=COCO_MINI))))
    assert not skips
    assert len(records) == 159
    assert all(len(r.captions) == 5 for r in records)
    assert {r.split for r in records} == {"train", "val"}
    assert sum(r.split == "train" for r in records) == 80
    assert all(Path(r.image).exists() for r in records)
    assert detect_format(COCO_MINI) == "coco"


def write_coco(root: Path, images: list[dict], annotations: list[dict], split: str = "val") -> None:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(exist_ok=True)
    payload = {"info": {}, "licenses": [], "images": images, "annotations": annotations}
    (root / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(payload))


def test_coco_records_skips_and_caption_cleaning(tmp_path):
    write_coco(
        tmp_path,
        images=[{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 1, "file_name": "a.jpg"}],
        annotations=[
            {"image_id": 1, "caption": "  A dog\non a  sofa "},
            {"image_id": 1, "caption": "   "},
            {"image_id": 1, "caption": "A dog on a sofa"},
            {"image_id": 1, "caption": "Ein Hund auf dem Sofa — 犬"},
        ],
    )
    records, skips = split_items(list(read_source("coco", SourceOptions(data_root=tmp_path))))
    assert [r.image_id for r in records] == ["coco1"]
    assert records[0].captions == ["A dog on a sofa", "Ein Hund auf dem Sofa — 犬"]
    assert sorted(s["reason"] for s in records[0].caption_skips) == ["duplicate caption", "empty caption"]
    assert sorted(s.reason for s in skips) == ["duplicate image id", "no caption"]


def test_malformed_json_is_a_clear_error(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text('{"images": [')
    with pytest.raises(SourceError, match="malformed JSON"):
        list(read_source("coco", SourceOptions(data_root=tmp_path)))


def test_karpathy_splits_and_restval(tmp_path):
    (tmp_path / "images").mkdir()
    entries = []
    for index, split in enumerate(["train", "restval", "val", "test", "weird"]):
        (tmp_path / "images" / f"{index}.jpg").write_bytes(jpeg())
        entries.append({"filename": f"{index}.jpg", "imgid": index, "split": split, "sentences": [{"raw": f"caption {index}"}]})
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))
    assert detect_format(tmp_path) == "karpathy"
    records, skips = split_items(list(read_source("karpathy", SourceOptions(data_root=tmp_path))))
    assert [r.split for r in records] == ["train", "train", "val", "test"]
    assert all(Path(r.image).exists() for r in records)
    assert [s.reason for s in skips] == ["unknown split 'weird'"]


def test_albef_merges_entries_of_one_image(tmp_path):
    data = [{"image": "x/1.jpg", "caption": "one"}, {"image": "x/1.jpg", "caption": ["two", "three"]}, {"caption": "orphan"}]
    (tmp_path / "f30k_test.json").write_text(json.dumps(data))
    assert detect_format(tmp_path) == "albef"
    records, skips = split_items(list(read_source("albef", SourceOptions(data_root=tmp_path))))
    assert len(records) == 1 and records[0].captions == ["one", "two", "three"]
    assert records[0].split == "test"  # from the file name
    assert len(skips) == 1 and "image" in skips[0].reason


def test_csv_one_row_per_caption_duplicates_and_hash_split(tmp_path):
    rows = [("a.jpg", "first"), ("a.jpg", "second"), ("a.jpg", "second"), ("b.jpg", ""), ("c.jpg", "third")]
    with open(tmp_path / "captions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    records, skips = split_items(list(read_source("csv", SourceOptions(data_root=tmp_path))))
    by_id = {r.image_id: r for r in records}
    assert by_id["csva"].captions == ["first", "second"]
    assert by_id["csva"].caption_skips[0]["reason"] == "duplicate caption"
    assert [s.reason for s in skips] == ["no usable caption (all empty or duplicate)"]
    fractions = SplitFractions()
    assert all(r.split == fractions.assign(r.image_id.removeprefix("csv") + ".jpg") for r in records)


def test_csv_with_missing_column_or_bad_rows_is_an_error(tmp_path):
    (tmp_path / "captions.csv").write_text("file,text\na.jpg,hello\n")
    with pytest.raises(SourceError, match="no column 'image'"):
        list(read_source("csv", SourceOptions(data_root=tmp_path)))
    (tmp_path / "captions.csv").write_text("image,caption\na.jpg\n")
    with pytest.raises(SourceError, match="wrong number of fields"):
        list(read_source("csv", SourceOptions(data_root=tmp_path)))


def test_imagefolder_with_metadata_jsonl(tmp_path):
    for name in ("p", "q"):
        (tmp_path / f"{name}.jpg").write_bytes(jpeg())
    lines = [{"file_name": "p.jpg", "caption": "a p"}, {"file_name": "q.jpg", "caption": "a q"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    assert detect_format(tmp_path) == "imagefolder"
    records, skips = split_items(list(read_source("imagefolder", SourceOptions(data_root=tmp_path))))
    assert sorted(r.captions[0] for r in records) == ["a p", "a q"] and not skips
    assert all(r.read_image()[:2] == b"\xff\xd8" for r in records)


def test_synth_is_deterministic_one_to_many_and_sized():
    first = list(read_source("synth", SourceOptions(synth_size=50, synth_seed=3)))
    again = list(read_source("synth", SourceOptions(synth_size=50, synth_seed=3)))
    other = list(read_source("synth", SourceOptions(synth_size=50, synth_seed=4)))
    assert len(first) == 50
    assert [(r.captions, r.split) for r in first] == [(r.captions, r.split) for r in again]
    assert first[0].read_image() == again[0].read_image()
    assert [r.captions for r in first] != [r.captions for r in other]
    for record in first:
        assert len(set(record.captions)) == CAPTIONS_PER_IMAGE  # genuinely different captions
    image = Image.open(io.BytesIO(first[0].read_image()))
    assert image.size == (64, 64)
    assert {r.split for r in list(read_source("synth", SourceOptions(synth_size=400)))} == {"train", "val", "test"}


def test_unknown_format_and_missing_root_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        read_source("parquet", SourceOptions(data_root=tmp_path))
    with pytest.raises(SourceError, match="does not exist"):
        read_source("coco", SourceOptions(data_root=tmp_path / "nope"))
