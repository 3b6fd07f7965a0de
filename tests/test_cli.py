"""The CLI as `make` drives it: options from environment variables, clear errors, --help on every command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from pipeline.commands.cli import app

runner = CliRunner()


def test_every_command_explains_itself():
    commands = ["ingest", "augment", "stats", "filter", "pretrain", "train", "eval", "report", "demo", "bench", "clean"]
    for command in commands:
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage" in result.output


def test_ingest_reads_make_variables_from_the_environment(tmp_path):
    env = {"SHARDS_DIR": str(tmp_path / "s"), "MANIFESTS_DIR": str(tmp_path / "m"), "DATASET": "synth", "SYNTH_SIZE": "30", "WORKERS": "1"}
    result = runner.invoke(app, ["ingest"], env=env)
    assert result.exit_code == 0, result.output
    assert "30 written, 0 skipped of 30 input" in result.output
    manifest = json.loads((tmp_path / "m" / "synth" / "base.json").read_text())
    assert manifest["config"]["synth_size"] == 30 and manifest["counts"]["written"] == 30


def test_missing_data_root_is_a_clear_error(tmp_path):
    env = {"SHARDS_DIR": str(tmp_path / "s"), "MANIFESTS_DIR": str(tmp_path / "m")}
    result = runner.invoke(app, ["ingest", "--dataset", "coco"], env=env)
    assert result.exit_code == 2
    assert "needs DATA_ROOT" in result.output
    result = runner.invoke(app, ["ingest", "--dataset", "coco", "--data-root", str(tmp_path / "nope")], env=env)
    assert result.exit_code == 2 and "does not exist" in result.output


def test_augment_rejects_unknown_stage_and_bad_option(tmp_path):
    env = {"SHARDS_DIR": str(tmp_path / "s"), "MANIFESTS_DIR": str(tmp_path / "m")}
    result = runner.invoke(app, ["augment", "--set", "nosuch.x=1"], env=env)
    assert result.exit_code == 2 and "unknown stage 'nosuch'" in result.output
    result = runner.invoke(app, ["augment"], env={**env, "STAGES": "randaug", "STAGE_OPTS": "randaug.magnitude=99"})
    assert result.exit_code == 2 and "magnitude" in result.output


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0 and "augment" in result.stdout
