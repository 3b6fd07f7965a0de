"""DDP on CPU (gloo, 2 processes): the same loss and the same update as one process on the same global batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.models.hf import load_clip
from pipeline.train.config import TrainConfig
from pipeline.train.loop import train_step
from pipeline.train.modes import DualEncoder, build_mode
from pipeline.train.toy import COLOURS

BATCH = 8


def _global_batch() -> dict:
    g = torch.Generator().manual_seed(0)
    names = list(COLOURS)[:BATCH]
    return {"images": torch.rand(BATCH, 3, 32, 32, generator=g), "texts": [f"a {n} square" for n in names]}


def _one_step(clip_dir: str, batch: dict, wrap) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    clip = load_clip(clip_dir)
    mode = build_mode(TrainConfig(mode="ft"), clip)
    net = wrap(DualEncoder(clip).train())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    loss = train_step(net, mode, [batch], bf16=False, device=torch.device("cpu"))["loss"]
    optimizer.step()
    return loss, {k: v.detach().clone() for k, v in clip.model.state_dict().items()}


def _worker(rank: int, world: int, port: int, clip_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        full = _global_batch()
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        local = {"images": full["images"][part], "texts": full["texts"][part]}
        wrap = lambda m: torch.nn.parallel.DistributedDataParallel(m)  # noqa: E731
        loss, state = _one_step(clip_dir, local, wrap)
        torch.save({"loss": loss, "state": state}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process(tiny_model_dirs, tmp_path):
    out = str(tmp_path / "rank")
    mp.spawn(_worker, args=(2, _free_port(), tiny_model_dirs["clip"], out), nprocs=2, join=True)
    single_loss, single_state = _one_step(tiny_model_dirs["clip"], _global_batch(), lambda m: m)
    before = load_clip(tiny_model_dirs["clip"]).model.state_dict()
    for rank in range(2):
        result = torch.load(f"{out}.{rank}", weights_only=False)
        assert result["loss"] == pytest.approx(single_loss, rel=1e-5)
        for name, value in single_state.items():
            torch.testing.assert_close(result["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(before[n], single_state[n]) for n in before)  # the step did change the weights
