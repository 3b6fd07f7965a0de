"""`make export`: every training pair as a plain WebDataset sample; counts reconcile; interruptions are redone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds

from pipeline.curate import export
from pipeline.curate.export import ExportConfig, run_export
from pipeline.core import ledger
from pipeline.core.paths import Layout
from pipeline.core.shards import list_shards, read_tar, write_stats, write_tar
from pipeline.core.fileio import sha256_file
from pipeline.train.toy import write_toy_shards

IMAGES = 2 * 6  # write_toy_shards(shards=2, per_shard=6)


@pytest.fixture
def layout(tmp_path) -> Layout:
    layout = Layout(tmp_path / "shards", tmp_path / "manifests")
    base = write_toy_shards(layout.shards_dir, shards=2, per_shard=6, text_stage="txt", image_stage="img")
    for tar in list_shards(base.parent / "txt"):  # scores on the text variants, as a scored stage has
        samples = read_tar(tar)
        for sample in samples:
            record = json.loads(sample["json"])
            for index, variant in enumerate(record["variants"]):
                variant.update(alignment=0.5 + index / 10, src_sim=0.9, shift=1.25)
            sample["json"] = record
        write_stats(tar, {"sha256": write_tar(tar, samples), "samples": len(samples), "variants": 3 * len(samples)})
    return layout


def read_export(out: Path) -> list[tuple]:
    urls = [str(p) for p in list_shards(out)]
    return list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "json", "__key__"))


def test_export_is_every_training_pair_read_by_plain_webdataset(layout):
    summary = run_export(ExportConfig(dataset="toy", stages=("txt", "img"), shard_size=25), layout)
    # Per image: texts = primary caption + 3 paraphrases (captions 0, 1, 2). The base image and v1 (any caption)
    # pair with all 4; v0 depicts caption 0, so it pairs with caption 0 and its paraphrase only.
    assert summary["counts"]["pairs"] == IMAGES * (4 + 2 + 4)
    assert summary["counts"]["pairs_by_source"] == {"base+base": IMAGES, "base+txt": 3 * IMAGES, "img+base": 2 * IMAGES,
                                                    "img+txt": 4 * IMAGES}  # v0: 1, v1: 3
    assert summary["counts"]["variants"] == {"txt": {"read": 3 * IMAGES, "kept": 3 * IMAGES, "dropped": 0},
                                             "img": {"read": 2 * IMAGES, "kept": 2 * IMAGES, "dropped": 0}}
    out = export.out_dir(ExportConfig(dataset="toy"), layout)
    assert len(list_shards(out)) == 5 and json.loads((out / "sizes.json").read_text())["train-000004.tar"] == 20
    samples = read_export(out)
    assert len(samples) == summary["counts"]["pairs"] and len({s[3] for s in samples}) == len(samples)
    image, text, info, _ = samples[0]
    assert image.size == (32, 32) and info["base_key"] == "train_000000_000000" and text.startswith("a ")
    v0 = [s for s in samples if s[2]["image"]["stage"] == "img" and s[2]["image"]["variant"] == 0]
    assert {s[2]["text"]["caption_index"] for s in v0} == {0} and len(v0) == 2 * IMAGES
    scored = [s[2] for s in samples if s[2]["text"]["stage"] == "txt"]
    assert all(i["text"]["scores"] == {"alignment": 0.5 + i["text"]["variant"] / 10, "src_sim": 0.9, "shift": 1.25}
               for i in scored)
    assert all("scores" not in s[2]["image"] for s in samples)  # the image stage was not scored


def test_export_honours_a_filter(layout):
    # Keep only paraphrase 1 of the first image of each shard, and no image variant at all.
    kept = {"train_000000_000000": [1], "train_000001_000000": [1]}
    path = layout.dataset_manifests("toy") / "filters" / "one.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"name": "one", "stages": {"txt": {"keep": kept}, "img": {"keep": {}}}}))
    summary = run_export(ExportConfig(dataset="toy", stages=("txt", "img"), filter="one"), layout)
    assert summary["counts"]["pairs_by_source"] == {"base+base": IMAGES, "base+txt": 2}
    assert summary["counts"]["variants"]["txt"] == {"read": 3 * IMAGES, "kept": 2, "dropped": 3 * IMAGES - 2}
    texts = {s[1] for s in read_export(export.out_dir(ExportConfig(dataset="toy"), layout)) if s[2]["text"]["stage"] == "txt"}
    assert all(t.startswith("the colour is") and t.endswith("(paraphrase)") for t in texts)


def test_an_interrupted_export_is_detected_and_redone(layout, monkeypatch):
    config = ExportConfig(dataset="toy", stages=("txt",), shard_size=10)
    clean = run_export(config, layout)
    out = export.out_dir(config, layout)
    digests = {p.name: sha256_file(p) for p in list_shards(out)}

    # A run killed after its second shard: shards on disk, no export.json, a temporary file left behind.
    real_write_tar, written = export.write_tar, []

    def dying_write_tar(path, samples):
        if len(written) == 2:
            ledger.temp_path(path).write_bytes(b"half a tar")  # what a write killed mid-way leaves
            raise KeyboardInterrupt("killed")
        written.append(path)
        return real_write_tar(path, samples)

    monkeypatch.setattr(export, "write_tar", dying_write_tar)
    with pytest.raises(KeyboardInterrupt):
        run_export(ExportConfig(dataset="toy", stages=("txt",), shard_size=7), layout)
    assert not (out / "export.json").exists() and list(out.glob("*.tmp"))
    monkeypatch.setattr(export, "write_tar", real_write_tar)

    again = run_export(config, layout)
    assert {p.name: sha256_file(p) for p in list_shards(out)} == digests
    assert not list(out.glob("*.tmp")) and again["counts"] == clean["counts"]
    assert len(read_export(out)) == clean["counts"]["pairs"] == IMAGES * 4

    # A damaged shard under a complete export.json is noticed too; an intact export is left as it is.
    (out / "train-000001.tar").write_bytes(b"x" * 512)
    run_export(config, layout)
    assert sha256_file(out / "train-000001.tar") == digests["train-000001.tar"]
    before = (out / "export.json").stat().st_mtime_ns
    run_export(config, layout)
    assert (out / "export.json").stat().st_mtime_ns == before


def test_cli_export_and_clean_remove_it(layout, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.commands.cli import app
    from pipeline.commands.clean import clean

    monkeypatch.setenv("MAT_SHARDS_DIR", str(layout.shards_dir))
    monkeypatch.setenv("MAT_MANIFESTS_DIR", str(layout.manifests_dir))
    result = CliRunner().invoke(app, ["export", "--dataset", "toy", "--stages", "txt", "--shard-size", "20"])
    assert result.exit_code == 0, result.output
    assert "48 pairs of 12 images in 3 shards" in result.output and "txt: 36 of 36 variants kept" in result.output
    out = export.out_dir(ExportConfig(dataset="toy"), layout)
    assert (out / "export.json").exists()
    missing = CliRunner().invoke(app, ["export", "--dataset", "toy", "--stages", "nosuchstage"])
    assert missing.exit_code == 2 and "nosuchstage" in missing.output
    clean(layout, "toy")
    assert not out.exists()
