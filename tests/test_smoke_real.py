"""`make smoke-real` (benchmarks/smoke_real.py): the commands it runs parse as the CLI takes them, and its study
step is the study the issue asks for. Nothing runs here: a full run takes minutes even at the tiny size."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import smoke_real  # noqa: E402


def _commands(monkeypatch, tmp_path, only, size="real"):
    """Every command smoke() would run, in order, as (name, argv, cli) with nothing run."""
    ran = []

    def record(self, name, argv, cli=True):
        ran.append((name, argv, cli))
        return True

    monkeypatch.setattr(smoke_real.Runner, "__call__", record)
    monkeypatch.setattr(smoke_real, "_available_gb", lambda: 64.0)
    smoke_real.smoke(tmp_path, only, size=size)
    return ran


def test_every_command_parses_against_the_cli(monkeypatch, tmp_path):
    from pipeline.commands.cli import app

    group = typer.main.get_command(app)
    group.make_context("pipeline", [*smoke_real.Runner(tmp_path).folders, "study"])  # the folder options
    ran = _commands(monkeypatch, tmp_path, None)
    assert "study" in [name for name, _, _ in ran]
    for name, argv, cli in ran:
        if cli:
            group.commands[argv[0]].make_context(argv[0], argv[1:])  # an unknown option or bad value raises
        else:
            assert argv[1:3] == ["--build", name.removeprefix("build-")] and argv[-2:] == ["--size", "real"], name


def test_the_study_step_runs_every_cell_at_one_step_on_four_images(monkeypatch, tmp_path):
    from pipeline.commands.cli import app
    from pipeline.study import run as study_run
    from pipeline.study.plan import ATTACKS, CPU_STAGES, MODES, plan_cells

    ran = _commands(monkeypatch, tmp_path, {"study"}, size="tiny")
    assert [name for name, _, _ in ran] == ["build-clip-mlm", "ingest", "augment-matplus", "study"]
    assert ran[0][1][-2:] == ["--size", "tiny"]
    study_argv = ran[-1][1]

    seen = {}

    def capture(cfg, layout, echo):
        seen["cfg"] = cfg
        return {"markdown": ""}

    monkeypatch.setattr(study_run, "run_study", capture)
    result = CliRunner().invoke(app, [*smoke_real.Runner(tmp_path).folders, *study_argv])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert (cfg.train_steps, cfg.batch_size, cfg.eval_size) == (1, 2, 4)
    assert cfg.modes == MODES and cfg.attacks == ATTACKS and cfg.augmentation
    assert cfg.eval_steps is None and cfg.eval_top_k is None  # the attacks at their evaluation defaults
    cells = {(c.mode, c.stages) for c in plan_cells(cfg, list(CPU_STAGES))}
    assert {("pretrained", ()), *((m, ()) for m in MODES if m != "matplus")} <= cells
    assert {("matplus", (stage,)) for stage in CPU_STAGES} <= cells
