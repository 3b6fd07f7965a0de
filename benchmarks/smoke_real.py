"""`make smoke-real`: the user's own commands once at real model sizes on a CPU, to find what breaks there.

The real-size architectures are built from their configs with random weights exactly as `bench_gpu.py` builds
them (its ``SIZES["real"]``: CLIP ViT-B/16 at 224 px with the 77-token text tower, a bert-base masked LM,
SD 1.5's UNet + VAE + text encoder, InternVL3-1B), saved to a temporary models folder, and every command then
runs as a user runs it (``python -m pipeline <command> ...``, one subprocess each, so each has its own peak
resident set) on a tiny synth dataset:

1. ``ingest`` (``--synth-size 24``, half of it test images) and ``augment`` of MAT+'s stages (i2t-human, randaug) for training;
2. ``train`` of every mode (ft, tecoa, fare, mat, matplus on i2t-human + randaug), 2 steps at batch 2, fp32;
3. ``eval`` of the MAT run under every attack at the evaluation defaults on 4 test images;
4. ``eval-zeroshot`` on 4 synth images (one eps, 10 PGD / APGD steps: the defaults' 100 steps at three
   budgets are an hour here and exercise no other code);
5. ``augment`` of the CPU stages on a 2-image dataset (scored by the real CLIP), then the generative stages
   on it: ``t2i-sd`` at 512 px with 2 denoising steps and ``i2t-internvl`` (transformers backend, 8 new
   tokens), each only when enough memory is available (the reason is printed otherwise);
6. ``study`` with 1 step per cell on 4 test images, from the plan to the report (no N:N cells).

It prints each command's wall time and peak RSS and writes them to a JSON file (``--out``, default
``MANIFESTS_DIR/smoke_real.json``); the temporary work folder is removed unless ``--keep``. Exit 1 when a command failed.
About two hours on 2 cores, the study half of it; ``--only train,eval`` runs a subset (the models and the data are
always made); ``--size tiny`` runs it all with bench_gpu's tiny models, to check the script itself in minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.core.fileio import atomic_write_json
from pipeline.core.ledger import make_dirs

BENCHMARKS = Path(__file__).resolve().parent
DATASET, AUG_DATASET = "smoke", "smoke2"
MODES = ("ft", "tecoa", "fare", "mat", "matplus")
MATPLUS_STAGES = "i2t-human,randaug"
# GiB that must be available (MemAvailable) before a generative stage starts: its fp32 weights (SD 1.5: 4.3 GB;
# InternVL3-1B: 3.2 GB), the loading copy and the activations at 512 px / 448 px, with room to spare.
GENERATIVE_MEMORY_GB = {"t2i-sd": 10.0, "i2t-internvl": 8.0}


def _available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def _cpu() -> str:
    import torch

    from pipeline.models.device import cpu_info

    model = cpu_info().get("model name") or platform.processor()
    return f"{model} ({torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores)"


def build(what: str, models: Path, size_name: str = "real") -> None:
    """Build and save the models of bench_gpu's size `size_name` (run in a subprocess of its own: its memory is
    returned at exit)."""
    import torch

    from pipeline.commands.bench import load_benchmark

    gpu = load_benchmark("gpu", BENCHMARKS / "bench_gpu.py")
    size = gpu.SIZES[size_name]
    done = {"clip-mlm": models / DATASET / "mlm", "sd": models / "sd", "internvl": models / "internvl"}.get(what)
    if done is not None and ((done / "config.json").exists() or (done / "model_index.json").exists()):
        return  # built by an earlier run into the same --dir
    torch.manual_seed(0)
    if what == "clip-mlm":
        clip, mlm = gpu._models(size, torch.device("cpu"))
        clip.save(models / DATASET / "clip")
        mlm.save(models / DATASET / "mlm")
    elif what == "sd":
        gpu._save_sd(size["sd"], models / "sd")
    elif what == "internvl":
        gpu._save_internvl(size["internvl"], models)
    else:
        raise ValueError(f"build {what!r}: clip-mlm, sd or internvl")


class Runner:
    """Runs each command in a subprocess and records its exit code, wall seconds and peak resident set."""

    def __init__(self, root: Path):
        self.root = root
        self.results: dict[str, dict[str, Any]] = {}
        self.folders = ["--shards-dir", str(root / "shards"), "--manifests-dir", str(root / "manifests"),
                        "--runs-dir", str(root / "runs"), "--models-dir", str(root / "models")]

    def __call__(self, name: str, argv: list[str], cli: bool = True) -> bool:
        command = [sys.executable, "-m", "pipeline", *self.folders, *argv] if cli else [sys.executable, *argv]
        shown = " ".join(argv if cli else argv[1:])
        print(f"== {name}: {'mat-pipeline ' if cli else ''}{shown}", flush=True)
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(log, "w") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        peak_gb = usage.ru_maxrss / 2**20  # KiB on Linux
        self.results[name] = {"exit_code": process.returncode, "seconds": round(seconds, 1),
                              "peak_rss_gb": round(peak_gb, 2), "argv": argv}
        status_text = "ok" if process.returncode == 0 else f"FAILED (exit {process.returncode}; log {log})"
        print(f"   {status_text}: {seconds:.1f} s, peak RSS {peak_gb:.2f} GiB", flush=True)
        if process.returncode:
            print("   " + "\n   ".join(log.read_text().splitlines()[-15:]), flush=True)
        return process.returncode == 0

    def skip(self, name: str, reason: str) -> None:
        print(f"== {name}: skipped ({reason})", flush=True)
        self.results[name] = {"skipped": reason}


def smoke(root: Path, only: set[str] | None = None, generative: bool = True, size: str = "real") -> dict[str, Any]:
    run = Runner(root)
    models = root / "models"
    clip, mlm = str(models / DATASET / "clip"), str(models / DATASET / "mlm")
    wanted = lambda group: only is None or group in only  # noqa: E731
    fp32 = ["--precision", "fp32", "--report-to", "none"]

    built = ["--models", str(models), "--size", size]
    run("build-clip-mlm", [__file__, "--build", "clip-mlm", *built], cli=False)
    run("ingest", ["ingest", "--dataset", DATASET, "--format", "synth", "--synth-size", "24",
                   "--split-fractions", "0.5,0,0.5", "--workers", "1"])  # the default 0.8,0.1,0.1 leaves 1 test image
    if wanted("train") or wanted("study"):
        run("augment-matplus", ["augment", "--dataset", DATASET, "--stages", MATPLUS_STAGES, "--scorer", clip,
                                "--workers", "1"])
    if wanted("train") or wanted("eval"):
        for mode in MODES:
            stages = ["--stages", MATPLUS_STAGES] if mode == "matplus" else []
            run(f"train-{mode}", ["train", "--dataset", DATASET, "--mode", mode, "--clip", clip, "--mlm", mlm,
                                  "--steps", "2", "--batch-size", "2", "--data-workers", "0", "--log-every", "1",
                                  "--save-every", "2", "--run-dir", str(root / "runs" / mode), *stages, *fp32])
    if wanted("eval"):
        run("eval", ["eval", "--dataset", DATASET, "--ckpt", str(root / "runs" / "mat"), "--mlm", mlm,
                     "--size", "4", "--batch-size", "4", "--report-to", "none"])
    if wanted("eval-zeroshot"):
        run("eval-zeroshot", ["eval-zeroshot", "--dataset", DATASET, "--ckpt", clip, "--labels", "shape",
                              "--synth-images", "4", "--eps", "2", "--pgd-steps", "10", "--apgd-steps", "10",
                              "--batch-size", "4"])
    if wanted("augment"):
        run("augment-cpu", ["augment", "--dataset", AUG_DATASET, "--format", "synth", "--synth-size", "2",
                            "--split-fractions", "1,0,0", "--stages", "i2t-human,eda,randaug", "--scorer", clip, "--workers", "1"])
    if wanted("generative"):
        if not generative:
            for stage in GENERATIVE_MEMORY_GB:
                run.skip(f"augment-{stage}", "--no-generative")
        for stage, build_name, extra in (
            ("t2i-sd", "sd", ["--t2i-model", str(models / "sd"), "--set", "t2i-sd.steps=2", "--set",
                              "t2i-sd.height=512", "--set", "t2i-sd.width=512", "--set", "t2i-sd.safety_checker=false",
                              "--set", "t2i-sd.batch_size=2"]),
            ("i2t-internvl", "internvl", ["--i2t-model", str(models / "internvl"), "--set",
                                          "i2t-internvl.backend=transformers", "--set",
                                          "i2t-internvl.max_new_tokens=8", "--set", "i2t-internvl.min_words=1",
                                          "--set", "i2t-internvl.batch_size=2"]),
        ):
            if not generative:
                break
            available = _available_gb()
            if available < GENERATIVE_MEMORY_GB[stage]:
                run.skip(f"augment-{stage}", f"{available:.1f} GiB available, {GENERATIVE_MEMORY_GB[stage]:.0f} "
                                             f"GiB wanted")
                continue
            if run(f"build-{build_name}", [__file__, "--build", build_name, *built], cli=False):
                run(f"augment-{stage}", ["augment", "--dataset", AUG_DATASET, "--format", "synth", "--synth-size", "2",
                                         "--split-fractions", "1,0,0", "--stages", stage, "--scorer", clip,
                                         "--workers", "1", *extra])
    if wanted("study"):
        run("study", ["study", "--dataset", DATASET, "--clip", clip, "--mlm", mlm, "--steps", "1", "--batch-size", "2",
                      "--eval-size", "4", "--eval-batch", "4", "--precision", "fp32", "--combos", "none",
                      "--workers", "1", "--data-workers", "0", "--resamples", "100"])
    return run.results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON of the results (default: MANIFESTS_DIR/smoke_real.json)")
    parser.add_argument("--dir", type=Path, help="Work folder (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="Keep the work folder")
    parser.add_argument("--only", help="Comma-separated groups: train, eval, eval-zeroshot, augment, generative, study")
    parser.add_argument("--no-generative", action="store_true", help="Skip the generative stages")
    parser.add_argument("--size", choices=("real", "tiny"), default="real",
                        help="Model sizes (bench_gpu's SIZES): real, or tiny to check the script itself in seconds")
    parser.add_argument("--build", help=argparse.SUPPRESS)
    parser.add_argument("--models", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        build(args.build, args.models, args.size)
        return 0
    root = args.dir or Path(tempfile.mkdtemp(prefix="mat-smoke-real-"))
    only = {g.strip() for g in args.only.split(",") if g.strip()} if args.only else None
    started = time.perf_counter()
    try:
        results = smoke(root, only, generative=not args.no_generative, size=args.size)
        summary = {"cpu": _cpu(), "torch_threads": _threads(), "size": args.size,
                   "total_seconds": round(time.perf_counter() - started, 1), "commands": results}
        out = args.out or Path(os.environ.get("MAT_MANIFESTS_DIR", "manifests")) / "smoke_real.json"
        make_dirs(out.parent)
        atomic_write_json(out, summary)  # through the ledger: a smoke_real.json the pipeline did not write stays
        print(f"\n{'command':<24} {'s':>8} {'peak GiB':>9}")
        for name, row in results.items():
            if "skipped" in row:
                print(f"{name:<24} skipped: {row['skipped']}")
            else:
                print(f"{name:<24} {row['seconds']:8.1f} {row['peak_rss_gb']:9.2f}"
                      + ("" if row["exit_code"] == 0 else f"  FAILED (exit {row['exit_code']})"))
        print(f"written: {out}")
        return 1 if any(row.get("exit_code") for row in results.values()) else 0
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
