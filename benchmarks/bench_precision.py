"""What precision "auto" picks on this machine, and whether it is the faster one.

* ``precision_auto_over_best``: the FT train step time at the precision ``resolve_precision("auto", "cpu")``
  picks, over the faster of the bf16 and fp32 steps (target <= 1.05). Small CLIP (the demo's preset, random
  init), batch 128 as the demo trains, 64 px, one thread, process CPU time, best of ``repeats`` interleaved steps.
* ``precision_auto``, ``precision_cpu_capability`` (torch's ``get_cpu_capability()``), ``precision_cpu``:
  the choice and what it was made from.
* ``precision_matmul_bf16_over_fp32``: a 512 x 512 matmul's time in bf16 over fp32 (below 1 where bf16 is
  native, about 40 on an AVX2-only CPU).
* ``precision_avx2_*``: the same matmul ratio, capability and choice in a subprocess with
  ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``, which limits PyTorch's and oneDNN's kernels to AVX2 on a
  newer CPU: it shows whether "auto" follows those variables (it must pick fp32 there).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.models.device import cpu_info, resolve_precision
from pipeline.models.hf import build_clip, train_tokenizers
from pipeline.data.sources.synth import captions_for, sample_params
from pipeline.train.config import TrainConfig
from pipeline.train.loop import train_step
from pipeline.train.modes import DualEncoder, build_mode

BATCH = 128  # the demo's training batch (bench_train.py's too)
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def matmul_figures(size: int = 512, repeats: int = 10) -> dict[str, float | str]:
    """bf16 / fp32 matmul time, torch's CPU capability and auto's choice in this process."""
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            started = time.process_time()
            a @ b
            best = min(best, time.process_time() - started)
        times[dtype] = max(best, 1e-9)
    return {"matmul_bf16_over_fp32": round(times[torch.bfloat16] / times[torch.float32], 2),
            "matmul_fp32_ms": round(1e3 * times[torch.float32], 3),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "auto": resolve_precision("auto", "cpu")}


def _avx2_figures() -> dict[str, float | str]:
    code = ("import json, torch; torch.set_num_threads(1); import bench_precision as b; "
            "print(json.dumps(b.matmul_figures()))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **AVX2_ENV}, cwd=Path(__file__).parent,
                          capture_output=True, text=True, timeout=600, check=True)
    return {f"precision_avx2_{k}": v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def _step_seconds(repeats: int) -> dict[str, float]:
    rng = random.Random(0)
    captions = [captions_for(sample_params(rng), seed=i)[0] for i in range(BATCH)]
    clip = build_clip("small", train_tokenizers(captions, 300)[0])
    net = DualEncoder(clip).train()
    mode = build_mode(TrainConfig(mode="ft"), clip)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5)
    batch = {"images": torch.rand(BATCH, 3, clip.image_size, clip.image_size), "texts": captions}
    best = {"bf16": float("inf"), "fp32": float("inf")}
    for index in range(repeats + 1):
        for precision in best:
            started = time.process_time()
            optimizer.zero_grad(set_to_none=True)
            train_step(net, mode, [batch], precision == "bf16", torch.device("cpu"))
            optimizer.step()
            if index:  # the first round warms up allocators and kernels
                best[precision] = min(best[precision], time.process_time() - started)
    return best




def run(repeats: int = 3) -> dict[str, float | str]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    steps = _step_seconds(repeats)
    here = matmul_figures()
    return {
        "precision_auto_over_best": round(steps[here["auto"]] / min(steps.values()), 3),
        "precision_auto": here["auto"],
        "precision_cpu": cpu_info().get("model name", "unknown"),
        "precision_cpu_capability": here["cpu_capability"],
        "precision_bf16_step_cpu_s": round(steps["bf16"], 3),
        "precision_fp32_step_cpu_s": round(steps["fp32"], 3),
        "precision_matmul_bf16_over_fp32": here["matmul_bf16_over_fp32"],
        **_avx2_figures(),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
