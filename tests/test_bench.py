"""`make bench`: the package's own benchmarks only, BENCH selection, one failing benchmark, and the GPU bench
at its tiny size (every figure present and positive, so the real-size script cannot rot)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.commands import bench
from pipeline.commands.cli import app
from pipeline.core.fileio import atomic_write_json
from pipeline.core.provenance import PROVENANCE_KEY

MARKER = "executed-from-cwd"


def _write_bench(folder: Path, name: str, body: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"bench_{name}.py").write_text(body)


def _figures(written: dict) -> dict:
    """The benchmarks' figures, without the run's provenance (tests/test_provenance.py checks it)."""
    assert PROVENANCE_KEY in written
    return {k: v for k, v in written.items() if k != PROVENANCE_KEY}


@pytest.fixture
def package_dir(tmp_path: Path, monkeypatch) -> Path:
    """A stand-in for the package's benchmarks folder, with two cheap benchmarks."""
    folder = tmp_path / "package" / "benchmarks"
    _write_bench(folder, "fake", "from dataclasses import dataclass\n\n@dataclass\nclass C:\n    x: float = 1.5\n\n"
                                 "def run():\n    return {'fake_figure': C().x}\n")
    _write_bench(folder, "other", "def run():\n    return {'other_figure': 2.0}\n")
    _write_bench(folder, "gpu", "def run():\n    return {'gpu_figure': 3.0}\n")
    monkeypatch.setattr(bench, "BENCHMARKS_DIR", folder)
    return folder


def test_bench_runs_the_package_benchmarks_not_those_of_the_current_directory(package_dir, tmp_path, monkeypatch):
    cwd = tmp_path / "elsewhere"
    evil = f"from pathlib import Path\n\ndef run():\n    Path({str(cwd / MARKER)!r}).write_text('ran')\n" \
           "    return {'fake_figure': 666.0}\n"
    _write_bench(cwd / "benchmarks", "fake", evil)
    _write_bench(cwd / "benchmarks", "evil", evil)
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MAT_BENCH", raising=False)
    result = CliRunner().invoke(app, ["bench"], env={"MAT_MANIFESTS_DIR": str(tmp_path / "manifests")})
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "manifests" / "bench.json").read_text())
    assert _figures(figures) == {"fake_figure": 1.5, "other_figure": 2.0}  # gpu runs only when asked for
    assert not (cwd / MARKER).exists()
    named = CliRunner().invoke(app, ["bench"], env={"MAT_MANIFESTS_DIR": str(tmp_path / "manifests"), "MAT_BENCH": "evil"})
    assert named.exit_code != 0 and "evil" in named.output and not (cwd / MARKER).exists()


def test_bench_selects_by_name_and_updates_the_file(package_dir, tmp_path):
    output = tmp_path / "bench.json"
    atomic_write_json(output, {"earlier": 9.0, "other_figure": 0.0})  # an earlier run's (the pipeline's) file
    assert _figures(bench.run_benchmarks(output, "gpu,other")) == {"earlier": 9.0, "other_figure": 2.0, "gpu_figure": 3.0}
    assert json.loads(output.read_text())["gpu_figure"] == 3.0
    assert _figures(bench.run_benchmarks(output)) == {"fake_figure": 1.5, "other_figure": 2.0}  # a full run starts afresh


@pytest.mark.parametrize("only", ["nope", "fake,nope", " , "])
def test_unknown_benchmark_names_are_refused(package_dir, only):
    with pytest.raises(ValueError, match="unknown benchmark"):
        bench.select(bench.available(), only)


def test_a_failing_benchmark_is_recorded_and_threads_are_restored(package_dir, tmp_path):
    _write_bench(package_dir, "broken", "import torch\n\ndef run():\n    torch.set_num_threads(1)\n"
                                        "    raise RuntimeError('boom')\n")
    threads = torch.get_num_threads()
    figures = bench.run_benchmarks(tmp_path / "bench.json", "broken,fake")
    assert _figures(figures) == {"broken_error": "RuntimeError: boom", "fake_figure": 1.5}
    assert torch.get_num_threads() == threads


def test_the_real_benchmarks_folder_is_the_checkout_one():
    names = bench.available()
    assert bench.BENCHMARKS_DIR == Path(__file__).resolve().parents[1] / "benchmarks"
    assert {"gpu", "precision", "eda_randaug", "generative", "train"} <= names.keys()
    assert "gpu" in names and "gpu" not in bench.select(names, None)
    assert "real" in names and "real" not in bench.select(names, None)  # minutes on a CPU: only when named


@pytest.mark.slow
def test_real_bench_runs_the_three_modes_interleaved_at_tiny_size():
    module = bench.load_benchmark("real", bench.available()["real"])
    measured = module.step_seconds("tiny", batch=2, repeats=1)
    assert set(measured["steps"]) == {"ft", "tecoa", "mat"}
    assert all(math.isfinite(s) and s > 0 for s in measured["steps"].values())
    assert measured["timings"]["text_attack_s"] > 0 and measured["timings"]["image_attack_s"] > 0


@pytest.mark.slow
def test_gpu_bench_at_tiny_size_reports_every_figure(monkeypatch):
    monkeypatch.setenv("MAT_GPU_BENCH_SIZE", "tiny")
    module = bench.load_benchmark("gpu", bench.available()["gpu"])
    figures = module.run()
    expected = set(module.expected_figures())
    assert expected <= figures.keys(), sorted(expected - figures.keys())
    numbers = {k: v for k, v in figures.items() if k in expected}
    bad = {k: v for k, v in numbers.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)}
    assert not bad, bad
    assert figures["gpu_bench_size"] == "tiny" and figures["gpu_device"]
