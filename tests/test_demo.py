"""demo.py: the phases, in order, as the CLI commands of the make targets (a recording runner, no work done)."""

from __future__ import annotations

import pytest

from pipeline.demo import DemoConfig, DemoError, run_demo
from pipeline.paths import Layout


class Recorder:
    def __init__(self, layout: Layout, fail: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.layout, self.fail = layout, fail

    def __call__(self, argv: list[str]) -> int:
        self.calls.append(argv)
        if argv[0] == "report":
            path = self.layout.dataset_manifests("synth") / "report.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("| model |\n")
        return 3 if argv[0] == self.fail else 0


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_phases_run_in_order_with_the_budgets(tmp_path):
    layout = Layout(tmp_path / "s", tmp_path / "m", tmp_path / "r", tmp_path / "models")
    run = Recorder(layout)
    lines: list[str] = []
    cfg = DemoConfig(size=300, pretrain_steps=7, train_steps=3, modes=("ft", "mat"), eval_size=20, attacks=("pgd",))
    markdown = run_demo(cfg, run, layout, echo=lines.append)
    assert [c[0] for c in run.calls] == ["ingest", "pretrain", "augment", "stats", "train", "train", "eval", "eval",
                                         "eval", "report"]
    assert _option(run.calls[0], "--synth-size") == "300" and _option(run.calls[1], "--steps") == "7"
    assert _option(run.calls[2], "--stages") == "i2t-human,eda,randaug"
    trains = run.calls[4:6]
    assert [_option(c, "--mode") for c in trains] == ["ft", "mat"] and all(_option(c, "--steps") == "3" for c in trains)
    evals = run.calls[6:9]
    # the pretrained model is the reference row; each trained run is evaluated from its own run dir
    assert _option(evals[0], "--ckpt") == str(layout.model_dir("synth", "clip"))
    assert [_option(c, "--ckpt") for c in evals[1:]] == [_option(c, "--run-dir") for c in trains]
    assert all(_option(c, "--size") == "20" and _option(c, "--attacks") == "pgd" for c in evals)
    assert any("generative stages skipped" in line and "I2T_MODEL" in line for line in lines)
    assert markdown == "| model |\n"


def test_a_failed_phase_stops_the_demo_but_stats_is_optional(tmp_path):
    layout = Layout(tmp_path / "s", tmp_path / "m", tmp_path / "r", tmp_path / "models")
    lines: list[str] = []
    run_demo(DemoConfig(modes=("ft",), attacks=("pgd",)), Recorder(layout, fail="stats"), layout, echo=lines.append)
    assert any("phase stats skipped" in line for line in lines)
    with pytest.raises(DemoError, match="train"):
        run_demo(DemoConfig(modes=("ft",)), Recorder(layout, fail="train"), layout, echo=lines.append)


@pytest.mark.parametrize("change", [{"size": 0}, {"train_steps": 0}, {"modes": ()}])
def test_bad_config_raises(change):
    with pytest.raises(ValueError):
        DemoConfig(**change)
