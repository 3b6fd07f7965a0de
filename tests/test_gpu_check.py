"""`make gpu-check` (benchmarks/gpu_check.py): its CPU path, and a plan that fits the budget and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "g.json")],
                         cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(out.stdout.strip().splitlines()) == 1 and "no CUDA device here" in out.stdout
    assert not (tmp_path / "g.json").exists()


def test_the_plan_fits_the_budget_and_its_commands_parse(tmp_path):
    from pipeline.commands.cli import app

    steps = gpu_check.plan(tmp_path)
    assert sum(step["timeout_s"] for step in steps) <= gpu_check.BUDGET_S
    assert [step["name"] for step in steps] == ["bench_gpu", "smoke_real", "demo"]
    group = typer.main.get_command(app)
    for step in steps:
        argv = step["argv"]
        if argv[1:3] == ["-m", "pipeline"]:
            command = group.commands[argv[3]]
            known = {p.envvar for p in [*command.params, *group.params] if p.envvar}
            own = {"MAT_GPU_BENCH_SIZE", "MAT_DEVICE"} if step["name"] == "bench_gpu" else set()  # bench_gpu reads these
            assert set(step["env"]) - own <= known, step["name"]
            command.make_context(argv[3], argv[4:])


def test_a_step_records_its_figures_exit_and_time_limit(tmp_path):
    figures = tmp_path / "f.json"
    write = {"name": "w", "argv": [sys.executable, "-c", f"open({str(figures)!r}, 'w').write('{{\"x\": 1}}')"],
             "env": {}, "timeout_s": 60, "figures": figures}
    row = gpu_check.run_step(write)
    assert row["exit_code"] == 0 and not row["timed_out"] and row["figures"] == {"x": 1}
    slow = {"name": "s", "argv": [sys.executable, "-c", "import time; time.sleep(30)"], "env": {}, "timeout_s": 1,
            "figures": tmp_path / "none.json"}
    row = gpu_check.run_step(slow)
    assert row["timed_out"] and row["exit_code"] is None and "figures" not in row


def test_plan_prints_json():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--plan"], capture_output=True,
                         text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and [s["name"] for s in json.loads(out.stdout)] == ["bench_gpu", "smoke_real", "demo"]
