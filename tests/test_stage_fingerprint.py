"""Settings fingerprints: a rerun with other stage options, seed or scorer stops and names them; --overwrite
redoes the stage; the same settings skip every finished shard; a manifest never mixes settings."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from pipeline.commands.cli import app
from pipeline.data.ingest import IngestConfig, run_ingest
from pipeline.core.manifests import build_manifest
from pipeline.core.paths import Layout
from pipeline.core.shards import list_shards, read_stats, stats_path
from pipeline.augment.stage import (
    BaseSample,
    RunOptions,
    SampleResult,
    SettingsChanged,
    Stage,
    StageContext,
    Variant,
    run_stage,
    settings_digest,
)


class SuffixStage(Stage):
    """One variant per image: its primary caption with a suffix."""

    name: ClassVar[str] = "suffix"
    modality: ClassVar[str] = "text"

    @dataclass(frozen=True)
    class Config:
        batch_size: int = 8
        suffix: str = "!"

    def augment_batch(self, samples: list[BaseSample]) -> list[SampleResult]:
        return [SampleResult([Variant(self.seed_for(s.key, 0), "suffix", 0, text=s.captions[0] + self.config.suffix)])
                for s in samples]


@dataclass(frozen=True)
class FakeScorer:
    """Stands in for the CLIP scorer: only its description matters here."""

    revision: str = "sha256:aaaa"

    def describe(self) -> dict[str, Any]:
        return {"name": "/somewhere/clip", "revision": self.revision, "precision": "fp32", "shrinkage": 0.01,
                "reference_samples": 100, "path": "/somewhere/clip", "device": "cpu"}

    def score_shard(self, samples, results, modality):
        return None


@pytest.fixture()
def layout(tmp_path_factory, tmp_path) -> Layout:
    cache = tmp_path_factory.getbasetemp() / "fingerprint-base"
    if not cache.exists():
        run_ingest(IngestConfig(dataset="synth", synth_size=30, shard_size=10), Layout(cache / "shards", cache / "manifests"))
    shutil.copytree(cache, tmp_path, dirs_exist_ok=True)
    return Layout(tmp_path / "shards", tmp_path / "manifests")


def _run(layout: Layout, config=SuffixStage.Config(), seed: int = 0, scorer=None, mode: str = "incremental"):
    return run_stage(SuffixStage, config, StageContext("synth", seed), layout, RunOptions(mode=mode), scorer)


def _state(layout: Layout) -> dict[str, tuple[bytes, int]]:
    """Each stage shard's bytes and the modification time of its stats file."""
    return {p.name: (p.read_bytes(), stats_path(p).stat().st_mtime_ns) for p in list_shards(layout.stage_dir("synth", "suffix"))}


def test_same_settings_skip_every_finished_shard(layout):
    first = _run(layout, scorer=FakeScorer())
    before = _state(layout)
    second = _run(layout, scorer=FakeScorer())
    assert _state(layout) == before and len(before) == 4
    assert first["config"]["fingerprint"] == second["config"]["fingerprint"]
    stats = read_stats(list_shards(layout.stage_dir("synth", "suffix"))[0])
    assert stats["settings"] == {"stage": {"batch_size": 8, "suffix": "!"}, "seed": 0,
                                 "scorer": {"revision": "sha256:aaaa", "precision": "fp32", "shrinkage": 0.01,
                                            "reference_samples": 100}}
    assert stats["base_sha256"] == read_stats(list_shards(layout.base_dir("synth"))[0])["sha256"]


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(config=SuffixStage.Config(suffix="?")), "stage.suffix: '!' -> '?'"),
        (dict(seed=1), "seed: 0 -> 1"),
        (dict(scorer=FakeScorer("sha256:bbbb")), "scorer.revision: 'sha256:aaaa' -> 'sha256:bbbb'"),
        (dict(scorer=None), "scorer.revision: 'sha256:aaaa' -> '(unset)'"),
    ],
)
def test_changed_settings_stop_naming_them_and_overwrite_redoes(layout, change, named):
    old = _run(layout, scorer=FakeScorer())["config"]["fingerprint"]
    before = _state(layout)
    settings = {"scorer": FakeScorer(), **change}
    with pytest.raises(SettingsChanged) as error:
        _run(layout, **settings)
    message = str(error.value)
    assert named in message and "--overwrite" in message and "4 finished shard(s)" in message
    assert _state(layout) == before  # nothing was touched
    manifest = _run(layout, **settings, mode="overwrite")
    shards = list_shards(layout.stage_dir("synth", "suffix"))
    fingerprints = {settings_digest(read_stats(p)["settings"]) for p in shards}
    assert fingerprints == {manifest["config"]["fingerprint"]} and old not in fingerprints
    _run(layout, **settings)  # and the new settings now resume


def test_a_changed_base_shard_is_redone_without_stopping(layout):
    _run(layout)
    run_ingest(IngestConfig(dataset="synth", synth_size=30, shard_size=10, max_side=16), layout)  # same keys, new bytes
    before = _state(layout)
    _run(layout)
    after = _state(layout)
    assert all(after[name][1] != before[name][1] for name in before)  # every shard remade
    for tar in list_shards(layout.stage_dir("synth", "suffix")):
        assert read_stats(tar)["base_sha256"] == read_stats(layout.base_dir("synth") / tar.name)["sha256"]


def test_a_manifest_never_mixes_settings(layout):
    _run(layout)
    tars = list_shards(layout.stage_dir("synth", "suffix"))
    stats = read_stats(tars[0])
    stats["settings"]["seed"] = 7
    stats_path(tars[0]).write_text(json.dumps(stats))
    with pytest.raises(ValueError, match="never mixes"):
        build_manifest("synth", "suffix", layout.stage_dir("synth", "suffix"), {})


def test_augment_cli_names_the_changed_option_and_offers_overwrite(tmp_path):
    env = {"MAT_SHARDS_DIR": str(tmp_path / "s"), "MAT_MANIFESTS_DIR": str(tmp_path / "m"), "MAT_MODELS_DIR": str(tmp_path / "models"),
           "MAT_SYNTH_SIZE": "20", "MAT_WORKERS": "1"}
    runner = CliRunner()
    assert runner.invoke(app, ["augment", "--stages", "i2t-human"], env=env).exit_code == 0
    changed = runner.invoke(app, ["augment", "--stages", "i2t-human", "--set", "i2t-human.max_variants=1"], env=env)
    text = " ".join(changed.output.split())
    assert changed.exit_code == 2 and "stage.max_variants: 0 -> 1" in text and "--overwrite" in text
    redone = runner.invoke(app, ["augment", "--stages", "i2t-human", "--set", "i2t-human.max_variants=1", "--overwrite"], env=env)
    assert redone.exit_code == 0, redone.output
    manifest = json.loads((Path(env["MAT_MANIFESTS_DIR"]) / "synth" / "i2t-human.json").read_text())
    assert manifest["config"]["settings"]["stage"]["max_variants"] == 1


def test_a_reingest_that_changes_the_base_makes_its_stages_stale(layout, caplog):
    stage_dir = layout.stage_dir("synth", "suffix")
    _run(layout)
    same = run_ingest(IngestConfig(dataset="synth", synth_size=30, shard_size=10), layout)
    assert len(list_shards(stage_dir)) == 4 and layout.manifest_path("synth", "suffix").is_file()  # unchanged base
    base = run_ingest(IngestConfig(dataset="synth", synth_size=30, shard_size=6), layout)
    assert base["counts"]["written"] == same["counts"]["written"]
    assert "stage suffix made from the old base" in caplog.text and "STAGES=suffix" in caplog.text
    assert not layout.manifest_path("synth", "suffix").exists()
    manifest = _run(layout)
    base_names = [p.name for p in list_shards(layout.base_dir("synth"))]
    assert [p.name for p in list_shards(stage_dir)] == base_names
    assert sorted(json.loads((stage_dir / "sizes.json").read_text())) == base_names
    assert manifest["counts"]["written"] == base["counts"]["written"]
