"""Real-size training cost ratios on the CPU at hand (`make bench BENCH=real`; on request only: minutes on a CPU).

CLIP ViT-B/16 (224 px, 77-token text tower) and a bert-base masked LM, built from their configs with random
weights exactly as `bench_gpu.py` builds them (its ``SIZES["real"]`` and ``_models``), batch 8, fp32 (the
CPU this was written on has no bf16 instructions; the ratios are of fp32 steps everywhere). One training step
of each of the pipeline's own modes FT, TeCoA and MAT (``build_mode`` with the training defaults of
``pipeline/train/config.py``: 2-step PGD at eps 2/255, the reference BERT-Attack, text first), through
``pipeline.train.loop.train_step`` plus the optimiser step, as `bench_train.py` times the small model's ratios:
process CPU seconds (the machine is shared: wall time mostly measures neighbours), the steps of the three modes
interleaved round by round in ONE run, the first round a warm-up, the best of ``repeats`` rounds per mode.

* ``real_tecoa_over_ft_step``, ``real_mat_over_ft_step``, ``real_mat_over_tecoa_step`` (target <= 1.15);
* ``real_text_attack_share``: the text attack's share of MAT's step (its own clock, ``Mode.timings``), and
  ``real_image_attack_share`` the PGD's;
* ``real_{ft,tecoa,mat}_step_cpu_s``.

Random weights decide nothing about cost except in the text attack, whose work depends on which candidates
the masked LM proposes and whether they lower the similarity: a random bert-base proposes its top-10 tokens
everywhere (mostly ``[unusedN]``, all above the 0.3 logit threshold), and a random CLIP finds a better candidate
for about half the words it visits, so the walk is about as long as on trained models. The figure is the
attack's cost at real size, not a prediction of a trained pair's exact share.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from pipeline.commands.bench import load_benchmark
from pipeline.train.config import TrainConfig
from pipeline.train.loop import train_step
from pipeline.train.modes import DualEncoder, build_mode

log = logging.getLogger(__name__)

MODES = ("ft", "tecoa", "mat")
BATCH = 8


def bench_gpu() -> ModuleType:
    """The sibling `bench_gpu.py` (its sizes and model builders), loaded as `make bench` loads benchmarks."""
    path = Path(__file__).with_name("bench_gpu.py")
    loaded = sys.modules.get("_mat_benchmarks.bench_gpu")
    if loaded is None or Path(getattr(loaded, "__file__", "")) != path:  # not another folder's bench_gpu
        loaded = load_benchmark("gpu", path)
    return loaded


def step_seconds(size: str = "real", batch: int = BATCH, repeats: int = 3) -> dict[str, Any]:
    """Best process-CPU seconds per step of each mode, interleaved, and MAT's attack timings at its best step."""
    gpu = bench_gpu()
    device = torch.device("cpu")
    torch.manual_seed(0)
    clip, mlm = gpu._models(gpu.SIZES[size], device)
    captions = gpu._captions(batch)
    images = torch.rand(batch, 3, clip.image_size, clip.image_size)
    net = DualEncoder(clip).train()
    modes = {name: build_mode(TrainConfig(mode=name), clip, mlm) for name in MODES}
    trainable = {}
    for name, mode in modes.items():  # what each mode trains, recorded once: the modes share one model
        for param in net.parameters():
            param.requires_grad_(True)
        mode.prepare(clip.model)
        mode.clock = time.process_time
        trainable[name] = [p.requires_grad for p in net.parameters()]
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5)  # parameters without a gradient are skipped
    best = {name: float("inf") for name in MODES}
    timings: dict[str, float] = {}
    for index in range(repeats + 1):
        for name, mode in modes.items():
            for param, flag in zip(net.parameters(), trainable[name]):
                param.requires_grad_(flag)
            start = time.process_time()
            optimizer.zero_grad(set_to_none=True)
            row = train_step(net, mode, [{"images": images, "texts": captions}], bf16=False, device=device)
            optimizer.step()
            seconds = time.process_time() - start
            log.info("real bench round %d/%d: %s step %.1f CPU s %s", index, repeats, name, seconds,
                     {k: round(v, 1) for k, v in row.items() if k.endswith("_s")})
            if index and seconds < best[name]:  # the first round warms up allocators and tokenizer caches
                best[name] = seconds
                if name == "mat":
                    timings = {k: v for k, v in row.items() if k.endswith("_s")}
    return {"steps": best, "timings": timings}


def run(repeats: int = 3) -> dict[str, float]:
    measured = step_seconds(repeats=repeats)
    ft, tecoa, mat = (measured["steps"][name] for name in MODES)
    timings = measured["timings"]
    return {
        "real_tecoa_over_ft_step": tecoa / ft,
        "real_mat_over_ft_step": mat / ft,
        "real_mat_over_tecoa_step": mat / tecoa,
        "real_text_attack_share": timings.get("text_attack_s", 0.0) / mat,
        "real_image_attack_share": timings.get("image_attack_s", 0.0) / mat,
        "real_ft_step_cpu_s": ft,
        "real_tecoa_step_cpu_s": tecoa,
        "real_mat_step_cpu_s": mat,
        "real_batch": float(BATCH),
        "real_cpu_threads": float(torch.get_num_threads()),
    }


if __name__ == "__main__":
    import json

    logging.basicConfig(level=logging.INFO)
    print(json.dumps(run(), indent=1))
