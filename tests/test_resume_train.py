"""Resuming training: the same weights as an uninterrupted run, and a state.pt that cannot run code.

A run is interrupted right after its step-3 checkpoint (an exception raised by the checkpoint hook), resumed
from that checkpoint, and compared tensor by tensor with a run of the same 6 steps that never stopped. MAT draws
random numbers in training (PGD's random start) and the loader shuffles, so a resume that restored only the step,
or reseeded the data stream, gives other weights.
"""

from __future__ import annotations

import dataclasses
import json
import random
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.core.paths import Layout
from pipeline.train import checkpoints
from pipeline.train.config import DataConfig, OptimConfig, TrainConfig
from pipeline.train.main import train
from pipeline.train.toy import write_toy_shards


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Layout:
    root = tmp_path_factory.mktemp("resume")
    write_toy_shards(root / "shards", "toy", shards=2, per_shard=16, text_stage="i2t-human")
    return Layout(shards_dir=root / "shards", runs_dir=root / "runs", models_dir=root / "models",
                  manifests_dir=root / "manifests")


def _cfg(tiny_model_dirs, run_dir: Path, **changes) -> TrainConfig:
    base = TrainConfig(mode="mat", dataset="toy", clip=tiny_model_dirs["clip"], mlm=tiny_model_dirs["mlm"], steps=6,
                       batch_size=8, log_every=1, save_every=3, precision="fp32", run_dir=str(run_dir),
                       optim=OptimConfig(lr=1e-3, warmup=2), data=DataConfig(num_workers=0, shuffle_buffer=8))
    return dataclasses.replace(base, **changes)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "clip" / "model.safetensors"))


class Interrupted(Exception):
    pass


def _train_interrupted(cfg: TrainConfig, layout: Layout, at_step: int, monkeypatch) -> None:
    """Train until the checkpoint of `at_step` is written, then stop as a crash would."""
    real_save = checkpoints.save_checkpoint

    def save_then_stop(run_dir, step, *args, **kwargs):
        path = real_save(run_dir, step, *args, **kwargs)
        if step == at_step:
            raise Interrupted(step)
        return path

    with monkeypatch.context() as patch:
        patch.setattr(checkpoints, "save_checkpoint", save_then_stop)
        with pytest.raises(Interrupted):
            train(cfg, layout)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_run_has_the_weights_of_an_uninterrupted_one(tiny_model_dirs, layout, tmp_path, monkeypatch, workers):
    data = DataConfig(num_workers=workers, shuffle_buffer=8)
    whole = train(_cfg(tiny_model_dirs, tmp_path / "whole", data=data), layout)
    _train_interrupted(_cfg(tiny_model_dirs, tmp_path / "split", data=data), layout, 3, monkeypatch)
    assert not (tmp_path / "split" / "clip").exists()
    resumed = train(_cfg(tiny_model_dirs, tmp_path / "split", data=data), layout)
    assert (whole.start_step, resumed.start_step) == (0, 3)
    _assert_same(_weights(tmp_path / "whole"), _weights(tmp_path / "split"))
    # The comparison is sensitive: another seed gives other weights.
    other = train(_cfg(tiny_model_dirs, tmp_path / "other", data=data, seed=1), layout)
    assert not all(torch.equal(a, b) for a, b in zip(_weights(whole.run_dir).values(), _weights(other.run_dir).values()))


def test_checkpoint_holds_random_states_and_data_position(tiny_model_dirs, layout, tmp_path):
    train(_cfg(tiny_model_dirs, tmp_path / "run", mode="ft", steps=4, save_every=2, accum_steps=2), layout)
    state = checkpoints.read_state(checkpoints.latest_checkpoint(tmp_path / "run"))
    assert state["step"] == 4 and state["data"] == {"seed": 0, "batches": 8}
    assert len(state["rng"]) == 1  # one entry per rank
    rng = state["rng"][0]
    assert set(rng) == {"torch", "cuda", "numpy", "python"}
    assert rng["numpy"]["keys"].shape == (624,) and len(rng["python"]["internal"]) == 625
    before = checkpoints.rng_state()
    draws = torch.rand(3), np.random.rand(), random.random()
    checkpoints.set_rng_state(before)
    again = torch.rand(3), np.random.rand(), random.random()
    assert torch.equal(draws[0], again[0]) and draws[1:] == again[1:]


def test_a_half_written_checkpoint_is_never_resumed(tmp_path):
    done = checkpoints.checkpoint_dir(tmp_path, 2)
    half = checkpoints.checkpoint_dir(tmp_path, 4).with_name("step-000004.tmp")
    for folder in (done, half):
        folder.mkdir(parents=True)
        (folder / "state.pt").write_bytes(b"")
    assert checkpoints.latest_checkpoint(tmp_path) == done


class _RunsCode:
    """Unpickling this calls Path.touch on a marker: code that a weights_only load must refuse to run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_state_pt_with_a_pickled_callable_is_refused(tiny_model_dirs, layout, tmp_path):
    run_dir = tmp_path / "shared-run"
    train(_cfg(tiny_model_dirs, run_dir, mode="ft", steps=2, save_every=2), layout)
    latest = checkpoints.latest_checkpoint(run_dir)
    state = torch.load(latest / "state.pt", weights_only=True)
    marker = tmp_path / "code-ran"
    state["payload"] = _RunsCode(marker)
    torch.save(state, latest / "state.pt")
    with pytest.raises(ValueError, match="refusing to load"):
        checkpoints.read_state(latest)
    with pytest.raises(ValueError, match="refusing to load"):  # the same through `make train RUN_DIR=...`
        train(_cfg(tiny_model_dirs, run_dir, mode="ft", steps=4, save_every=2), layout)
    assert not marker.exists()
    # The loader is what refuses it: an unrestricted load would have run the code.
    torch.load(latest / "state.pt", weights_only=False)
    assert marker.exists()


def _ddp_worker(rank: int, world: int, port: int, model_dirs: dict, root: str, run: str, stop_early: bool) -> None:
    """One rank of `train()` under gloo; with stop_early, every rank stops right after the first checkpoint."""
    import pipeline.train.main as train_main

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    layout = Layout(shards_dir=Path(root) / "shards", runs_dir=Path(root) / "runs")
    if stop_early:
        real_barrier = train_main.barrier

        def barrier_then_stop() -> None:  # the first barrier once a checkpoint exists follows that checkpoint
            real_barrier()
            if checkpoints.latest_checkpoint(Path(root) / run) is not None:
                raise Interrupted()

        train_main.barrier = barrier_then_stop
    try:
        train(_cfg(model_dirs, Path(root) / run, mode="tecoa", steps=4, save_every=2, device="cpu",
                   data=DataConfig(num_workers=0, shuffle_buffer=8)), layout)
    except Interrupted:
        pass
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_rank_resume_restores_each_ranks_state(tiny_model_dirs, tmp_path):
    import socket

    import torch.multiprocessing as mp

    def spawn(run: str, stop_early: bool) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_ddp_worker, args=(2, port, tiny_model_dirs, str(tmp_path), run, stop_early), nprocs=2, join=True)

    write_toy_shards(tmp_path / "shards", "toy", shards=2, per_shard=16)
    spawn("whole", False)
    spawn("split", True)
    assert not (tmp_path / "split" / "clip").exists()
    state = checkpoints.read_state(checkpoints.latest_checkpoint(tmp_path / "split"))
    assert state["step"] == 2 and len(state["rng"]) == 2  # one entry per rank, and they differ
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    spawn("split", False)
    _assert_same(_weights(tmp_path / "whole"), _weights(tmp_path / "split"))


# ------------------------------------------------------------------ resuming with other settings (issue 21)


def test_resume_with_other_settings_stops_naming_them_and_keeps_config_json(tiny_model_dirs, layout, tmp_path):
    run_dir = tmp_path / "run"
    train(_cfg(tiny_model_dirs, run_dir, mode="ft", steps=2, save_every=2), layout)
    saved = (run_dir / "config.json").read_text()
    with pytest.raises(ValueError, match=r"optim\.lr: 0\.001 -> 0\.5.*seed: 0 -> 7.*--overwrite"):
        train(_cfg(tiny_model_dirs, run_dir, mode="ft", steps=2, save_every=2, seed=7,
                   optim=OptimConfig(lr=0.5, warmup=2)), layout)
    with pytest.raises(ValueError, match=r"mode: 'ft' -> 'tecoa'"):  # not a torch error about the optimiser state
        train(_cfg(tiny_model_dirs, run_dir, mode="tecoa", steps=4, save_every=2), layout)
    with pytest.raises(ValueError, match=r"steps=1: .* already trained 2 steps"):
        train(_cfg(tiny_model_dirs, run_dir, mode="ft", steps=1, save_every=2), layout)
    assert (run_dir / "config.json").read_text() == saved
    # What does not change the computation may differ: more steps, logging, workers.
    more = train(_cfg(tiny_model_dirs, run_dir, mode="ft", steps=3, save_every=3, log_every=3,
                      data=DataConfig(num_workers=1, shuffle_buffer=8)), layout)
    assert more.start_step == 2
    assert json.loads((run_dir / "config.json").read_text())["steps"] == 3


def test_train_command_refuses_changed_settings_and_overwrite_restarts(tiny_model_dirs, layout, tmp_path):
    from typer.testing import CliRunner

    from pipeline.commands.cli import app

    run_dir = tmp_path / "run"
    train(_cfg(tiny_model_dirs, run_dir, mode="ft", steps=2, save_every=2), layout)
    saved = (run_dir / "config.json").read_text()
    folders = ["--shards-dir", str(layout.shards_dir), "--runs-dir", str(layout.runs_dir)]
    replay = [*folders, "train", "--config", str(run_dir / "config.json")]
    refused = CliRunner().invoke(app, [*replay, "--lr", "0.5", "--seed", "7"])
    assert refused.exit_code == 2
    assert "error: " in refused.output and "optim.lr: 0.001 -> 0.5" in refused.output
    assert (run_dir / "config.json").read_text() == saved
    restarted = CliRunner().invoke(app, [*replay, "--lr", "0.5", "--seed", "7", "--overwrite"])
    assert restarted.exit_code == 0, restarted.output
    assert json.loads((run_dir / "config.json").read_text())["seed"] == 7


def test_overwrite_starts_afresh_removing_only_the_runs_files(tiny_model_dirs, layout, tmp_path):
    run_dir = tmp_path / "run"
    train(_cfg(tiny_model_dirs, run_dir, mode="ft", steps=2, save_every=1), layout)
    (run_dir / "notes.txt").write_text("mine")
    result = train(_cfg(tiny_model_dirs, run_dir, mode="tecoa", steps=1, save_every=1, seed=7), layout, overwrite=True)
    assert result.start_step == 0
    assert [p.name for p in checkpoints.complete_checkpoints(run_dir)] == ["step-000001"]
    assert [row.split(",")[0] for row in (run_dir / "metrics.csv").read_text().splitlines()] == ["step", "1"]
    assert json.loads((run_dir / "config.json").read_text())["mode"] == "tecoa"
    assert (run_dir / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------ unreadable state.pt (issue 21)


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_unreadable_newest_checkpoint_falls_back_to_the_previous(tiny_model_dirs, layout, tmp_path, caplog, damage):
    run_dir = tmp_path / "run"
    train(_cfg(tiny_model_dirs, run_dir, mode="ft", steps=4, save_every=2), layout)
    newest = checkpoints.latest_checkpoint(run_dir) / "state.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    resumed = train(_cfg(tiny_model_dirs, run_dir, mode="ft", steps=6, save_every=2), layout)
    assert resumed.start_step == 2
    assert "step-000004/state.pt is unreadable" in caplog.text and "falling back" in caplog.text


def test_no_readable_checkpoint_is_one_clear_error(tiny_model_dirs, layout, tmp_path):
    run_dir = tmp_path / "run"
    train(_cfg(tiny_model_dirs, run_dir, mode="ft", steps=2, save_every=2), layout)
    (checkpoints.latest_checkpoint(run_dir) / "state.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="no readable checkpoint in .*--overwrite"):
        train(_cfg(tiny_model_dirs, run_dir, mode="ft", steps=4, save_every=2), layout)


# ------------------------------------------------------------------ non-finite loss (issue 21)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_dirs, layout, tmp_path, monkeypatch):
    import pipeline.train.main as train_main

    real_build_mode = train_main.build_mode

    def nan_from_step_5(cfg, clip, mlm):
        mode = real_build_mode(cfg, clip, mlm)
        calls = iter(range(1, 10**6))

        class Poisoned(type(mode)):
            def __call__(self, net, batch):
                terms = super().__call__(net, batch)
                return {k: v * float("nan") for k, v in terms.items()} if next(calls) >= 5 else terms

        mode.__class__ = Poisoned
        return mode

    monkeypatch.setattr(train_main, "build_mode", nan_from_step_5)
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"step 5: the loss became non-finite"):
        train(_cfg(tiny_model_dirs, run_dir, mode="ft", steps=6, save_every=1, keep_checkpoints=5), layout)
    assert [p.name for p in checkpoints.complete_checkpoints(run_dir)][-1] == "step-000004"
    assert not (run_dir / "clip").exists()
    for checkpoint in checkpoints.complete_checkpoints(run_dir):
        weights = load_file(str(checkpoint / "clip" / "model.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values()), checkpoint
