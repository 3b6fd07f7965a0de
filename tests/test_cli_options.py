"""The CLI's options are generated from the config dataclasses (pipeline/commands/options.py): one declaration
per setting, MAT_-prefixed environment variables only, and answers (--help, a bad value) without torch."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pipeline.commands.cli import app
from pipeline.commands.options import declared_options, settings_command
from pipeline.core.config import option

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@dataclass(frozen=True)
class Inner:
    rate: float = field(default=0.5, metadata=option("RATE", "A rate.", pixels=False))
    hidden: int = 3  # no declaration: reachable by --set only


@dataclass(frozen=True)
class Toy:
    name: str = field(default="a", metadata=option("TOY_NAME", "A name.", flag="--toy-name"))
    count: int = field(default=2, metadata=option("COUNT", "A count."))
    flag: bool = field(default=False, metadata=option("FLAG", "A switch."))
    items: tuple[str, ...] = field(default=(), metadata=option("ITEMS", "Comma list."))
    pairs: tuple[tuple[str, int], ...] = field(default=(), metadata=option(
        "PAIRS", "k=v list.", parse=lambda s: tuple((k, int(v)) for k, v in (p.split("=") for p in s.split(",")))))
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"count={self.count}: must be >= 0")


def _toy_app(seen: list) -> typer.Typer:
    toy = typer.Typer()

    @toy.command()
    @settings_command(Toy)
    def run(settings: Toy, extra: bool = False) -> None:
        seen.append((settings, extra))

    @toy.callback()
    def main() -> None:
        pass

    return toy


def test_a_declared_field_is_an_option_with_its_flag_type_env_and_default(tmp_path):
    seen: list = []
    toy = _toy_app(seen)
    result = runner.invoke(toy, ["run", "--toy-name", "b", "--count", "5", "--flag", "--items", "x,y", "--pairs", "a=1,b=2",
                                 "--rate", "1/4", "--extra"])
    assert result.exit_code == 0, result.output
    settings, extra = seen[-1]
    assert settings == Toy(name="b", count=5, flag=True, items=("x", "y"), pairs=(("a", 1), ("b", 2)), inner=Inner(rate=0.25))
    assert extra is True
    # left out: the defaults stand; environment variables only with the MAT_ prefix
    result = runner.invoke(toy, ["run"], env={"COUNT": "9", "TOY_NAME": "leaked", "MAT_RATE": "0.75", "MAT_FLAG": "1"})
    assert result.exit_code == 0, result.output
    assert seen[-1][0] == Toy(flag=True, inner=Inner(rate=0.75))
    # precedence: defaults < --config < options < --set
    (tmp_path / "toy.yaml").write_text("count: 4\nname: file\ninner: {hidden: 7}\n")
    result = runner.invoke(toy, ["run", "--config", str(tmp_path / "toy.yaml"), "--toy-name", "opt", "--set", "inner.hidden=8"])
    assert result.exit_code == 0, result.output
    assert seen[-1][0] == Toy(name="opt", count=4, inner=Inner(hidden=8))
    help_text = runner.invoke(toy, ["run", "--help"], env={"COLUMNS": "200"}).output
    assert "A count (default 2)." in help_text and "MAT_COUNT" in help_text and "--hidden" not in help_text


def test_a_bad_value_is_one_line_naming_the_setting():
    toy = _toy_app([])
    for argv, named in ((["--count", "many"], "count='many'"), (["--count", "-1"], "count=-1"),
                        (["--pairs", "a=x"], "PAIRS='a=x'"), (["--set", "inner.nope=1"], "inner.nope")):
        result = runner.invoke(toy, ["run", *argv])
        assert result.exit_code == 2 and named in result.output, (argv, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_two_fields_claiming_one_flag_are_refused_when_the_command_is_built():
    @dataclass(frozen=True)
    class Clash:
        a: int = field(default=1, metadata=option("A", "a", flag="--same"))
        b: int = field(default=1, metadata=option("B", "b", flag="--same"))

    with pytest.raises(TypeError, match="--same declared twice"):
        settings_command(Clash)(lambda settings: None)


COMMAND_CONFIGS = {"ingest": "pipeline.data.ingest:IngestConfig", "augment": "pipeline.augment.runner:AugmentConfig",
                   "filter": "pipeline.curate.filters:FilterConfig", "export": "pipeline.curate.export:ExportConfig",
                   "pretrain": "pipeline.train.config:PretrainConfig", "train": "pipeline.train.config:TrainConfig",
                   "eval": "pipeline.evaluation.config:EvalConfig", "eval-zeroshot": "pipeline.evaluation.config:ZeroShotConfig",
                   "eval-captioning": "pipeline.evaluation.config:CaptioningConfig",
                   "study": "pipeline.study.plan:StudyConfig", "demo": "pipeline.commands.demo:DemoConfig"}


@pytest.mark.parametrize("command", sorted(COMMAND_CONFIGS))
def test_every_declared_setting_is_an_option_of_its_command(command):
    import importlib

    module, name = COMMAND_CONFIGS[command].split(":")
    cls = getattr(importlib.import_module(module), name)
    params = {p.envvar: p for p in typer.main.get_command(app).commands[command].params if p.envvar}
    for declared in declared_options(cls):
        assert f"MAT_{declared.option.name}" in params, (command, declared.path)
    assert all(envvar.startswith("MAT_") for envvar in params)


def test_unprefixed_variables_left_in_a_shell_change_nothing(monkeypatch, tmp_path):
    import pipeline.train.pretrain  # noqa: F401  (imported first: it binds main.train, which must stay the real one)

    seen = []
    monkeypatch.setattr("pipeline.train.main.train", lambda cfg, layout, **kw: seen.append(cfg) or (_ for _ in ()).throw(SystemExit(0)))
    leaked = {"MODE": "ft", "STEPS": "3", "DATASET": "nosuch", "LR": "0.5", "FORMAT": "json", "SET": "seed=9"}
    assert runner.invoke(app, ["train"], env=leaked).exit_code == 0
    assert (seen[0].mode, seen[0].steps, seen[0].dataset, seen[0].optim.lr, seen[0].seed) == ("mat", 150, "synth", 1e-4, 0)
    assert runner.invoke(app, ["train"], env={"MAT_MODE": "ft", "MAT_STEPS": "3", "MAT_SET": "seed=9"}).exit_code == 0
    assert (seen[1].mode, seen[1].steps, seen[1].seed) == ("ft", 3, 9)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_forwards_its_command_line_variables_with_the_prefix_only():
    out = subprocess.run(["make", "--no-print-directory", "--eval", "show-mat-env: ; @env | grep '^MAT_' | sort",
                          "show-mat-env", "DATASET=coco", "SET=a=1 b=2", "PYTHON=python3"],
                         cwd=ROOT, env={**os.environ, "FORMAT": "json", "MODE": "ft"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["MAT_DATASET=coco", "MAT_SET=a=1 b=2"]


def test_help_and_a_bad_value_answer_without_loading_torch():
    code = ("import sys\n"
            "from pipeline.commands.cli import app\n"
            "import typer\n"
            "for argv in (['--help'], ['train', '--help'], ['eval', '--help'], ['study', '--help'], ['train', '--set', 'steps=abc']):\n"
            "    try:\n"
            "        typer.main.get_command(app).main(argv, standalone_mode=False)\n"
            "    except BaseException:\n"
            "        pass\n"
            "torch = sys.modules.get('torch')\n"
            "print('LOADED' if torch is not None and type(torch).__name__ == 'module' else 'NOT LOADED')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "NOT LOADED"
