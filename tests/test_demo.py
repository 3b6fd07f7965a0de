"""demo.py: the phases, in order, as the CLI commands of the make targets, the last one the study with the demo's
budgets (a recording runner, no work done)."""

from __future__ import annotations

import pytest

from pipeline.commands.demo import DemoConfig, DemoError, run_demo
from pipeline.core.paths import Layout


class Recorder:
    def __init__(self, layout: Layout, fail: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.layout, self.fail = layout, fail

    def __call__(self, argv: list[str]) -> int:
        # a fixed thread count per phase, not the machine's: the same numbers on any machine
        assert argv[:2] == ["--threads", "2" if argv[2] == "pretrain" else "1"]
        argv = argv[2:]
        self.calls.append(argv)
        if argv[0] == "study":
            path = self.layout.dataset_manifests("synth") / "study" / "report.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("| model |\n")
        return 3 if argv[0] == self.fail else 0


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_phases_run_in_order_with_the_budgets(tmp_path):
    layout = Layout(tmp_path / "s", tmp_path / "m", tmp_path / "r", tmp_path / "models")
    run = Recorder(layout)
    lines: list[str] = []
    cfg = DemoConfig(size=300, pretrain_steps=7, train_steps=3, modes=("ft", "mat"), eval_size=20, attacks=("pgd",),
                     stages=("eda",), seeds=2)
    markdown = run_demo(cfg, run, layout, echo=lines.append)
    assert [c[0] for c in run.calls] == ["ingest", "pretrain", "augment", "stats", "study"]
    assert _option(run.calls[0], "--synth-size") == "300" and _option(run.calls[1], "--steps") == "7"
    assert _option(run.calls[2], "--stages") == "i2t-human,eda,randaug"
    study = run.calls[4]
    assert [_option(study, o) for o in ("--modes", "--steps", "--eval-size", "--attacks", "--stages", "--seeds")] == \
        ["ft,mat", "3", "20", "pgd", "eda", "2"]
    assert _option(study, "--combos") == "none"  # one MAT+ cell per stage, no N:N cell: the demo's budget
    assert [_option(study, o) for o in ("--parallel", "--unit-threads")] == [str(cfg.parallel), "1"]
    assert any("generative stages skipped" in line and "I2T_MODEL" in line for line in lines)
    assert markdown == "| model |\n"


def test_the_study_command_accepts_the_demo_options(tmp_path, monkeypatch):
    """The argv the demo builds parses as the study command's options (no unknown option)."""
    from typer.testing import CliRunner

    import pipeline.study.run as study
    from pipeline.commands.cli import app

    seen = {}
    monkeypatch.setattr(study, "run_study", lambda cfg, layout, echo: seen.setdefault("cfg", cfg) and {"markdown": ""})
    layout = Layout(tmp_path / "s", tmp_path / "m", tmp_path / "r", tmp_path / "models")
    run = Recorder(layout)
    run_demo(DemoConfig(train_steps=4, stages=("eda", "randaug")), run, layout, echo=lambda line: None)
    import torch

    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the CLI sets it: put back as it was after the test
    try:
        result = CliRunner().invoke(app, ["--threads", "1", *run.calls[-1]])
        assert torch.get_num_threads() == 1  # the global --threads reached torch
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert (cfg.steps, cfg.stages, cfg.combos, cfg.eval_size, cfg.modes) == (4, ("eda", "randaug"), (), DemoConfig().eval_size,
                                                                          ("ft", "tecoa", "mat", "matplus"))
    assert (cfg.parallel, cfg.unit_threads) == (DemoConfig().parallel, 1)


def test_a_failed_phase_stops_the_demo_but_stats_is_optional(tmp_path):
    layout = Layout(tmp_path / "s", tmp_path / "m", tmp_path / "r", tmp_path / "models")
    lines: list[str] = []
    run_demo(DemoConfig(modes=("ft",), attacks=("pgd",)), Recorder(layout, fail="stats"), layout, echo=lines.append)
    assert any("phase stats skipped" in line for line in lines)
    with pytest.raises(DemoError, match="study"):
        run_demo(DemoConfig(modes=("ft",)), Recorder(layout, fail="study"), layout, echo=lines.append)


@pytest.mark.parametrize("change", [{"size": 0}, {"train_steps": 0}, {"modes": ()}, {"seeds": 0}, {"parallel": 0}])
def test_bad_config_raises(change):
    with pytest.raises(ValueError):
        DemoConfig(**change)
