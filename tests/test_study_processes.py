"""`make study STUDY_PARALLEL=2`: units in worker processes give the in-process results at the same thread count;
a failed unit is reported, fails the study, blocks its evaluation, and a rerun redoes only what is missing."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from conftest import tiny_study
from pipeline.core.paths import Layout
from pipeline.study.compare import differences
from pipeline.study.failures import UnitsFailed
from pipeline.study.plan import StudyConfig


def test_units_in_worker_processes_give_the_in_process_results(tmp_path, tiny_model_dirs, monkeypatch):
    import torch

    threads = torch.get_num_threads()
    try:
        here = tiny_study(tmp_path / "here", tiny_model_dirs, monkeypatch, parallel=1, unit_threads=1)
        assert torch.get_num_threads() == 1  # UNIT_THREADS holds in this process too
    finally:
        torch.set_num_threads(threads)
    workers = tiny_study(tmp_path / "workers", tiny_model_dirs, monkeypatch, parallel=2, unit_threads=1)

    study = Path("manifests/toy/study")
    report = json.loads((workers / study / "report.json").read_text())
    assert {(r["cell"], r["seed"]) for r in report["records"]} == {("pretrained", 0), ("ft", 0), ("tecoa", 0)}
    assert differences(json.loads((here / study / "report.json").read_text()), report) == []
    results = {str(p.relative_to(here)): p for pattern in ("manifests/toy/evals/*.json", "manifests/toy/study/units/*.json")
               for p in sorted(here.glob(pattern))}
    assert len(results) == 3 + 5
    for name, path in results.items():
        assert differences(json.loads(path.read_text()), json.loads((workers / name).read_text())) == [], name
    models = {str(p.relative_to(here)): p for p in sorted(here.glob("runs/study-toy/*/clip/*"))}
    assert len({Path(n).parts[2] for n in models}) == 2
    assert {n: p.read_bytes() for n, p in models.items()} == {n: (workers / n).read_bytes() for n in models}


# ------------------------------------------------------------------ a failed unit (functions the workers import)


def _write(path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("made\n")


def _evaluate(model: str, path: str) -> None:
    if not Path(model).is_file():
        raise RuntimeError("evaluated before its training ended")
    _write(path)


def _planted_failure() -> None:
    raise RuntimeError("planted failure")


def test_a_failed_unit_fails_the_study_and_a_rerun_redoes_only_it(tmp_path):
    from pipeline.study.process_units import run_plan_processes
    from pipeline.study.run import PlanRunner, Unit

    layout = Layout(tmp_path / "shards", tmp_path / "manifests", tmp_path / "runs", tmp_path / "models")
    out = {name: tmp_path / "runs" / name / "clip" for name in ("a", "b")}
    evals = {name: tmp_path / f"eval-{name}.json" for name in ("a", "b")}

    def units(b_fails: bool) -> list[Unit]:
        return [Unit("train-a", "train", {"seed": 0}, out["a"], run=functools.partial(_write, str(out["a"]))),
                Unit("train-b", "train", {"seed": 1}, out["b"],
                     run=_planted_failure if b_fails else functools.partial(_write, str(out["b"]))),
                *(Unit(f"eval-{n}", "eval", {}, evals[n], inputs={"clip": str(out[n])},
                       run=functools.partial(_evaluate, str(out[n]), str(evals[n]))) for n in ("a", "b"))]

    lines: list[str] = []
    with pytest.raises(UnitsFailed) as failure:
        run_plan_processes(PlanRunner(units(b_fails=True), layout, "toy", lines.append), parallel=4, threads=1)
    assert failure.value.failed == {"train-b": "RuntimeError: planted failure"}
    assert failure.value.blocked == ["eval-b"] and "rerun" in str(failure.value)
    assert any("train-b: failed" in line for line in lines) and any("eval-b: not run" in line for line in lines)
    records = layout.study_dir("toy") / "units"
    assert sorted(p.name for p in records.glob("*.json")) == ["eval-a.json", "train-a.json"]
    assert out["a"].is_file() and evals["a"].is_file() and not evals["b"].exists()
    kept = {p: p.stat().st_mtime_ns for p in (out["a"], evals["a"])}

    status = run_plan_processes(PlanRunner(units(b_fails=False), layout, "toy", lines.append), parallel=4, threads=1)
    assert status == {"train-a": "done", "train-b": "ran", "eval-a": "done", "eval-b": "ran"}
    assert {p: p.stat().st_mtime_ns for p in kept} == kept and evals["b"].is_file()


def test_parallel_units_are_refused_with_ray():
    with pytest.raises(ValueError, match="executor=local"):
        StudyConfig(executor="ray", parallel=2)
    with pytest.raises(ValueError, match="unit_threads"):
        StudyConfig(unit_threads=0)
