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


def _base_shards(shards: Path) -> dict[str, int]:
    """Base shard name -> images, from the shards' stats files."""
    return {p.name.removesuffix(".stats.json"): json.loads(p.read_text())["samples"]
            for p in sorted((shards / "synth" / "base").glob("*.stats.json"))}


def test_augment_ingests_a_missing_base_with_the_ingest_options_given(tmp_path):
    env = {"SHARDS_DIR": str(tmp_path / "s"), "MANIFESTS_DIR": str(tmp_path / "m"), "SYNTH_SIZE": "90",
           "SHARD_SIZE": "20", "STAGES": "i2t-human", "WORKERS": "1", "SCORER": "none"}
    result = runner.invoke(app, ["augment"], env=env)
    assert result.exit_code == 0, result.output
    made = _base_shards(tmp_path / "s")
    assert sum(made.values()) == 90 and max(made.values()) == 20
    per_split = {}
    for name, images in made.items():
        per_split.setdefault(name.split("-")[0], []).append(images)
    assert len(made) == sum(-(-sum(sizes) // 20) for sizes in per_split.values())  # ceil(images / 20) per split
    config = json.loads((tmp_path / "m" / "synth" / "base.json").read_text())["config"]
    assert (config["synth_size"], config["shard_size"]) == (90, 20)
    # the same settings through --set and a --config file (the options win over the file)
    (tmp_path / "augment.yaml").write_text("ingest:\n  synth_size: 50\n  shard_size: 7\nstages: [i2t-human]\nscorer: none\n")
    layout = ["--shards-dir", str(tmp_path / "s2"), "--manifests-dir", str(tmp_path / "m2")]
    result = runner.invoke(app, [*layout, "augment", "--config", str(tmp_path / "augment.yaml"), "--synth-size", "40",
                                 "--set", "ingest.shard_size=15", "--set", "workers=1"], env={})
    assert result.exit_code == 0, result.output
    made = _base_shards(tmp_path / "s2")
    assert sum(made.values()) == 40 and max(made.values()) == 15


def test_ingest_config_file_and_set(tmp_path):
    (tmp_path / "ingest.json").write_text(json.dumps({"synth_size": 24, "shard_size": 5, "fractions": {"train": 0.5, "val": 0.25, "test": 0.25}}))
    env = {"SHARDS_DIR": str(tmp_path / "s"), "MANIFESTS_DIR": str(tmp_path / "m"), "WORKERS": "1"}
    result = runner.invoke(app, ["ingest", "--config", str(tmp_path / "ingest.json"), "--set", "shard_size=6"], env=env)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "m" / "synth" / "base.json").read_text())["config"]
    assert (config["synth_size"], config["shard_size"], config["fractions"]["train"]) == (24, 6, 0.5)
    result = runner.invoke(app, ["ingest", "--set", "no_such=1"], env=env)
    assert result.exit_code == 2 and "no option 'no_such'" in result.output


def test_generative_model_variables_reach_their_stages(tmp_path):
    env = {"SHARDS_DIR": str(tmp_path / "s"), "MANIFESTS_DIR": str(tmp_path / "m"),
           "I2T_MODEL": str(tmp_path / "no-internvl-here"), "T2I_MODEL": str(tmp_path / "no-sd-here")}
    result = runner.invoke(app, ["augment", "--stages", "i2t-internvl"], env=env)
    assert result.exit_code == 2 and "no-internvl-here" in result.output
    result = runner.invoke(app, ["augment", "--stages", "t2i-sd"], env=env)
    assert result.exit_code == 2 and "no-sd-here" in result.output


def test_folders_are_passed_not_written_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("SHARDS_DIR", raising=False)
    result = runner.invoke(app, ["--shards-dir", str(tmp_path / "s"), "--manifests-dir", str(tmp_path / "m"),
                                 "ingest", "--synth-size", "12", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "synth" / "base.json").is_file() and _base_shards(tmp_path / "s")
    import os

    assert "SHARDS_DIR" not in os.environ


def test_demo_phases_write_into_the_demo_folders(tmp_path, monkeypatch):
    import pipeline.commands.demo as demo

    def one_phase(cfg, run, layout, echo):
        assert run(["ingest", "--synth-size", "12", "--workers", "1"]) == 0
        return ""

    monkeypatch.setattr(demo, "run_demo", one_phase)
    result = runner.invoke(app, ["--shards-dir", str(tmp_path / "s"), "--manifests-dir", str(tmp_path / "m"), "demo"],
                           env={"SHARDS_DIR": str(tmp_path / "elsewhere")})
    assert result.exit_code == 0, result.output
    assert sum(_base_shards(tmp_path / "s").values()) == 12 and not (tmp_path / "elsewhere").exists()
