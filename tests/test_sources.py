"""Every reader on real or generated fixtures, and the bad inputs each must record or refuse."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.sources import (
    Record, Skip, SourceError, SourceOptions, SplitFractions, detect_format, make_record, read_source,
)
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


def test_coco_bad_entries_are_recorded_skips_and_orphan_captions_counted(tmp_path):
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(jpeg())
    write_coco(
        tmp_path / "root",
        images=[{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "../../secret.jpg"},
                {"id": 3, "file_name": str(outside)}, {"id": 4, "file_name": 7}, {"id": 5, "file_name": ""}, "x"],
        annotations=[{"image_id": i, "caption": f"caption {i}"} for i in (1, 2, 3, 4, 5, 9, 9)] + [1, {"caption": "no id"}],
    )
    items = list(read_source("coco", SourceOptions(data_root=tmp_path / "root")))
    records, skips = split_items(items)
    assert [r.image_id for r in records] == ["coco1"]
    reasons = [s.reason for s in skips]
    assert sum("leaves the image folder" in r for r in reasons) == 2  # ../ and the absolute path
    assert sum("is not a non-empty string" in r for r in reasons) == 2  # 7 and ""
    assert "image entry is not an object" in reasons
    assert reasons.count("annotation without an image_id") == 2
    assert "2 caption(s) for an image_id no image has" in reasons
    assert len(items) == 1 + 2 + 2 + 1 + 2 + 1


@pytest.mark.parametrize("payload, message", [
    ({"images": [], "annotations": [1, 2]}, None),
    ({"images": {"1": "a.jpg"}, "annotations": []}, r"'images' is a dict, not a list"),
    ({"images": [], "annotations": "x"}, r"'annotations' is a str, not a list"),
])
def test_coco_wrong_shapes_are_errors_or_skips_naming_the_file(tmp_path, payload, message):
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "captions_val2017.json"
    path.write_text(json.dumps(payload))
    if message is None:
        assert [s.reason for s in read_source("coco", SourceOptions(data_root=tmp_path))] == ["annotation without an image_id"] * 2
    else:
        with pytest.raises(SourceError, match=f"{path}.*{message}"):
            list(read_source("coco", SourceOptions(data_root=tmp_path)))


def test_non_utf8_annotation_files_are_named(tmp_path):
    (tmp_path / "annotations").mkdir()
    bad = tmp_path / "annotations" / "captions_val2017.json"
    bad.write_bytes(b'{"images": [], "annotations": [{"caption": "caf\xe9"}]}')
    with pytest.raises(SourceError, match=f"{bad} is not UTF-8"):
        list(read_source("coco", SourceOptions(data_root=tmp_path)))
    table = tmp_path / "t" / "captions.csv"
    table.parent.mkdir()
    table.write_bytes(b"image,caption\na.jpg,caf\xe9\n")
    with pytest.raises(SourceError, match=f"{table} is not UTF-8"):
        list(read_source("csv", SourceOptions(data_root=table.parent)))
    albef = tmp_path / "a" / "test.json"
    albef.parent.mkdir()
    albef.write_bytes(b'[{"image": "a.jpg", "caption": "caf\xe9"}]')
    assert detect_format(albef.parent) == "albef"
    with pytest.raises(SourceError, match=f"{albef} is not UTF-8"):
        list(read_source("albef", SourceOptions(data_root=albef.parent)))


def test_albef_extensions_make_distinct_ids_and_empty_names_are_skips(tmp_path):
    data = [{"image": "x/a.jpg", "caption": "jpg"}, {"image": "x/a.png", "caption": "png"},
            {"image": "", "caption": "empty"}, {"image": ".", "caption": "dot"}]
    (tmp_path / "test.json").write_text(json.dumps(data))
    records, skips = split_items(list(read_source("albef", SourceOptions(data_root=tmp_path))))
    assert sorted(r.image_id for r in records) == ["albefx/a.jpg", "albefx/a.png"]
    assert [s.reason for s in skips] == ["image name '' is not a non-empty string", "image name '.' names no file"]


def test_csv_with_a_byte_order_mark_is_read(tmp_path):
    (tmp_path / "captions.csv").write_bytes("image,caption\na.jpg,a dog\n../b.jpg,escape\n".encode("utf-8-sig"))
    records, skips = split_items(list(read_source("csv", SourceOptions(data_root=tmp_path))))
    assert [(r.image_id, r.captions) for r in records] == [("csva", ["a dog"])]
    assert [s.reason for s in skips] == ["image name '../b.jpg' leaves the image folder"]


@pytest.mark.parametrize("caption", ["\x00\x01\x7f", "\u200b\u200b", " \u200b\u2060\ufeff ", "\t\x0b\x1b"])
def test_captions_of_control_or_zero_width_characters_are_empty(caption):
    record = make_record("i", b"", [caption, "a dog \x00on\u200b a sofa"], "train", "src")
    assert record.captions == ["a dog on\u200b a sofa"]
    assert record.caption_skips == [{"source": "src#caption0", "reason": "empty caption"}]


def test_karpathy_entries_that_are_not_objects_or_leave_the_folder_are_skips(tmp_path):
    entries = [1, {"filename": "a.jpg", "filepath": "..", "split": "test", "sentences": [{"raw": "x"}]},
               {"filename": "b.jpg", "split": "test", "sentences": [{"raw": "y"}]}]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))
    records, skips = split_items(list(read_source("karpathy", SourceOptions(data_root=tmp_path))))
    assert [r.image_id for r in records] == ["flickr30kb"]
    assert [s.reason for s in skips] == ["image entry is not an object", "image name '../a.jpg' leaves the image folder"]


def test_albef_splits_that_cannot_name_a_shard_are_skips(tmp_path):
    data = [{"image": "a.jpg", "caption": "a", "split": "../../x"}, {"image": "b.jpg", "caption": "b", "split": ["t"]},
            {"image": "c.jpg", "caption": "c", "split": "test"}]
    (tmp_path / "all.json").write_text(json.dumps(data))
    records, skips = split_items(list(read_source("albef", SourceOptions(data_root=tmp_path))))
    assert [(r.image_id, r.split) for r in records] == [("albefc.jpg", "test")]
    assert [s.reason for s in skips] == ["split '../../x' is not a name of letters and digits",
                                         "split ['t'] is not a name of letters and digits"]
