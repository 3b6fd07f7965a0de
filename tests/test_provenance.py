"""Provenance: what every result file records about the run that made it, and the comparison that ignores it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core import provenance as prov
from pipeline.core.manifests import build_manifest
from pipeline.core.provenance import PROVENANCE_KEY, provenance, source_commit
from pipeline.evaluation.bootstrap import Outcomes
from pipeline.study.compare import differences, main
from pipeline.study.plan import Cell, StudyConfig
from pipeline.study.report import CellResult, build_study_report

ROOT = Path(__file__).resolve().parents[1]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture(autouse=True)
def _fresh_cache():
    source_commit.cache_clear()
    yield
    source_commit.cache_clear()


def test_provenance_records_the_source_commit_versions_device_and_command(tmp_path, monkeypatch):
    if not (ROOT / ".git").exists():
        pytest.skip("the tests run outside a git checkout")
    monkeypatch.chdir(tmp_path)  # the commit is the package's checkout's, not the current directory's
    monkeypatch.setattr(sys, "argv", ["mat-pipeline", "eval", "--ckpt", "x"])
    record = provenance("cpu", "fp32")
    assert record["commit"] == _git(ROOT, "rev-parse", "HEAD") and isinstance(record["dirty"], bool)
    assert torch.__version__.startswith(record["versions"]["torch"]) and record["cuda"] == torch.version.cuda
    assert set(record["versions"]) == {"torch", "transformers", "open_clip", "diffusers", "webdataset"}
    assert record["device"] == "cpu" and record["gpu"] is None and record["precision"] == "fp32"
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["argv"] == ["mat-pipeline", "eval", "--ckpt", "x"]
    json.dumps(record)  # storable as it is


def test_dirty_means_changed_tracked_files(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-qm", "one")
    (tmp_path / "new.py").write_text("")  # untracked: not dirty
    assert source_commit(tmp_path) == (_git(tmp_path, "rev-parse", "HEAD"), False)
    (tmp_path / "a.py").write_text("x = 2\n")
    source_commit.cache_clear()
    assert source_commit(tmp_path)[1] is True


def test_no_checkout_or_no_git_gives_unknown_and_never_fails(tmp_path, monkeypatch):
    assert source_commit(tmp_path) == ("unknown", None)  # installed from a wheel: no repository
    _git(tmp_path, "init", "-q")  # a package inside another project's checkout (a venv in a repo)
    _git(tmp_path, "commit", "-q", "--allow-empty", "-m", "other project")
    (tmp_path / "venv" / "site-packages").mkdir(parents=True)
    assert source_commit(tmp_path / "venv" / "site-packages") == ("unknown", None)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # git missing
    assert source_commit(ROOT) == ("unknown", None)
    monkeypatch.setattr(prov, "PACKAGES", {"torch": "torch", "absent": "no-such-distribution-xyz"})
    versions = prov.package_versions()
    assert torch.__version__.startswith(versions["torch"]) and versions["absent"] is None


def test_writers_store_provenance_under_one_key(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["mat-pipeline", "augment"])
    manifest = build_manifest("toy", "eda", tmp_path, {"seed": 0}, device="cpu")
    assert manifest[PROVENANCE_KEY]["device"] == "cpu" and manifest[PROVENANCE_KEY]["argv"] == ["mat-pipeline", "augment"]
    _study_report(tmp_path / "study")
    report = json.loads((tmp_path / "study" / "report.json").read_text())
    assert report[PROVENANCE_KEY]["commit"] == provenance()["commit"]


def test_make_report_records_carry_their_evaluations_provenance(tmp_path):
    from pipeline.evaluation.report import to_records

    row = {k: 1.0 for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "tr_asr", "ir_asr")}
    ev = {"name": "a", "mode": "ft", "checkpoint": "c", "dataset": "toy", "n_images": 2, "n_texts": 4,
          "metrics": {"clean": row}, PROVENANCE_KEY: {"commit": "abc"}}
    assert to_records([ev])[0][PROVENANCE_KEY] == {"commit": "abc"}


def test_bench_json_has_provenance_and_an_update_keeps_one(tmp_path, monkeypatch):
    from pipeline.commands import bench
    from pipeline.core.fileio import atomic_write_json

    folder = tmp_path / "benchmarks"
    folder.mkdir()
    (folder / "bench_fake.py").write_text("def run():\n    return {'fake_figure': 1.5}\n")
    monkeypatch.setattr(bench, "BENCHMARKS_DIR", folder)
    output = tmp_path / "bench.json"
    # an earlier run's file, written by the pipeline (a file of the user's there would be refused: ledger.py)
    atomic_write_json(output, {"earlier": 9.0, PROVENANCE_KEY: {"commit": "old"}})
    bench.run_benchmarks(output, "fake")
    written = json.loads(output.read_text())
    assert written["earlier"] == 9.0 and written["fake_figure"] == 1.5
    assert written[PROVENANCE_KEY]["commit"] == provenance()["commit"] != "old"


# ------------------------------------------------------------------ comparing two runs' results


def _study_report(out: Path) -> None:
    rng = np.random.default_rng(0)
    outcomes = {a: Outcomes(np.where(rng.random(20) < 0.5, 0, 10), np.where(rng.random(40) < 0.5, 0, 10),
                            np.repeat(np.arange(20), 2)) for a in ("clean", "pgd")}
    cells = [CellResult(Cell("ft", "ft", steps=10, tables=("defences",), attacks=("pgd",)), {0: outcomes})]
    build_study_report(cells, {}, StudyConfig(resamples=50), out)


def test_two_runs_reports_compare_equal_apart_from_provenance(tmp_path, monkeypatch, capsys):
    _study_report(tmp_path / "a")
    monkeypatch.setattr(sys, "argv", ["another", "command"])  # a second run: other provenance
    _study_report(tmp_path / "b")
    a, b = tmp_path / "a" / "report.json", tmp_path / "b" / "report.json"
    assert json.loads(a.read_text())[PROVENANCE_KEY] != json.loads(b.read_text())[PROVENANCE_KEY]
    assert main([str(a), str(b)]) == 0
    changed = json.loads(b.read_text())
    changed["records"][0]["metrics"]["pgd"]["tr_r1"] += 1
    b.write_text(json.dumps(changed))
    capsys.readouterr()
    assert main([str(a), str(b)]) == 1
    assert capsys.readouterr().out.splitlines() == [f"records[0].metrics.pgd.tr_r1: {changed['records'][0]['metrics']['pgd']['tr_r1'] - 1!r} "
                                                    f"!= {changed['records'][0]['metrics']['pgd']['tr_r1']!r}"]
    assert main([str(a), str(tmp_path / "missing.json")]) == 2


def test_differences_ignore_timing_keys_at_any_depth_and_nothing_else():
    a = {"time": "10:00", "metrics": {"clean": {"tr_r1": 50.0, "seconds": 1.2, "seconds_per_image": 0.1}},
         "created": "x", PROVENANCE_KEY: {"commit": "a"}, "units": [{"finished": "t", "fingerprint": "f"}]}
    b = {"time": "11:00", "metrics": {"clean": {"tr_r1": 50.0, "seconds": 3.4, "seconds_per_image": 0.3}},
         "created": "y", PROVENANCE_KEY: {"commit": "b"}, "units": [{"finished": "u", "fingerprint": "f"}]}
    assert differences(a, b) == []
    b["metrics"]["clean"]["tr_r1"] = 50  # same number, another type: the files differ
    b["units"].append({})
    b["extra"] = 1
    assert differences(a, b) == ["extra: only in second", "metrics.clean.tr_r1: 50.0 != 50", "units: 1 items != 2 items"]
