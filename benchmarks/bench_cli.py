"""The command line's answer time: `--help` (the app's and `train`'s) and a bad `--set` value refused, each a
fresh `python -m pipeline` process (interpreter start included), best of 3. Target: under 1 s on our CPUs, which
holds while no settings module imports torch (pipeline/core/lazy.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "cli_help_s": ["--help"],
    "cli_train_help_s": ["train", "--help"],
    "cli_bad_setting_s": ["train", "--set", "steps=abc"],
}


def _seconds(argv: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=ROOT, env=env, capture_output=True)
        best = min(best, time.perf_counter() - started)
    return best


def run() -> dict[str, float]:
    return {name: round(_seconds(argv), 3) for name, argv in CASES.items()}
