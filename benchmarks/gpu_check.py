"""`make gpu-check`: the checks a lent GPU is for, as one prepared run (planned to fit 10 minutes on one H100).

On a machine without CUDA it says so in one line and exits 0 (CI runs that path). On CUDA it runs, each in its own
process with its own time limit, in a new work folder:

1. ``bench_gpu``: the real-size benchmark on CUDA (``make bench BENCH=gpu``: bf16 training steps, fp32 evaluation
   attacks, peak memory, largest batch);
2. ``smoke_real``: every user command once at real model sizes (``make smoke-real``), the generative stages with
   real-size random weights included;
3. ``demo``: the demo's study on synth (``make demo``; ``DEVICE`` is ``auto`` there, so CUDA).

Every figure goes into one JSON (``--out``, default ``MANIFESTS_DIR/gpu_check.json``): per step its exit code,
seconds and whether it hit its limit, with the step's own figures (bench.json, smoke_real.json, the study's claims).
This is the format the README's GPU table is filled from. Exit 1 when a step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.core.fileio import atomic_write_json
from pipeline.core.ledger import make_dirs

BENCHMARKS = Path(__file__).resolve().parent
BUDGET_S = 600


def plan(work: Path) -> list[dict[str, Any]]:
    """The steps: name, command, the environment they add, their time limit and the file holding their figures."""
    python, manifests = sys.executable, work / "manifests"
    folders = {"MAT_MANIFESTS_DIR": str(manifests), "MAT_SHARDS_DIR": str(work / "shards"),
               "MAT_RUNS_DIR": str(work / "runs"), "MAT_MODELS_DIR": str(work / "models")}
    return [
        {"name": "bench_gpu", "argv": [python, "-m", "pipeline", "bench"], "timeout_s": 180,
         "env": {**folders, "MAT_BENCH": "gpu", "MAT_GPU_BENCH_SIZE": "real", "MAT_DEVICE": "cuda"},
         "figures": manifests / "bench.json"},
        {"name": "smoke_real", "argv": [python, str(BENCHMARKS / "smoke_real.py"), "--dir", str(work / "smoke"),
                                        "--out", str(manifests / "smoke_real.json")], "timeout_s": 180,
         "env": folders, "figures": manifests / "smoke_real.json"},
        {"name": "demo", "argv": [python, "-m", "pipeline", "demo"], "timeout_s": 210,
         "env": folders, "figures": manifests / "synth" / "study" / "report.json"},
    ]


def _device_line() -> str | None:
    """None on CUDA; otherwise the one line saying there is nothing to check here."""
    import torch

    if torch.cuda.is_available():
        return None
    return (f"gpu-check: no CUDA device here (torch {torch.__version__}, CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}); nothing to check: run it on a GPU node")


def run_step(step: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        code = subprocess.run(step["argv"], env={**os.environ, **step["env"]}, timeout=step["timeout_s"]).returncode
        timed_out = False
    except subprocess.TimeoutExpired:
        code, timed_out = None, True
    row: dict[str, Any] = {"exit_code": code, "timed_out": timed_out, "seconds": round(time.perf_counter() - started, 1)}
    if step["figures"].is_file():
        row["figures"] = json.loads(step["figures"].read_text())
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="the JSON of every figure (default MANIFESTS_DIR/gpu_check.json)")
    parser.add_argument("--plan", action="store_true", help="print the steps as JSON and exit")
    args = parser.parse_args(argv)
    if args.plan:
        steps = plan(Path("<work>"))
        print(json.dumps([{**s, "figures": str(s["figures"])} for s in steps], indent=1))
        return 0
    line = _device_line()
    if line is not None:
        print(line)
        return 0
    work = Path(tempfile.mkdtemp(prefix="mat-gpu-check-"))  # kept: the runs and shards are worth a look
    results = {step["name"]: run_step(step) for step in plan(work)}
    out = args.out or Path(os.environ.get("MAT_MANIFESTS_DIR", "manifests")) / "gpu_check.json"
    make_dirs(out.parent)
    atomic_write_json(out, {"work": str(work), "steps": results})
    for name, row in results.items():
        state = "timed out" if row["timed_out"] else f"exit {row['exit_code']}"
        print(f"{name:<12} {row['seconds']:7.1f} s  {state}")
    print(f"written: {out}")
    return 0 if all(row["exit_code"] == 0 for row in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
