"""Shard URL lists where shards are read by augmentation, the scorer's reference, stats and wds ingest.

A `pipe:cat` spec of the same shards gives the same outputs byte for byte as the local path or folder; a pattern
that matches nothing, a shard missing from the middle of one and an unreadable pipe are clear errors naming them.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.augment.scoring import Scorer, ScorerConfig
from pipeline.augment.stage import BaseSample, SampleResult, Stage, StageContext, Variant, run_stage
from pipeline.core.fileio import sha256_file
from pipeline.core.paths import Layout
from pipeline.core.shard_urls import base_fingerprints, fingerprint, path_or_spec, shard_file_name
from pipeline.core.shards import ShardError, list_shards, read_stats, read_tar, stats_path, write_tar
from pipeline.curate.stats import run_stats
from pipeline.data.ingest import IngestConfig, run_ingest
from pipeline.data.sources import SourceError


class TagStage(Stage):
    """A text stage: one tagged variant of every caption."""

    name: ClassVar[str] = "tag"
    modality: ClassVar[str] = "text"

    @dataclass(frozen=True)
    class Config:
        batch_size: int = 5

    def augment_batch(self, samples: list[BaseSample]) -> list[SampleResult]:
        return [SampleResult([Variant(self.seed_for(s.key, i), "tag", i, text=f"{c} tagged")
                              for i, c in enumerate(s.captions)]) for s in samples]


def _layout(root: Path) -> Layout:
    return Layout(shards_dir=root / "shards", manifests_dir=root / "manifests")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Synth base shards (train-000000..000002, val, test) in <tmp>/store/synth/base, as `make ingest` wrote them."""
    root = tmp_path_factory.mktemp("store")
    layout = Layout(root / "made" / "shards", root / "made" / "manifests")
    run_ingest(IngestConfig(dataset="synth", synth_size=36, shard_size=10), layout)
    shutil.copytree(layout.dataset_shards("synth"), root / "store" / "synth")
    names = [p.name for p in list_shards(root / "store" / "synth" / "base")]
    assert names[:3] == ["test-000000.tar", "train-000000.tar", "train-000001.tar"] and "train-000002.tar" in names
    return root / "store" / "synth"


def _pipe_spec(base: Path) -> str:
    return "::".join(f"pipe:cat {p}" for p in list_shards(base))


def _stage_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.tar"))}


def _stats_without_time(directory: Path) -> dict[str, dict]:
    return {p.name: {k: v for k, v in read_stats(p).items() if k != "seconds"} for p in list_shards(directory)}


def test_names_specs_and_fingerprints(store):
    assert shard_file_name("pipe:aws s3 cp s3://bucket/coco/base/train-000003.tar -") == "train-000003.tar"
    assert shard_file_name("https://host/coco/base/val-000001.tar?download=1") == "val-000001.tar"
    with pytest.raises(ValueError, match="exactly one"):
        shard_file_name("pipe:cat a.tar b.tar")
    assert path_or_spec("pipe:aws s3 cp s3://b/base/x.tar -") == "pipe:aws s3 cp s3://b/base/x.tar -"  # '//' kept
    assert path_or_spec("/data/x/train-{000000..000003}.tar") == "/data/x/train-{000000..000003}.tar"
    assert path_or_spec(str(store)) == store
    tar = store / "base" / "train-000001.tar"
    local, piped = fingerprint(str(tar)), fingerprint(f"pipe:cat {tar}")
    assert local.sha256 == piped.sha256 == sha256_file(tar) and local.keys == piped.keys == tuple(read_stats(tar)["keys"])
    with pytest.raises(ValueError, match="more than once"):
        base_fingerprints(f"{tar}::pipe:cat {tar}")


def test_augment_and_scorer_from_pipe_urls_equal_the_folder_run(store, tmp_path, tiny_model_dirs):
    folder = _layout(tmp_path / "folder")
    shutil.copytree(store / "base", folder.base_dir("synth"))
    scorer = Scorer(ScorerConfig(model=tiny_model_dirs["clip"], batch_size=16), folder.dataset_manifests("synth"))
    scorer.prepare(folder.base_dir("synth"))
    run_stage(TagStage, TagStage.Config(), StageContext("synth"), folder, scorer=scorer)

    remote = _layout(tmp_path / "remote")  # nothing but what the run writes: the base is read through pipe:cat
    bases = base_fingerprints(_pipe_spec(store / "base"))
    piped = Scorer(ScorerConfig(model=tiny_model_dirs["clip"], batch_size=16), remote.dataset_manifests("synth"))
    piped.prepare(bases)
    for side in ("image", "text"):
        np.testing.assert_array_equal(piped.references[side].mean, scorer.references[side].mean)
    # the same shards give the same reference cache key
    assert [p.name for p in remote.dataset_manifests("synth").glob("reference-*.npz")] == \
           [p.name for p in folder.dataset_manifests("synth").glob("reference-*.npz")]
    manifest = run_stage(TagStage, TagStage.Config(), StageContext("synth"), remote, scorer=piped, bases=bases)
    assert not remote.base_dir("synth").exists()
    out_dir = remote.stage_dir("synth", "tag")
    assert _stage_files(out_dir) == _stage_files(folder.stage_dir("synth", "tag")) and len(_stage_files(out_dir)) == 5
    assert _stats_without_time(out_dir) == _stats_without_time(folder.stage_dir("synth", "tag"))
    assert manifest["counts"]["written"] == 36

    # Resume: a rerun from the URLs redoes nothing; a base shard whose bytes changed (same keys) is redone alone.
    before = {p.name: stats_path(p).read_text() for p in list_shards(out_dir)}
    run_stage(TagStage, TagStage.Config(), StageContext("synth"), remote, scorer=piped,
              bases=base_fingerprints(_pipe_spec(store / "base")))
    assert {p.name: stats_path(p).read_text() for p in list_shards(out_dir)} == before
    changed = tmp_path / "changed" / "synth" / "base"
    shutil.copytree(store / "base", changed)
    samples = read_tar(changed / "train-000001.tar")
    meta = json.loads(samples[0]["json"])
    meta["captions"][0] = "a changed caption"
    samples[0]["json"] = meta
    write_tar(changed / "train-000001.tar", samples)  # its stats file is stale now: pipe: reads do not see it
    run_stage(TagStage, TagStage.Config(), StageContext("synth"), remote, scorer=piped,
              bases=base_fingerprints(_pipe_spec(changed)))
    after = {p.name: stats_path(p).read_text() for p in list_shards(out_dir)}
    assert [name for name in after if after[name] != before[name]] == ["train-000001.tar"]
    assert json.loads(after["train-000001.tar"])["base_sha256"] == sha256_file(changed / "train-000001.tar")
    first = json.loads(read_tar(out_dir / "train-000001.tar")[0]["json"])
    assert first["variants"][0]["text"] == "a changed caption tagged"


def test_bad_base_specs_for_augment_are_clear_errors(store, tmp_path):
    layout = _layout(tmp_path)
    with pytest.raises(FileNotFoundError, match="matches no shard"):
        base_fingerprints(f"{store}/base/val-{{000005..000007}}.tar")
    middle = tmp_path / "gap" / "synth" / "base"
    shutil.copytree(store / "base", middle)
    (middle / "train-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 shards .* missing \(first: .*train-000001.tar\)"):
        base_fingerprints(f"{middle}/train-{{000000..000002}}.tar")
    with pytest.raises(ShardError, match="cannot read shard 'pipe:cat .*train-000001.tar'"):
        base_fingerprints(f"pipe:cat {middle}/train-{{000000..000002}}.tar")

    from pipeline.commands.cli import app

    env = {"MAT_SHARDS_DIR": str(layout.shards_dir), "MAT_MANIFESTS_DIR": str(layout.manifests_dir), "MAT_DATASET": "synth",
           "MAT_SCORER": "none", "MAT_STAGES": "randaug"}
    for spec, message in ((f"{store}/base/val-{{000005..000007}}.tar", "matches no shard"),
                          (f"{middle}/train-{{000000..000002}}.tar", "1 of 3 shards"),
                          (f"pipe:cat {middle}/train-{{000000..000002}}.tar", "cannot read shard")):
        out = CliRunner().invoke(app, ["augment"], env={**env, "MAT_BASE_DATA": spec})
        assert out.exit_code == 2 and message in out.output, out.output
    assert not layout.shards_dir.exists()


def test_cli_augment_and_stats_from_base_data_equal_the_folder(store, tmp_path):
    from pipeline.commands.cli import app

    runner = CliRunner()
    folder = _layout(tmp_path / "folder")
    shutil.copytree(store / "base", folder.base_dir("synth"))
    shutil.copytree(store.parent.parent / "made" / "manifests", folder.manifests_dir)  # the ingest's base manifest
    common = {"MAT_DATASET": "synth", "MAT_SCORER": "none", "MAT_STAGES": "randaug", "MAT_STAGE_OPTS": "randaug.variants_per_image=1"}
    env = {**common, "MAT_SHARDS_DIR": str(folder.shards_dir), "MAT_MANIFESTS_DIR": str(folder.manifests_dir)}
    assert runner.invoke(app, ["augment"], env=env).exit_code == 0

    remote = _layout(tmp_path / "remote")
    spec = _pipe_spec(store / "base")
    out = runner.invoke(app, ["augment"], env={**common, "MAT_SHARDS_DIR": str(remote.shards_dir),
                                                "MAT_MANIFESTS_DIR": str(remote.manifests_dir), "MAT_BASE_DATA": spec})
    assert out.exit_code == 0, out.output
    assert _stage_files(remote.stage_dir("synth", "randaug")) == _stage_files(folder.stage_dir("synth", "randaug"))

    # stats from the URLs: the stage shards beside the base ones (here: uploaded next to them), same table
    beside = tmp_path / "beside" / "synth"
    shutil.copytree(store / "base", beside / "base")
    shutil.copytree(remote.stage_dir("synth", "randaug"), beside / "randaug")
    shutil.copy(folder.manifest_path("synth", "base"), remote.manifest_path("synth", "base"))
    from_folder = run_stats("synth", folder)["rows"]
    from_urls = run_stats("synth", remote, base_data=_pipe_spec(beside / "base"))["rows"]
    assert from_urls == from_folder and from_urls[1]["stage"] == "randaug" and from_urls[1]["variants"] > 0
    out = runner.invoke(app, ["stats"], env={"MAT_DATASET": "synth", "MAT_SHARDS_DIR": str(remote.shards_dir),
                                             "MAT_MANIFESTS_DIR": str(remote.manifests_dir),
                                             "MAT_BASE_DATA": f"{beside}/base/train-{{000000..000002}}.tar"})
    assert out.exit_code == 0 and "| randaug |" in out.output, out.output

    # bad input: a pattern matching nothing, a base shard or a stage shard missing from the middle
    with pytest.raises(FileNotFoundError, match="matches no shard"):
        run_stats("synth", remote, base_data=f"{beside}/base/val-{{000004..000009}}.tar")
    (beside / "randaug" / "train-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"stage 'randaug' lacks 1 of 3 shards \(first: .*train-000001.tar\)"):
        run_stats("synth", remote, base_data=f"{beside}/base/train-{{000000..000002}}.tar")
    (beside / "base" / "train-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 shards .* missing"):
        run_stats("synth", remote, base_data=f"{beside}/base/train-{{000000..000002}}.tar")
    out = runner.invoke(app, ["stats"], env={"MAT_DATASET": "synth", "MAT_SHARDS_DIR": str(remote.shards_dir),
                                             "MAT_MANIFESTS_DIR": str(remote.manifests_dir),
                                             "MAT_BASE_DATA": f"pipe:cat {beside}/base/train-000001.tar"})
    assert out.exit_code == 2 and "cannot read shard" in out.output, out.output


# ------------------------------------------------------------------ wds ingest from URL specs


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture()
def img2dataset(tmp_path) -> Path:
    """Three img2dataset-style shards: json with key/url/status/caption, one failed status per shard."""
    folder = tmp_path / "i2d"
    for shard in range(3):
        samples = []
        for index in range(6):
            key = f"{shard:05d}{index:04d}"
            status = "failed_to_resize" if index == 5 else "success"
            meta = {"key": key, "status": status, "caption": f"photo {shard} {index}", "url": f"http://x/{key}.jpg"}
            samples.append({"__key__": key, "jpg": _jpeg((40 * index, 80 * shard, 9)), "json": meta})
        write_tar(folder / f"{shard:05d}.tar", samples)
    return folder


def _digests(layout: Layout, dataset: str) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in list_shards(layout.base_dir(dataset))}


def test_wds_ingest_from_a_pipe_pattern_equals_the_folder(img2dataset, tmp_path):
    local = _layout(tmp_path / "local")
    manifest = run_ingest(IngestConfig(dataset="i2d", data_root=img2dataset, fmt="wds", shard_size=4), local)
    assert manifest["counts"] == {"input": 18, "written": 15, "skipped": 3}
    piped = _layout(tmp_path / "piped")
    spec = f"pipe:cat {img2dataset}/{{00000..00002}}.tar"
    again = run_ingest(IngestConfig(dataset="i2d", data_root=spec, shard_size=4), piped)  # FORMAT: wds for a spec
    assert again["counts"] == manifest["counts"] and again["config"]["data_root"] == spec
    assert _digests(piped, "i2d") == _digests(local, "i2d") and len(_digests(local, "i2d")) >= 4
    assert sorted(s["reason"] for s in again["skipped"]) == ["img2dataset status 'failed_to_resize'"] * 3
    # LIMIT stops the stream early (the cut-off pipe is no error) and takes the same images as from the folder
    limited = run_ingest(IngestConfig(dataset="i2dl", data_root=spec, shard_size=4, limit=8), piped)
    run_ingest(IngestConfig(dataset="i2dl", data_root=img2dataset, fmt="wds", shard_size=4, limit=8), local)
    assert limited["counts"]["input"] == 8 and _digests(piped, "i2dl") == _digests(local, "i2dl")


def test_wds_ingest_local_patterns_still_read_the_parquet(img2dataset, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"key": "000010006", "status": "failed_to_download", "url": "http://x/6.jpg", "error_message": "HTTP 404"}]
    pq.write_table(pa.Table.from_pylist(rows), img2dataset / "00001.parquet")
    manifest = run_ingest(IngestConfig(dataset="i2d", data_root=f"{img2dataset}/{{00000..00002}}.tar", shard_size=4),
                          _layout(tmp_path))
    assert manifest["counts"] == {"input": 19, "written": 15, "skipped": 4}
    assert "img2dataset status 'failed_to_download': HTTP 404" in {s["reason"] for s in manifest["skipped"]}


def test_wds_ingest_bad_specs(img2dataset, tmp_path):
    layout = _layout(tmp_path)
    with pytest.raises(FileNotFoundError, match="matches no shard"):
        run_ingest(IngestConfig(dataset="i2d", data_root=f"{img2dataset}/{{00005..00007}}.tar"), layout)
    (img2dataset / "00001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 shards .* missing \(first: .*00001.tar\)"):
        run_ingest(IngestConfig(dataset="i2d", data_root=f"{img2dataset}/{{00000..00002}}.tar"), layout)
    with pytest.raises(SourceError, match="cannot read shard pipe:cat .*00001.tar"):
        run_ingest(IngestConfig(dataset="i2d", data_root=f"pipe:cat {img2dataset}/{{00000..00002}}.tar"), layout)
    with pytest.raises(ValueError, match="only FORMAT=wds"):
        IngestConfig(dataset="i2d", data_root=f"pipe:cat {img2dataset}/00000.tar", fmt="coco")


def test_cli_ingest_data_root_url_spec(img2dataset, tmp_path):
    from pipeline.commands.cli import app

    local, piped = _layout(tmp_path / "local"), _layout(tmp_path / "piped")
    run_ingest(IngestConfig(dataset="i2d", data_root=img2dataset, fmt="wds", shard_size=4), local)
    env = {"MAT_SHARDS_DIR": str(piped.shards_dir), "MAT_MANIFESTS_DIR": str(piped.manifests_dir), "MAT_DATASET": "i2d",
           "MAT_SHARD_SIZE": "4", "MAT_FORMAT": "wds", "MAT_DATA_ROOT": f"pipe:cat {img2dataset}/{{00000..00002}}.tar"}
    out = CliRunner().invoke(app, ["ingest"], env=env)
    assert out.exit_code == 0, out.output
    assert _digests(piped, "i2d") == _digests(local, "i2d")


COCO_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"


@pytest.mark.skipif(not COCO_MINI.exists(), reason="needs ../shared/data/coco-mini")
def test_wds_of_our_own_base_shards_through_pipe_cat_gives_them_again(tmp_path):
    layout = _layout(tmp_path / "coco")
    run_ingest(IngestConfig(dataset="coco", data_root=COCO_MINI, fmt="coco", shard_size=32), layout)
    spec = "::".join(f"pipe:cat {p}" for p in list_shards(layout.base_dir("coco")))
    again = _layout(tmp_path / "again")
    manifest = run_ingest(IngestConfig(dataset="cocowds", data_root=spec, shard_size=32), again)
    assert manifest["counts"]["written"] == 159
    assert _digests(again, "cocowds") == _digests(layout, "coco")
