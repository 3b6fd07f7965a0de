"""Shard URL lists (brace patterns, '::' lists, pipe: commands) for training and evaluation, with no dataset
folder layout; bad specs are clear errors naming the shard."""

from __future__ import annotations

import shutil

import pytest
import torch

from pipeline.evaluation.evaluate import EvalConfig, evaluate
from pipeline.models.hf import load_clip
from pipeline.core.paths import Layout
from pipeline.core.shard_urls import check_stage_urls, dataset_size, expand_urls, read_url, stage_url
from pipeline.core.shards import read_tar
from pipeline.train.config import DataConfig, OptimConfig, TrainConfig
from pipeline.train.main import train
from pipeline.train.toy import write_toy_shards


@pytest.fixture()
def elsewhere(tmp_path):
    """Toy base + i2t-human shards (3 shards) in a folder outside any SHARDS_DIR: <tmp>/store/{base,i2t-human}/."""
    write_toy_shards(tmp_path / "made", "toy", shards=3, per_shard=16, text_stage="i2t-human")
    shutil.copytree(tmp_path / "made" / "toy", tmp_path / "store")
    return tmp_path / "store"


def _layout(root) -> Layout:
    return Layout(shards_dir=root / "shards", manifests_dir=root / "manifests", runs_dir=root / "runs",
                  models_dir=root / "models")


def test_brace_patterns_lists_and_pipes_expand(elsewhere):
    pattern = f"{elsewhere}/base/train-{{000000..000002}}.tar"
    urls = expand_urls(pattern)
    assert urls == [str(elsewhere / "base" / f"train-00000{i}.tar") for i in range(3)]
    assert expand_urls(f"{urls[0]}::{urls[2]}") == [urls[0], urls[2]]
    pipes = expand_urls(f"pipe:cat {pattern}")
    assert pipes == [f"pipe:cat {u}" for u in urls]
    assert read_url(pipes[1]) == read_tar(elsewhere / "base" / "train-000001.tar")


def test_bad_specs_name_the_missing_shard(elsewhere):
    with pytest.raises(FileNotFoundError, match="matches no shard"):
        expand_urls(f"{elsewhere}/base/val-{{000000..000002}}.tar")
    (elsewhere / "base" / "train-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 shards .* missing \(first: .*train-000001.tar\)"):
        expand_urls(f"{elsewhere}/base/train-{{000000..000002}}.tar")
    with pytest.raises(ValueError, match="empty"):
        expand_urls("  ")


def test_stage_shards_are_found_by_the_stage_name(elsewhere):
    base = str(elsewhere / "base" / "train-000002.tar")
    assert stage_url(base, "i2t-human") == str(elsewhere / "i2t-human" / "train-000002.tar")
    assert stage_url(f"pipe:cat {base}", "eda") == f"pipe:cat {elsewhere}/eda/train-000002.tar"
    with pytest.raises(ValueError, match="folder named 'base'"):
        stage_url("/data/coco/train-000000.tar", "eda")
    check_stage_urls([base], ("i2t-human",))
    with pytest.raises(FileNotFoundError, match="stage 'eda' lacks 1 of 1"):
        check_stage_urls([base], ("eda",))


def test_sizes_come_from_sizes_json_or_the_option(elsewhere):
    urls = expand_urls(f"{elsewhere}/base/train-{{000000..000002}}.tar")
    (elsewhere / "base" / "sizes.json").write_text('{"train-000000.tar": 16, "train-000001.tar": 16, "train-000002.tar": 16}')
    assert dataset_size(urls) == 48
    assert dataset_size([f"pipe:cat {u}" for u in urls]) is None
    assert dataset_size([f"pipe:cat {u}" for u in urls], num_samples=48) == 48


def test_training_from_a_pipe_url_pattern_equals_training_from_the_dataset_folder(elsewhere, tmp_path, tiny_model_dirs):
    """MAT+ from `pipe:cat .../base/train-{...}.tar` with no SHARDS_DIR layout: the same weights as from the folder."""
    base = TrainConfig(mode="matplus", dataset="toy", clip=tiny_model_dirs["clip"], mlm=tiny_model_dirs["mlm"],
                       steps=2, batch_size=8, save_every=2, precision="fp32", report_to=(),
                       optim=OptimConfig(lr=1e-3, warmup=1),
                       data=DataConfig(stages=("i2t-human",), num_workers=0, shuffle_buffer=8))
    shutil.copytree(elsewhere, tmp_path / "folder" / "shards" / "toy")
    from_folder = train(base, _layout(tmp_path / "folder"))
    urls = f"pipe:cat {elsewhere}/base/train-{{000000..000002}}.tar"
    piped = train(TrainConfig(**{**base.__dict__, "dataset": "nowhere",
                                 "data": DataConfig(urls=urls, stages=("i2t-human",), num_workers=0, shuffle_buffer=8)}),
                  _layout(tmp_path / "piped"))
    assert not (tmp_path / "piped" / "shards").exists()
    a, b = load_clip(from_folder.model_dir).model.state_dict(), load_clip(piped.model_dir).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluation_from_a_pipe_url_equals_evaluation_from_the_dataset_folder(tmp_path, tiny_model_dirs):
    from pipeline.data.ingest import IngestConfig, run_ingest
    from pipeline.core.executor import RunOptions

    layout = _layout(tmp_path / "ingested")
    run_ingest(IngestConfig(dataset="synth", synth_size=60, shard_size=1000), layout, RunOptions(workers=1))
    shutil.copytree(layout.base_dir("synth"), tmp_path / "store" / "base")
    settings = dict(checkpoint=tiny_model_dirs["clip"], attacks=("pgd",), size=6, steps=1, device="cpu", report_to=())
    from_folder = evaluate(EvalConfig(name="folder", **settings), layout)
    piped = evaluate(EvalConfig(name="piped", dataset="nowhere", data=f"pipe:cat {tmp_path}/store/base/test-000000.tar",
                                **settings), _layout(tmp_path / "other"))
    assert piped["n_images"] == from_folder["n_images"] >= 3
    for attack in ("clean", "pgd"):
        assert piped["metrics"][attack]["embeddings_sha256"] == from_folder["metrics"][attack]["embeddings_sha256"]


def test_evaluation_refuses_a_shard_changed_in_place_and_names_it(tmp_path, tiny_model_dirs):
    import tarfile

    from typer.testing import CliRunner

    from pipeline.commands.cli import app
    from pipeline.core.executor import RunOptions
    from pipeline.data.ingest import IngestConfig, run_ingest

    layout = _layout(tmp_path)
    run_ingest(IngestConfig(dataset="synth", synth_size=60, shard_size=1000), layout, RunOptions(workers=1))
    shard = layout.base_dir("synth") / "test-000000.tar"
    with tarfile.open(shard) as tar:
        image = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    with open(shard, "r+b") as handle:  # one byte of image data, the size unchanged: the tar still reads
        handle.seek(image.offset_data + image.size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x55]))
    assert read_tar(shard)  # still a readable tar
    result = CliRunner().invoke(app, ["--shards-dir", str(layout.shards_dir), "--manifests-dir", str(layout.manifests_dir),
                                      "eval", "--dataset", "synth", "--ckpt", tiny_model_dirs["clip"], "--device", "cpu",
                                      "--size", "4", "--attacks", "pgd", "--steps", "1"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: shard {shard} does not match the sha256 its stats file recorded: it changed after it was written; "
        "rerun the command that wrote it")
