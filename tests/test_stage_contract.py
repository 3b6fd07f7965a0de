"""The stage contract, checked once for the runner and for every model-free stage.

Aligned keys and order with the base, identical bytes on rerun and after an interrupted run, a damaged base
shard recorded (not silently dropped), counts that reconcile, options converted and validated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest

from pipeline.augment.runner import stage_config
from pipeline.data.ingest import IngestConfig, run_ingest
from pipeline.core.paths import Layout
from pipeline.core.shards import list_shards, read_stats, read_tar, stats_path
from pipeline.augment.stage import (
    BaseSample,
    RunOptions,
    SampleResult,
    Stage,
    StageContext,
    Variant,
    run_stage,
)
from stages import DEFAULT_STAGES, get_stage_class


class UpperStage(Stage):
    """A test stage: one upper-cased variant per caption, none for captions holding 'triangle'."""

    name: ClassVar[str] = "upper"
    modality: ClassVar[str] = "text"

    @dataclass(frozen=True)
    class Config:
        batch_size: int = 7
        suffix: str = ""

    def augment_batch(self, samples: list[BaseSample]) -> list[SampleResult]:
        results = []
        for sample in samples:
            result = SampleResult()
            for index, caption in enumerate(sample.captions):
                if "triangle" in caption:
                    result.skipped.append({"caption_index": index, "reason": "triangle: not upper-cased"})
                else:
                    seed = self.seed_for(sample.key, index)
                    result.variants.append(Variant(seed, "upper", index, text=caption.upper() + self.config.suffix))
            results.append(result)
        return results


@pytest.fixture(scope="module")
def synth_base(tmp_path_factory) -> Layout:
    layout = Layout(tmp_path_factory.mktemp("contract") / "shards", tmp_path_factory.mktemp("contract") / "manifests")
    run_ingest(IngestConfig(dataset="synth", synth_size=40, shard_size=12), layout)
    return layout


def stage_bytes(layout: Layout, name: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in list_shards(layout.stage_dir("synth", name))}


def copy_layout(layout: Layout, tmp_path) -> Layout:
    import shutil

    target = Layout(tmp_path / "shards", tmp_path / "manifests")
    shutil.copytree(layout.base_dir("synth"), target.base_dir("synth"))
    return target


def test_runner_aligns_records_skips_and_reconciles(synth_base, tmp_path):
    layout = copy_layout(synth_base, tmp_path)
    manifest = run_stage(UpperStage, UpperStage.Config(), StageContext("synth"), layout)
    base = list_shards(layout.base_dir("synth"))
    out = list_shards(layout.stage_dir("synth", "upper"))
    assert [p.name for p in base] == [p.name for p in out]
    captions_total = 0
    for base_tar, out_tar in zip(base, out):
        base_samples, out_samples = read_tar(base_tar), read_tar(out_tar)
        assert [s["__key__"] for s in base_samples] == [s["__key__"] for s in out_samples]
        for base_sample, out_sample in zip(base_samples, out_samples):
            captions = json.loads(base_sample["json"])["captions"]
            record = json.loads(out_sample["json"])
            captions_total += len(captions)
            assert len(record["variants"]) + len(record["skipped"]) == len(captions)
            for variant in record["variants"]:
                assert variant["text"] == captions[variant["caption_index"]].upper()
                assert variant["op"] == "upper" and isinstance(variant["seed"], int)
    stats = manifest["stats"]
    assert manifest["counts"] == {"input": 40, "written": 40, "skipped": 0}
    assert stats["variants"] + stats["variant_skips"] == captions_total
    assert stats["variant_skips"] > 0 and stats["ops"] == {"upper": stats["variants"]}
    assert stats["variant_skip_reasons"] == {"triangle": stats["variant_skips"]}
    assert manifest["provenance"]["device"] == "cpu"  # the stage context's


def test_rerun_and_resume_give_identical_bytes(synth_base, tmp_path):
    layout = copy_layout(synth_base, tmp_path)
    run_stage(UpperStage, UpperStage.Config(), StageContext("synth"), layout)
    expected = stage_bytes(layout, "upper")
    shards = list_shards(layout.stage_dir("synth", "upper"))
    untouched_mtime = shards[0].stat().st_mtime_ns
    stats_path(shards[1]).unlink()  # interrupted before its stats file
    shards[2].write_bytes(shards[2].read_bytes()[:1024])  # a truncated tar
    run_stage(UpperStage, UpperStage.Config(), StageContext("synth"), layout)
    assert stage_bytes(layout, "upper") == expected
    assert shards[0].stat().st_mtime_ns == untouched_mtime
    # A different config is a different run: --overwrite is how a user redoes it.
    run_stage(UpperStage, UpperStage.Config(suffix="!"), StageContext("synth"), layout, RunOptions(mode="overwrite"))
    assert stage_bytes(layout, "upper") != expected


def test_seeds_depend_on_dataset_stage_key_and_variant():
    stage = UpperStage(UpperStage.Config(), StageContext("synth", seed=0))
    seeds = {stage.seed_for(key, v) for key in ("a", "b") for v in (0, 1)}
    assert len(seeds) == 4
    assert stage.seed_for("a", 0) == UpperStage(UpperStage.Config(), StageContext("synth")).seed_for("a", 0)
    assert stage.seed_for("a", 0) != UpperStage(UpperStage.Config(), StageContext("coco")).seed_for("a", 0)
    assert stage.seed_for("a", 0) != UpperStage(UpperStage.Config(), StageContext("synth", seed=1)).seed_for("a", 0)


def test_damaged_base_shard_is_recorded_per_key(synth_base, tmp_path):
    layout = copy_layout(synth_base, tmp_path)
    broken = list_shards(layout.base_dir("synth"))[1]
    keys = read_stats(broken)["keys"]
    broken.write_bytes(broken.read_bytes()[:1500])
    manifest = run_stage(UpperStage, UpperStage.Config(), StageContext("synth"), layout, RunOptions(retries=0))
    assert manifest["counts"]["input"] == 40
    assert manifest["counts"]["written"] == 40 - len(keys)
    assert sorted(s["source"] for s in manifest["skipped"]) == sorted(keys)
    assert all(s["reason"].startswith("shard failed: base shard unreadable") for s in manifest["skipped"])
    assert [f["shard"] for f in manifest["failed_shards"]] == [broken.name]


def test_options_are_converted_and_unknown_ones_refused():
    config = stage_config(UpperStage, {"batch_size": "3", "suffix": "x"})
    assert config == UpperStage.Config(batch_size=3, suffix="x")
    with pytest.raises(ValueError, match="no option 'batch'"):
        stage_config(UpperStage, {"batch": "3"})
    with pytest.raises(ValueError, match="not a valid int"):
        stage_config(UpperStage, {"batch_size": "three"})


@pytest.mark.parametrize("name", DEFAULT_STAGES)
def test_model_free_stages_are_aligned_and_deterministic(name, synth_base, tmp_path):
    stage_cls = get_stage_class(name)
    available, reason = stage_cls.availability(stage_cls.Config())
    if not available:
        pytest.fail(f"{name} cannot run here: {reason}")
    first = copy_layout(synth_base, tmp_path / "one")
    second = copy_layout(synth_base, tmp_path / "two")
    manifest = run_stage(stage_cls, stage_cls.Config(), StageContext("synth"), first)
    run_stage(stage_cls, stage_cls.Config(), StageContext("synth"), second, RunOptions(workers=2))
    assert stage_bytes(first, name) == stage_bytes(second, name)
    for base_tar in list_shards(first.base_dir("synth")):
        out_samples = read_tar(first.stage_dir("synth", name) / base_tar.name)
        assert [s["__key__"] for s in read_tar(base_tar)] == [s["__key__"] for s in out_samples]
        for sample in out_samples:
            record = json.loads(sample["json"])
            files = {k for k in sample if k.startswith("v") and k.endswith(".jpg")}
            assert files == {v["file"] for v in record["variants"] if "file" in v}
    assert manifest["stats"]["variants"] > 0
    assert manifest["counts"]["input"] == manifest["counts"]["written"] + manifest["counts"]["skipped"]
