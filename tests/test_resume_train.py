"""Resuming training: the same weights as an uninterrupted run, and a state.pt that cannot run code.

A run is interrupted right after its step-3 checkpoint (an exception raised by the checkpoint hook), resumed
from that checkpoint, and compared tensor by tensor with a run of the same 6 steps that never stopped. MAT draws
random numbers in training (PGD's random start) and the loader shuffles, so a resume that restored only the step,
or reseeded the data stream, gives other weights.
"""

from __future__ import annotations

import dataclasses
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

        def barrier_then_stop() -> None:  # the first barrier follows the first checkpoint
            real_barrier()
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
