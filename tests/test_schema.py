"""The per-sample JSON records (pipeline/core/schema.py): round trips, versions, and the bytes the writers wrote."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.core.paths import Layout
from pipeline.core.schema import (
    SCHEMA_VERSION,
    VERSION_KEY,
    BaseRecord,
    SchemaError,
    SchemaVersionError,
    StageRecord,
    VariantRecord,
    base_record,
    read_captions,
    stage_record,
)
from pipeline.core.shards import (
    list_shards,
    read_tar,
    sample_key,
    shard_name,
    write_tar,
)


def _old_base_meta(key: str, converted: str = "") -> dict:
    """The dict pipeline/data/ingest.py wrote before the schema (the shard writer JSON-encodes dicts)."""
    meta = {"key": key, "image_id": "coco42", "captions": ["a dog on a sofa", "ein Hund — sofa"], "primary": 0,
            "split": "train", "source": "train2017/000000000042.jpg", "width": 640, "height": 480}
    if converted:
        meta["converted"] = converted
    return meta


def _old_stage_meta(key: str) -> dict:
    """The dict pipeline/augment/stage.py wrote before the schema: variant_record's dicts, scores from extra."""
    return {"key": key, "stage": "eda", "skipped": [{"caption_index": 1, "reason": "too short: 1 word"}],
            "variants": [
                {"caption_index": 0, "seed": 12345678901234567, "op": "eda:synonym", "text": "a hound on a sofa",
                 "alignment": 0.31, "src_sim": 0.97, "shift": 1.2},
                {"caption_index": None, "seed": 7, "op": "randaug", "file": "v1.jpg", "alignment": -0.05,
                 "src_sim": float("nan"), "shift": 2.5, "magnitude": 9, "ops": ["Rotate", "Solarize"]},
                {"caption_index": 1, "seed": 8, "op": "i2t", "text": "unscored"},
            ]}


def _samples(metas: list[dict], as_text) -> list[dict]:
    return [{"__key__": m["key"], "jpg": b"\xff\xd8jpeg", "txt": "t", "json": as_text(m)} for m in metas]


def test_records_write_the_bytes_the_writers_wrote_before(tmp_path):
    keys = [sample_key("train", 0, i) for i in range(3)]
    base = [_old_base_meta(keys[0]), _old_base_meta(keys[1], converted="PNG->JPEG,resized"), _old_base_meta(keys[2])]
    stage = [_old_stage_meta(k) for k in keys]
    for metas, cls in ((base, BaseRecord), (stage, StageRecord)):
        old = write_tar(tmp_path / "old" / shard_name("train", 0), _samples(metas, lambda m: m))
        new = write_tar(tmp_path / "new" / shard_name("train", 0), _samples(metas, lambda m, c=cls: c.from_dict(m).to_json()))
        assert new == old, f"{cls.__name__}: the shard's bytes changed"
        assert (tmp_path / "new" / shard_name("train", 0)).read_bytes() == (tmp_path / "old" / shard_name("train", 0)).read_bytes()


def test_records_built_by_the_writers_match_the_old_dicts():
    key = sample_key("train", 0, 0)
    old = _old_base_meta(key, converted="RGBA->RGB")
    built = BaseRecord(captions=list(old["captions"]), primary=0, key=key, image_id="coco42", split="train",
                       source=old["source"], width=640, height=480, converted="RGBA->RGB")
    assert built.to_json() == json.dumps(old, sort_keys=True, ensure_ascii=False)
    # ingest leaves "converted" out when nothing was done
    assert "converted" not in BaseRecord(["x"], key=key, converted="").to_dict()
    # the toy writer's text and image stage records (pipeline/train/toy.py before the schema)
    toy = {"key": key, "stage": "img", "skipped": [], "variants": [
        {"file": "v0.jpg", "caption_index": 0, "seed": 0, "op": "toy"},
        {"file": "v1.jpg", "caption_index": None, "seed": 1, "op": "toy"}]}
    built = StageRecord([VariantRecord(0, seed=0, op="toy", file="v0.jpg"),
                         VariantRecord(None, seed=1, op="toy", file="v1.jpg")], [], key=key, stage="img")
    assert built.to_json() == json.dumps(toy, sort_keys=True, ensure_ascii=False)


def test_round_trip_of_each_record_type():
    key = sample_key("val", 3, 7)
    base = BaseRecord(["first", "second ü"], primary=1, key=key, image_id="i7", split="val", source="s",
                      width=3, height=4, converted="CMYK->RGB", extra={"colour": "red"})
    again = BaseRecord.from_json(base.to_json())
    assert again == base and again.primary_caption == "second ü"
    assert BaseRecord.from_json(base.to_json().encode()).to_json() == base.to_json()

    text = VariantRecord(1, seed=5, op="eda:swap", text="second", alignment=0.5, src_sim=0.9, shift=1.0)
    image = VariantRecord(None, seed=6, op="randaug", file="v1.jpg", alignment=0.2, extra={"magnitude": 9})
    stage = StageRecord([text, image], [{"variant": 2, "reason": "empty"}], key=key, stage="eda", extra={"note": 1})
    again = StageRecord.from_json(stage.to_json())
    assert again == stage
    assert again.variants[0].scores() == {"alignment": 0.5, "src_sim": 0.9, "shift": 1.0}
    assert again.variants[1].scores() == {"alignment": 0.2} and again.variants[1].is_image
    assert not again.variants[0].is_image

    old = _old_stage_meta(key)
    text = json.dumps(old, sort_keys=True, ensure_ascii=False)
    parsed = StageRecord.from_json(text)
    assert parsed.to_json() == text
    assert math.isnan(parsed.variants[1].src_sim) and parsed.variants[1].extra == {"magnitude": 9,
                                                                                   "ops": ["Rotate", "Solarize"]}
    assert parsed.variants[2].scores() == {}


def test_version_1_files_carry_no_version_and_are_read():
    assert SCHEMA_VERSION == 1
    key = sample_key("train", 0, 0)
    written = BaseRecord(["c"], key=key).to_json()
    assert VERSION_KEY not in json.loads(written)  # today's files: no version field, byte for byte
    assert BaseRecord.from_json(json.dumps(_old_base_meta(key))).captions == ["a dog on a sofa", "ein Hund — sofa"]
    assert StageRecord.from_json(json.dumps(_old_stage_meta(key))).stage == "eda"
    # the version written out, when present, is accepted for version 1
    explicit = BaseRecord.from_json(json.dumps({"captions": ["c"], VERSION_KEY: 1}))
    assert explicit.extra == {} and VERSION_KEY not in explicit.to_dict()


@pytest.mark.parametrize("cls", [BaseRecord, StageRecord])
@pytest.mark.parametrize("version", [2, 0, "1", None, True, 1.0])
def test_an_unknown_version_is_refused(cls, version):
    with pytest.raises(SchemaVersionError, match=rf"{VERSION_KEY}={version!r}.*reads version 1"):
        cls.from_json(json.dumps({"captions": ["c"], "variants": [], VERSION_KEY: version}))


def test_minimal_records_take_the_readers_defaults():
    """What older tests and hand-made shards hold: only some fields. Absent ones stay absent when written back."""
    base = BaseRecord.from_json(b'{"captions": ["c0", "c1"], "primary": 1}')
    assert (base.primary, base.key, base.split, base.image_id) == (1, None, None, None)
    assert base.to_dict() == {"captions": ["c0", "c1"], "primary": 1}
    assert BaseRecord.from_json(b"{}").captions == []
    stage = StageRecord.from_json(b'{"variants": [{"text": "p1", "caption_index": 1}]}')
    assert stage.skipped == [] and stage.key is None
    assert (stage.variants[0].text, stage.variants[0].caption_index, stage.variants[0].op) == ("p1", 1, None)
    assert StageRecord.from_json(b'{"variants": [{"text": "t"}]}').variants[0].caption_index is None


@pytest.mark.parametrize("text, message", [
    (b"[1, 2]", "must be a JSON object"),
    (b"{not json", "not valid JSON"),
    (b'{"captions": "one caption"}', "'captions' must be a list"),
])
def test_malformed_base_records_are_refused(text, message):
    with pytest.raises(SchemaError, match=message):
        BaseRecord.from_json(text)


def test_malformed_stage_records_are_refused():
    with pytest.raises(SchemaError, match="'variants' must be a list"):
        StageRecord.from_json(b'{"variants": {"text": "t"}}')
    with pytest.raises(SchemaError, match="a variant must be a JSON object"):
        StageRecord.from_json(b'{"variants": ["t"]}')
    assert issubclass(SchemaError, ValueError)  # the CLI and the stage runner catch ValueError


def test_ingested_and_toy_shards_read_back_byte_for_byte(tmp_path):
    from pipeline.data.ingest import IngestConfig, run_ingest
    from pipeline.train.toy import write_toy_shards

    layout = Layout(tmp_path / "shards", tmp_path / "manifests")
    run_ingest(IngestConfig(dataset="synth", synth_size=12, shard_size=5), layout)
    write_toy_shards(tmp_path / "shards", "toy", shards=1, per_shard=4, text_stage="txt", image_stage="img")
    seen = 0
    for folder, read in ((layout.base_dir("synth"), base_record), (layout.base_dir("toy"), base_record),
                         (layout.stage_dir("toy", "txt"), stage_record), (layout.stage_dir("toy", "img"), stage_record)):
        for tar in list_shards(folder):
            for sample in read_tar(tar):
                assert read(sample).to_json().encode() == sample["json"]
                seen += 1
    assert seen == 12 + 3 * 4
    captions = read_captions(layout.base_dir("synth"), "train")
    assert captions and all(isinstance(c, str) for c in captions)
    with pytest.raises(FileNotFoundError, match="has no nosplit shards .*; its splits: train$"):
        read_captions(layout.base_dir("synth"), "nosplit")
