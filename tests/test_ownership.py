"""The pipeline overwrites and deletes only files it can prove it wrote (pipeline/core/ledger.py): temporary files
are created exclusively and never through a planted link; a link or a foreign file at a target is refused;
`make export` writes only into a new, empty or earlier export folder; `make clean` removes only recorded entries.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core import ledger
from pipeline.core.fileio import atomic_write_json, atomic_write_text
from pipeline.core.ledger import LEDGER, ForeignFileError
from pipeline.core.paths import Layout
from pipeline.core.shards import list_shards
from pipeline.data.ingest import IngestConfig, run_ingest


def _layout(root: Path) -> Layout:
    return Layout(root / "shards", root / "manifests", root / "runs", root / "models")


def _ingest(layout: Layout, dataset: str = "synth") -> None:
    run_ingest(IngestConfig(dataset=dataset, synth_size=12, shard_size=5, fmt="synth"), layout)


# ---------------------------------------------------------------- writes follow no planted link

def test_ingest_writes_through_no_planted_temporary_link(tmp_path):
    layout = _layout(tmp_path)
    victim = tmp_path / "elsewhere.txt"
    victim.write_text("precious")
    base = layout.base_dir("synth")
    base.mkdir(parents=True)
    (base / "train-000000.tar.tmp").symlink_to(victim)  # the old fixed temporary names
    manifests = layout.dataset_manifests("synth")
    manifests.mkdir(parents=True)
    (manifests / "base.json.tmp").symlink_to(victim)
    _ingest(layout)
    assert victim.read_text() == "precious"
    tar = base / "train-000000.tar"
    assert tar.is_file() and not tar.is_symlink() and (manifests / "base.json").is_file()
    assert not (manifests / "base.json").is_symlink()
    assert not [p for p in base.iterdir() if ledger.is_own_temp(p)]  # no temporary file left behind


def test_a_link_or_a_foreign_file_at_the_target_is_refused(tmp_path):
    victim = tmp_path / "elsewhere.json"
    victim.write_text("precious")
    folder = tmp_path / "out"
    atomic_write_json(folder / "mine.json", {"a": 1})
    atomic_write_json(folder / "mine.json", {"a": 2})  # our own file: replaced
    assert json.loads((folder / "mine.json").read_text()) == {"a": 2}
    (folder / "linked.json").symlink_to(victim)
    (folder / "theirs.json").write_text("user's")
    for name in ("linked.json", "theirs.json"):
        with pytest.raises(ForeignFileError, match=f"refusing to overwrite {folder / name}.*move it away"):
            atomic_write_json(folder / name, {"a": 3})
    assert victim.read_text() == "precious" and (folder / "theirs.json").read_text() == "user's"
    assert (folder / "linked.json").is_symlink()
    assert sorted(p.name for p in folder.iterdir()) == [LEDGER, "linked.json", "mine.json", "theirs.json"]


@pytest.mark.parametrize("link, refusal", [("symlink_to", "cannot write the ledger"),
                                           ("hardlink_to", "not a plain file of its own")])
def test_the_ledger_is_no_link_to_someone_elses_file(tmp_path, link, refusal):
    victim = tmp_path / "elsewhere.txt"
    victim.write_text("precious")
    (tmp_path / "out").mkdir()
    getattr(tmp_path / "out" / LEDGER, link)(victim)
    with pytest.raises(ForeignFileError, match=refusal):
        atomic_write_text(tmp_path / "out" / "a.txt", "x")
    assert victim.read_text() == "precious"


# ---------------------------------------------------------------- export writes only into a folder of its own

def test_export_refuses_a_folder_of_the_users_and_deletes_nothing_there(tmp_path):
    from pipeline.curate.export import ExportConfig, run_export

    layout = _layout(tmp_path)
    _ingest(layout)
    theirs = tmp_path / "mine"
    theirs.mkdir()
    (theirs / "family-photos.tar").write_bytes(b"photos")
    (theirs / "sizes.json").write_text('{"mine": 1}')
    with pytest.raises(ForeignFileError, match=r"refusing to export into .*mine: it holds family-photos.tar and 1 more"):
        run_export(ExportConfig(dataset="synth", stages=(), out=theirs), layout)
    assert sorted(p.name for p in theirs.iterdir()) == ["family-photos.tar", "sizes.json"]
    assert (theirs / "sizes.json").read_text() == '{"mine": 1}'

    empty = tmp_path / "empty"  # an empty folder of the user's is fine, and so is the export's own on a rerun
    empty.mkdir()
    first = run_export(ExportConfig(dataset="synth", stages=(), out=empty, shard_size=4), layout)
    again = run_export(ExportConfig(dataset="synth", stages=(), out=empty, shard_size=5), layout)
    assert first["counts"]["pairs"] == again["counts"]["pairs"] == 12
    assert [p.name for p in list_shards(empty)] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]


def test_export_into_the_base_shards_is_refused_and_they_stay(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.commands.cli import app

    layout = _layout(tmp_path)
    _ingest(layout)
    base = layout.base_dir("synth")
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    for name, value in (("MAT_SHARDS_DIR", layout.shards_dir), ("MAT_MANIFESTS_DIR", layout.manifests_dir),
                        ("MAT_EXPORT_DIR", base), ("MAT_STAGES", "base")):
        monkeypatch.setenv(name, str(value))
    result = CliRunner().invoke(app, ["export", "--dataset", "synth"])
    assert result.exit_code == 2 and f"refusing to export into {base}" in result.output
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before


# ---------------------------------------------------------------- clean removes what the ledgers record, only that

def test_clean_in_a_mixed_folder_removes_the_pipelines_files_and_no_one_elses(tmp_path):
    from pipeline.commands.clean import clean

    root = tmp_path / "project"
    layout = Layout(root, root, root, root)  # every folder pointed at one directory of the user's
    theirs = {"webapp/package.json": "{}", "hf-model/config.json": '{"dataset": "synth"}',
              "hf-model/checkpoints/ckpt.bin": "weights", "hf-model/tensorboard/events.out": "events",
              "x/clip/model.bin": "weights", "synth/notes.json": "{}", "synth/base.json.tmp": "a user's",
              "hf-model/.config.json.abcd1234.tmp": "ours by its name, but no ledger claims this folder"}
    for name, text in theirs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    _ingest(layout)
    leftover = ledger.temp_path(layout.base_dir("synth") / "train-000001.tar")  # a write killed mid-way
    assert (root / "synth" / "base.json").is_file() and list_shards(layout.base_dir("synth"))

    one = clean(layout, "synth")
    assert {name: (root / name).read_text() for name in theirs} == theirs
    assert not layout.base_dir("synth").exists() and not (root / "synth" / "base.json").exists()
    assert leftover in one.removed
    everything = clean(layout)
    assert {name: (root / name).read_text() for name in theirs} == theirs
    assert everything.removed == [] and root / "synth" / "notes.json" in one.kept


def test_a_rerun_removes_the_temporary_file_a_killed_write_left(tmp_path):
    layout = _layout(tmp_path)
    _ingest(layout)
    left = ledger.temp_path(layout.base_dir("synth") / "train-000001.tar")  # as a SIGKILL mid-write leaves it
    left.write_bytes(b"half a tar")
    _ingest(layout)
    assert not left.exists() and not [p for p in layout.base_dir("synth").iterdir() if p.name.endswith(".tmp")]


def test_a_ledger_entry_names_nothing_outside_its_folder(tmp_path):
    from pipeline.commands.clean import clean

    layout = _layout(tmp_path)
    victim = layout.shards_dir / "victim.txt"
    atomic_write_text(layout.dataset_shards("synth") / "sizes.json", "{}")  # SHARDS_DIR/synth/: the pipeline's
    victim.write_text("precious")  # beside it, the user's, which a planted entry tries to reach
    with open(layout.dataset_shards("synth") / LEDGER, "a") as handle:
        handle.write('{"wrote": "../victim.txt", "tree": true}\n{"wrote": ".."}\n')
    clean(layout, "synth")
    assert victim.read_text() == "precious" and not layout.dataset_shards("synth").exists()


def test_a_checkpoint_is_written_through_no_planted_link_and_replaces_no_foreign_folder(tmp_path, tiny_clip):
    import torch

    from pipeline.train import checkpoints

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step-000002.tmp").symlink_to(elsewhere)  # the old fixed temporary name
    optimizer = torch.optim.SGD(tiny_clip.model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def save(step: int) -> Path:
        return checkpoints.save_checkpoint(run, step, tiny_clip, optimizer, scheduler, keep=1,
                                           rng=[checkpoints.rng_state()], data_state={})

    assert save(2) == checkpoints.latest_checkpoint(run) and not any(elsewhere.iterdir())
    assert not (run / "checkpoints" / "step-000002").is_symlink()
    theirs = run / "checkpoints" / "step-000004"  # a folder of the user's under a checkpoint's name
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(ForeignFileError, match="step-000004"):
        save(4)
    assert (theirs / "notes.txt").read_text() == "mine" and (run / "checkpoints" / "step-000002").is_dir()
