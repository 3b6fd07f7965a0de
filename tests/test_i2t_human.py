"""I2T (Human): the other reference captions as text variants, relative to the primary caption."""

from __future__ import annotations

import json

import pytest

from pipeline.data.ingest import IngestConfig, run_ingest
from pipeline.core.paths import Layout
from pipeline.core.shards import list_shards, read_tar
from pipeline.augment.stage import BaseSample, StageContext, run_stage
from stages.i2t_human import I2THumanStage

CAPTIONS = ["A dog runs on grass.", "A brown dog running.", "A puppy plays outside.", "Dog in a field.",
            "A dog is running across a lawn."]


def _run(captions: list[str], primary: int = 0, **kw):
    stage = I2THumanStage(I2THumanStage.Config(**kw), StageContext(dataset="test"))
    return stage, stage.augment_batch([BaseSample("k0", b"", captions, {"primary": primary})])[0]


def test_other_captions_become_variants_of_the_primary() -> None:
    stage, result = _run(CAPTIONS)
    assert [v.text for v in result.variants] == CAPTIONS[1:]
    assert [v.extra["annotation_index"] for v in result.variants] == [1, 2, 3, 4]
    assert all(v.caption_index == 0 and v.op == "i2t-human" for v in result.variants)
    assert [v.seed for v in result.variants] == [stage.seed_for("k0", m) for m in range(1, 5)]
    assert not result.skipped


def test_non_zero_primary_is_left_out() -> None:
    _, result = _run(CAPTIONS, primary=2)
    assert {v.extra["annotation_index"] for v in result.variants} == {0, 1, 3, 4}
    assert all(v.caption_index == 2 for v in result.variants)
    # The pool a 1:N trainer reads (primary + variants) is every caption exactly once.
    assert sorted([CAPTIONS[2]] + [v.text for v in result.variants]) == sorted(CAPTIONS)


@pytest.mark.parametrize(
    ("captions", "reasons"),
    [
        (["only one caption"], ["no other reference caption"]),
        (["a cat", "  ", "A  Cat", "a dog"], ["empty caption", "duplicate caption: same as caption 0"]),
        (["a cat", "a dog", "A dog "], ["duplicate caption: same as caption 1"]),
    ],
)
def test_empty_duplicate_and_single_captions_are_skipped(captions, reasons) -> None:
    _, result = _run(captions)
    assert [s["reason"] for s in result.skipped] == reasons
    assert len(result.variants) + len(result.skipped) == max(1, len(captions) - 1)
    assert all(v.text.strip() and v.text != captions[0] for v in result.variants)


def test_out_of_range_primary_and_max_variants() -> None:
    _, result = _run(CAPTIONS, primary=7)
    assert not result.variants and result.skipped[0]["reason"].startswith("primary index out of range")
    _, result = _run(CAPTIONS, max_variants=2)
    assert len(result.variants) == 2 and [s["reason"] for s in result.skipped] == ["max_variants reached: 2"] * 2
    with pytest.raises(ValueError, match="max_variants"):
        I2THumanStage.Config(max_variants=-1)


def test_stage_shards_hold_every_base_key_with_its_other_captions(tmp_path) -> None:
    layout = Layout(tmp_path / "shards", tmp_path / "manifests")
    run_ingest(IngestConfig(dataset="synth", synth_size=10, shard_size=4), layout)
    manifest = run_stage(I2THumanStage, I2THumanStage.Config(), StageContext("synth"), layout)
    total = 0
    for base_tar in list_shards(layout.base_dir("synth")):
        base = read_tar(base_tar)
        out = read_tar(layout.stage_dir("synth", "i2t-human") / base_tar.name)
        assert [s["__key__"] for s in base] == [s["__key__"] for s in out]
        for b, o in zip(base, out):
            meta, record = json.loads(b["json"]), json.loads(o["json"])
            others = [c for i, c in enumerate(meta["captions"]) if i != meta["primary"]]
            assert {v["text"] for v in record["variants"]} <= {c.strip() for c in others}
            assert len(record["variants"]) + len(record["skipped"]) == len(others)
            assert all(v["text"] == meta["captions"][v["annotation_index"]] for v in record["variants"])
            total += len(record["variants"])
    assert manifest["stats"]["variants"] == total > 0
