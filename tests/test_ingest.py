"""Ingest: base shards, manifests that reconcile, bad images, resume, determinism, damaged tars."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.ingest import IngestConfig, run_ingest
from pipeline.core.paths import Layout
from pipeline.core.shards import ShardError, list_shards, read_stats, read_tar, stats_path
from pipeline.core.fileio import sha256_file
from pipeline.core.executor import RunOptions

COCO_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def layout(tmp_path) -> Layout:
    return Layout(tmp_path / "shards", tmp_path / "manifests")


@pytest.fixture
def bad_dataset(tmp_path) -> Path:
    """A COCO-layout dataset holding one of each bad input the foundation issue lists."""
    root = tmp_path / "bad"
    images_dir = root / "val2017"
    images_dir.mkdir(parents=True)
    good = encode(Image.new("RGB", (32, 24), (10, 200, 30)), "JPEG")
    files = {
        "good.jpg": good,
        "truncated.jpg": good[: len(good) // 2],
        "corrupt.jpg": b"\xff\xd8\xff\xe0 this is not a jpeg",
        "alpha.png": encode(Image.new("RGBA", (16, 16), (255, 0, 0, 128)), "PNG"),
        "gray.jpg": encode(Image.new("L", (16, 16), 128), "JPEG"),
        "cmyk.jpg": encode(Image.new("CMYK", (16, 16), (0, 50, 100, 0)), "JPEG"),
        "tiny.jpg": encode(Image.new("RGB", (1, 1), (1, 2, 3)), "JPEG"),
        "huge.png": encode(Image.new("RGB", (3000, 2000), (9, 9, 9)), "PNG"),
        "nocaption.jpg": good,
        "dup.jpg": good,
    }
    for name, data in files.items():
        (images_dir / name).write_bytes(data)
    names = list(files) + ["missing.jpg"]
    images = [{"id": i, "file_name": name} for i, name in enumerate(names)]
    images.append({"id": names.index("dup.jpg"), "file_name": "dup.jpg"})  # duplicate row
    annotations = []
    for i, name in enumerate(names):
        if name == "nocaption.jpg":
            continue
        annotations.append({"image_id": i, "caption": f"caption of {name}\nwith a newline"})
        annotations.append({"image_id": i, "caption": "   "})
    annotations.append({"image_id": 0, "caption": "naïve café — 犬"})
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


def test_bad_inputs_are_recorded_and_counts_reconcile(bad_dataset, layout):
    config = IngestConfig(dataset="bad", data_root=bad_dataset, max_pixels=5_000_000)
    manifest = run_ingest(config, layout)
    counts = manifest["counts"]
    assert counts == {"input": 12, "written": 6, "skipped": 6}
    reasons = {Path(s["source"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"truncated.jpg", "corrupt.jpg", "huge.png", "nocaption.jpg", "dup.jpg", "missing.jpg"}
    assert reasons["missing.jpg"].startswith("missing image file")
    assert reasons["truncated.jpg"].startswith("cannot decode image")
    assert reasons["huge.png"].startswith("image too large")
    assert reasons["nocaption.jpg"] == "no caption" and reasons["dup.jpg"] == "duplicate image id"
    captions = manifest["stats"]["captions"]
    assert captions["input"] == captions["written"] + captions["skipped"]
    assert len(manifest["stats"]["skipped_captions"]) == captions["skipped"]

    samples = [s for tar in list_shards(layout.base_dir("bad")) for s in read_tar(tar)]
    metas = {Path(json.loads(s["json"])["source"]).name: (s, json.loads(s["json"])) for s in samples}
    assert set(metas) == {"good.jpg", "alpha.png", "gray.jpg", "cmyk.jpg", "tiny.jpg", "dup.jpg"}  # dup: first row kept
    for name, (sample, meta) in metas.items():
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG"
        assert meta["width"] == image.width and meta["height"] == image.height
        assert "\n" not in sample["txt"].decode() and meta["captions"][0] == sample["txt"].decode()
    assert metas["good.jpg"][0]["jpg"] == (bad_dataset / "val2017" / "good.jpg").read_bytes()  # kept byte for byte
    assert metas["alpha.png"][1]["converted"] == "alpha->white"
    assert Image.open(io.BytesIO(metas["cmyk.jpg"][0]["jpg"])).mode == "RGB"
    assert (metas["tiny.jpg"][1]["width"], metas["tiny.jpg"][1]["height"]) == (1, 1)
    assert "naïve café — 犬" in metas["good.jpg"][1]["captions"]


def test_resize_only_when_asked(bad_dataset, layout):
    manifest = run_ingest(IngestConfig(dataset="bad", data_root=bad_dataset, max_side=20), layout)
    for tar in list_shards(layout.base_dir("bad")):
        for sample in read_tar(tar):
            assert max(Image.open(io.BytesIO(sample["jpg"])).size) <= 20
    assert manifest["counts"]["written"] == 7  # huge.png is resized now instead of refused


@pytest.mark.skipif(not COCO_MINI.exists(), reason="needs ../shared/data/coco-mini")
def test_coco_mini_all_159_images_with_5_captions(layout):
    manifest = run_ingest(IngestConfig(dataset="coco", data_root=COCO_MINI), layout)
    assert manifest["counts"] == {"input": 159, "written": 159, "skipped": 0}
    samples = [s for tar in list_shards(layout.base_dir("coco")) for s in read_tar(tar)]
    assert len(samples) == 159
    assert all(len(json.loads(s["json"])["captions"]) == 5 for s in samples)
    assert json.loads((layout.base_dir("coco") / "sizes.json").read_text()) == {
        Path(s["path"]).name: s["samples"] for s in manifest["shards"]
    }


def tar_bytes(layout: Layout, dataset: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in list_shards(layout.base_dir(dataset))}


def test_same_config_gives_identical_bytes_and_keys_have_no_dots(tmp_path):
    config = IngestConfig(dataset="synth", synth_size=60, shard_size=16)
    first, second = Layout(tmp_path / "a"), Layout(tmp_path / "b")
    run_ingest(config, first)
    run_ingest(config, second, RunOptions(workers=2))
    assert tar_bytes(first, "synth") == tar_bytes(second, "synth")
    keys = [s["__key__"] for tar in list_shards(first.base_dir("synth")) for s in read_tar(tar)]
    assert len(keys) == len(set(keys)) == 60 and not any("." in k for k in keys)


def test_resume_skips_done_shards_and_redoes_damaged_ones(layout):
    config = IngestConfig(dataset="synth", synth_size=48, shard_size=10)
    run_ingest(config, layout)
    expected = tar_bytes(layout, "synth")
    shards = list_shards(layout.base_dir("synth"))
    done_mtime = shards[1].stat().st_mtime_ns
    # A crash mid-write: the stats file never came; a truncated tar left in place of another.
    stats_path(shards[0]).unlink()
    shards[2].write_bytes(shards[2].read_bytes()[:700])
    with pytest.raises(ShardError):
        read_tar(shards[2])
    manifest = run_ingest(config, layout)
    assert tar_bytes(layout, "synth") == expected
    assert shards[1].stat().st_mtime_ns == done_mtime  # untouched
    assert manifest["counts"]["written"] == 48
    assert all(read_stats(p)["sha256"] == sha256_file(p) for p in shards)


def test_empty_source_is_an_error(tmp_path, layout):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="no usable record"):
        run_ingest(IngestConfig(dataset="empty", data_root=tmp_path), layout)


def test_disk_full_during_ingest_fails_the_command_and_leaves_no_tmp(tmp_path):
    """A real write limit (RLIMIT_FSIZE, SIGXFSZ ignored so the write raises EFBIG): shards of ~100 kB cannot be
    written, the manifest of ~30 kB can."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run(
        [sys.executable, "-m", "pipeline", "--shards-dir", "shards", "--manifests-dir", "manifests", "ingest",
         "--dataset", "synth", "--synth-size", "300", "--shard-size", "50", "--workers", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, preexec_fn=limit_file_size, timeout=600)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "0 written, 300 skipped" in run.stdout
    assert "7 shard(s) failed: synth/base/test-000000.tar (OSError: [Errno 27] File too large)" in run.stderr
    assert not list((tmp_path / "shards").rglob("*.tmp"))
    manifest = json.loads((tmp_path / "manifests" / "synth" / "base.json").read_text())
    assert manifest["counts"] == {"input": 300, "written": 0, "skipped": 300}


def test_augment_stops_when_its_base_ingest_has_failed_shards(tmp_path, monkeypatch):
    from pipeline.augment import runner

    failed = {"failed_shards": [{"shard": "train-000000.tar", "error": "OSError: [Errno 28] No space left on device"}]}
    monkeypatch.setattr(runner, "run_ingest", lambda *args: failed)
    with pytest.raises(ValueError, match=r"1 base shard\(s\) failed, first train-000000.tar \(OSError: \[Errno 28\]"):
        runner.ensure_base(IngestConfig(), Layout(tmp_path / "shards", tmp_path / "manifests"), RunOptions())
