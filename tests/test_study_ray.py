"""`make study EXECUTOR=ray`: a tiny study on a local Ray of 2 CPUs gives the local executor's results, and a
failed task is reported, fails the study, and a rerun redoes only what is missing.

Skipped when ray is not installed (and failed in CI, where `make test` installs it).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from conftest import tiny_study
from pipeline.core.paths import Layout
from pipeline.study.compare import differences
from pipeline.study.plan import StudyConfig


@pytest.fixture(scope="module")
def ray_session():
    if importlib.util.find_spec("ray") is None:
        if os.environ.get("CI"):
            pytest.fail("ray is not installed: pip install -e '.[ray]'")
        pytest.skip("ray is not installed: pip install -e '.[ray]'")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    # The planted unit functions below travel to the workers by value (tests/ is not a package).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


def _files(root: Path, pattern: str) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.glob(pattern))}


def test_a_study_on_ray_gives_the_local_results(ray_session, tmp_path, tiny_model_dirs, monkeypatch):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as many threads as a Ray task of 1 CPU: the float sums are then the same
    try:
        local = tiny_study(tmp_path / "local", tiny_model_dirs, monkeypatch, executor="local")
    finally:
        torch.set_num_threads(threads)
    remote = tiny_study(tmp_path / "ray", tiny_model_dirs, monkeypatch, executor="ray")

    study = Path("manifests/toy/study")
    report = json.loads((remote / study / "report.json").read_text())
    assert {(r["cell"], r["seed"]) for r in report["records"]} == {("pretrained", 0), ("ft", 0), ("tecoa", 0)}
    assert differences(json.loads((local / study / "report.json").read_text()), report) == []
    # The units' results: the evaluations and the unit records (whose fingerprints stamp the trained weights and
    # every setting) the same apart from provenance and timing, the trained models byte for byte.
    results = {**_files(local, "manifests/toy/evals/*.json"), **_files(local, "manifests/toy/study/units/*.json")}
    assert len(results) == 3 + 5
    for name, path in results.items():
        assert differences(json.loads(path.read_text()), json.loads((remote / name).read_text())) == [], name
    models = _files(local, "runs/study-toy/*/clip/*")
    assert len({Path(n).parts[2] for n in models}) == 2
    assert {n: p.read_bytes() for n, p in models.items()} == {n: (remote / n).read_bytes() for n in models}


# ------------------------------------------------------------------ a failed task


def _write(path: str) -> None:
    Path(path).write_text("made\n")


def _planted_failure() -> None:
    raise RuntimeError("planted failure")


def test_a_failed_task_fails_the_study_and_a_rerun_redoes_only_it(ray_session, tmp_path):
    from pipeline.study.ray_units import UnitsFailed, run_plan_ray
    from pipeline.study.run import PlanRunner, Unit

    layout = Layout(tmp_path / "shards", tmp_path / "manifests", tmp_path / "runs", tmp_path / "models")
    cfg = StudyConfig(dataset="toy", device="cpu", executor="ray")
    out = {name: tmp_path / "runs" / name / "clip" for name in ("a", "b")}
    evals = {name: tmp_path / f"eval-{name}.json" for name in ("a", "b")}

    def units(b_fails: bool) -> list[Unit]:
        return [Unit("train-a", "train", {"seed": 0}, out["a"], run=functools.partial(_write, str(out["a"]))),
                Unit("train-b", "train", {"seed": 1}, out["b"],
                     run=_planted_failure if b_fails else functools.partial(_write, str(out["b"]))),
                *(Unit(f"eval-{n}", "eval", {}, evals[n], inputs={"clip": str(out[n])},
                       run=functools.partial(_write, str(evals[n]))) for n in ("a", "b"))]

    lines: list[str] = []
    with pytest.raises(UnitsFailed) as failure:
        run_plan_ray(PlanRunner(units(b_fails=True), layout, "toy", lines.append), cfg)
    assert failure.value.failed == {"train-b": "RuntimeError: planted failure"}
    assert failure.value.blocked == ["eval-b"] and "rerun" in str(failure.value)
    assert any("train-b: failed" in line for line in lines) and any("eval-b: not run" in line for line in lines)
    records = layout.study_dir("toy") / "units"
    assert sorted(p.name for p in records.glob("*.json")) == ["eval-a.json", "train-a.json"]
    assert out["a"].is_file() and evals["a"].is_file() and not evals["b"].exists()
    kept = {p: p.stat().st_mtime_ns for p in (out["a"], evals["a"])}

    status = run_plan_ray(PlanRunner(units(b_fails=False), layout, "toy", lines.append), cfg)
    assert status == {"train-a": "done", "train-b": "ran", "eval-a": "done", "eval-b": "ran"}
    assert {p: p.stat().st_mtime_ns for p in kept} == kept and evals["b"].is_file()


def test_a_cuda_study_asks_a_gpu_per_unit_and_refuses_a_numbered_gpu():
    pytest.importorskip("ray", reason="ray is not installed")
    from pipeline.study.ray_units import uses_cuda

    assert uses_cuda("cuda", {"CPU": 8}) and not uses_cuda("cpu", {"CPU": 8, "GPU": 2})
    assert uses_cuda("auto", {"CPU": 8, "GPU": 2}) and not uses_cuda("auto", {"CPU": 8})
    with pytest.raises(ValueError, match="cuda:1"):
        StudyConfig(device="cuda:1", executor="ray")
    assert dataclasses.replace(StudyConfig(device="cuda:1"), executor="local").executor == "local"
    with pytest.raises(ValueError, match="executor"):
        StudyConfig(executor="dask")
