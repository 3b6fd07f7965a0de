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
    env = {"MAT_SHARDS_DIR": str(tmp_path / "s"), "MAT_MANIFESTS_DIR": str(tmp_path / "m"), "MAT_DATASET": "synth", "MAT_SYNTH_SIZE": "30", "MAT_WORKERS": "1"}
    result = runner.invoke(app, ["ingest"], env=env)
    assert result.exit_code == 0, result.output
    assert "30 written, 0 skipped of 30 input" in result.output
    manifest = json.loads((tmp_path / "m" / "synth" / "base.json").read_text())
    assert manifest["config"]["synth_size"] == 30 and manifest["counts"]["written"] == 30


def test_missing_data_root_is_a_clear_error(tmp_path):
    env = {"MAT_SHARDS_DIR": str(tmp_path / "s"), "MAT_MANIFESTS_DIR": str(tmp_path / "m")}
    result = runner.invoke(app, ["ingest", "--dataset", "coco"], env=env)
    assert result.exit_code == 2
    assert "needs DATA_ROOT" in result.output
    result = runner.invoke(app, ["ingest", "--dataset", "coco", "--data-root", str(tmp_path / "nope")], env=env)
    assert result.exit_code == 2 and "does not exist" in result.output


def test_augment_rejects_unknown_stage_and_bad_option(tmp_path):
    env = {"MAT_SHARDS_DIR": str(tmp_path / "s"), "MAT_MANIFESTS_DIR": str(tmp_path / "m")}
    result = runner.invoke(app, ["augment", "--set", "nosuch.x=1"], env=env)
    assert result.exit_code == 2 and "unknown stage 'nosuch'" in result.output
    result = runner.invoke(app, ["augment"], env={**env, "MAT_STAGES": "randaug", "MAT_STAGE_OPTS": "randaug.magnitude=99"})
    assert result.exit_code == 2 and "magnitude" in result.output


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0 and "augment" in result.stdout


def _base_shards(shards: Path) -> dict[str, int]:
    """Base shard name -> images, from the shards' stats files."""
    return {p.name.removesuffix(".stats.json"): json.loads(p.read_text())["samples"]
            for p in sorted((shards / "synth" / "base").glob("*.stats.json"))}


def test_augment_ingests_a_missing_base_with_the_ingest_options_given(tmp_path):
    env = {"MAT_SHARDS_DIR": str(tmp_path / "s"), "MAT_MANIFESTS_DIR": str(tmp_path / "m"), "MAT_SYNTH_SIZE": "90",
           "MAT_SHARD_SIZE": "20", "MAT_STAGES": "i2t-human", "MAT_WORKERS": "1", "MAT_SCORER": "none"}
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
    env = {"MAT_SHARDS_DIR": str(tmp_path / "s"), "MAT_MANIFESTS_DIR": str(tmp_path / "m"), "MAT_WORKERS": "1"}
    result = runner.invoke(app, ["ingest", "--config", str(tmp_path / "ingest.json"), "--set", "shard_size=6"], env=env)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "m" / "synth" / "base.json").read_text())["config"]
    assert (config["synth_size"], config["shard_size"], config["fractions"]["train"]) == (24, 6, 0.5)
    result = runner.invoke(app, ["ingest", "--set", "no_such=1"], env=env)
    assert result.exit_code == 2 and "no option 'no_such'" in result.output


def test_generative_model_variables_reach_their_stages(tmp_path):
    env = {"MAT_SHARDS_DIR": str(tmp_path / "s"), "MAT_MANIFESTS_DIR": str(tmp_path / "m"),
           "MAT_I2T_MODEL": str(tmp_path / "no-internvl-here"), "MAT_T2I_MODEL": str(tmp_path / "no-sd-here")}
    result = runner.invoke(app, ["augment", "--stages", "i2t-internvl"], env=env)
    assert result.exit_code == 2 and "no-internvl-here" in result.output
    result = runner.invoke(app, ["augment", "--stages", "t2i-sd"], env=env)
    assert result.exit_code == 2 and "no-sd-here" in result.output


def test_folders_are_passed_not_written_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MAT_SHARDS_DIR", raising=False)
    result = runner.invoke(app, ["--shards-dir", str(tmp_path / "s"), "--manifests-dir", str(tmp_path / "m"),
                                 "ingest", "--synth-size", "12", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "synth" / "base.json").is_file() and _base_shards(tmp_path / "s")
    import os

    assert "MAT_SHARDS_DIR" not in os.environ


def test_demo_phases_write_into_the_demo_folders(tmp_path, monkeypatch):
    import pipeline.commands.demo as demo

    def one_phase(cfg, run, layout, echo):
        assert run(["ingest", "--synth-size", "12", "--workers", "1"]) == 0
        return ""

    monkeypatch.setattr(demo, "run_demo", one_phase)
    result = runner.invoke(app, ["--shards-dir", str(tmp_path / "s"), "--manifests-dir", str(tmp_path / "m"), "demo"],
                           env={"MAT_SHARDS_DIR": str(tmp_path / "elsewhere")})
    assert result.exit_code == 0, result.output
    assert sum(_base_shards(tmp_path / "s").values()) == 12 and not (tmp_path / "elsewhere").exists()


# ------------------------------------------------------------------ --config and --set (pretrain, train, eval, study)


def _captured(monkeypatch) -> list:
    """The configs the training commands would run with (nothing is trained)."""
    seen = []

    def capture(cfg, layout, **options):
        seen.append(cfg)
        raise SystemExit(0)

    import pipeline.train.pretrain  # noqa: F401  (imported first: it binds main.train, which must stay the real one)

    monkeypatch.setattr("pipeline.train.main.train", capture)
    monkeypatch.setattr("pipeline.train.pretrain.pretrain", capture)
    return seen


def test_train_replays_a_saved_config_json(monkeypatch, tmp_path):
    from pipeline.core.config import apply_overrides, save_config
    from pipeline.train.config import TrainConfig

    saved = apply_overrides(TrainConfig(), ["mode=matplus", "steps=7", "optim.lr=3e-5", "data.stages=eda,i2t-human",
                                            "attack.image.eps=4/255", "attack.text.top_k=5", "report_to=none"])
    path = save_config(saved, tmp_path / "config.json", resolved={"precision_resolved": "fp32", "world_size": 1})
    seen = _captured(monkeypatch)
    assert runner.invoke(app, ["train", "--config", str(path)]).exit_code == 0
    # precedence: file < options < --set
    assert runner.invoke(app, ["train", "--config", str(path), "--steps", "9", "--set", "steps=11", "--top-k", "3"]).exit_code == 0
    assert seen[0] == saved
    assert (seen[1].steps, seen[1].attack.text.top_k, seen[1].optim.lr) == (11, 3, 3e-5)


def test_set_reaches_the_bert_attack_training_builds(monkeypatch, tiny_model_dirs):
    from pipeline.models.hf import load_clip, load_mlm
    from pipeline.train.modes import build_mode

    seen = _captured(monkeypatch)
    result = runner.invoke(app, ["train", "--mode", "mat", "--set", "attack.text.mlm_threshold=0.5",
                                 "--set", "attack.image.steps=3"])
    assert result.exit_code == 0, result.output
    mode = build_mode(seen[0], load_clip(tiny_model_dirs["clip"]), load_mlm(tiny_model_dirs["mlm"]))
    assert mode.text_attack.mlm_threshold == 0.5 and seen[0].attack.image.steps == 3


def test_a_bad_set_is_a_one_line_error_naming_the_option(monkeypatch):
    seen = _captured(monkeypatch)
    for command in (["train"], ["pretrain"], ["study"], ["eval", "--ckpt", "x"]):
        result = runner.invoke(app, [*command, "--set", "attack.text.mlm_treshold=0.5"])
        assert result.exit_code == 2 and "attack.text.mlm_treshold" in result.output, (command, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
    result = runner.invoke(app, ["train", "--set", "attack.image.steps=many"])
    assert result.exit_code == 2 and "attack.image.steps='many'" in result.output
    result = runner.invoke(app, ["train", "--set", "attack.order=sideways"])
    assert result.exit_code == 2 and "attack.order='sideways'" in result.output and not seen


def test_pretrain_and_study_take_config_files(monkeypatch, tmp_path):
    import pipeline.study.run as study_run

    (tmp_path / "pretrain.yaml").write_text("steps: 5\nclip_preset: tiny\n")
    seen = _captured(monkeypatch)
    assert runner.invoke(app, ["pretrain", "--config", str(tmp_path / "pretrain.yaml"), "--lr", "0.01"]).exit_code == 0
    assert (seen[0].steps, seen[0].clip_preset, seen[0].lr) == (5, "tiny", 0.01)
    studies = []
    monkeypatch.setattr(study_run, "run_study", lambda cfg, layout, echo: studies.append(cfg) or {"markdown": ""})
    (tmp_path / "study.json").write_text(json.dumps({"modes": ["ft", "mat"], "steps": 40}))
    result = runner.invoke(app, ["study", "--config", str(tmp_path / "study.json"), "--set", "seeds=3"])
    assert result.exit_code == 0, result.output
    assert (studies[0].modes, studies[0].steps, studies[0].seeds) == (("ft", "mat"), 40, 3)


def test_eval_takes_its_checkpoint_and_attack_options_from_a_config_file(monkeypatch, tmp_path):
    import pipeline.evaluation.evaluate as evaluate

    seen = []
    row = {k: 0.0 for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "tr_asr", "ir_asr")}
    monkeypatch.setattr(evaluate, "evaluate", lambda cfg, layout: seen.append(cfg) or {"name": "x", "metrics": {"clean": row}})
    (tmp_path / "eval.yaml").write_text("checkpoint: runs/a\nattacks: [pgd]\neps: 0.01\nsize: 8\n")
    result = runner.invoke(app, ["eval", "--config", str(tmp_path / "eval.yaml"), "--set", "top_k=4"])
    assert result.exit_code == 0, result.output
    assert (seen[0].checkpoint, seen[0].attacks, seen[0].eps, seen[0].size, seen[0].top_k) == ("runs/a", ("pgd",), 0.01, 8, 4)
    assert runner.invoke(app, ["eval", "--config", str(tmp_path / "eval.yaml"), "--ckpt", "runs/b"]).exit_code == 0
    assert seen[1].checkpoint == "runs/b"
    result = runner.invoke(app, ["eval"])
    assert result.exit_code == 2 and "CKPT" in result.output


def test_help_shows_the_config_defaults():
    from pipeline.train.config import TrainConfig

    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "300"})
    assert f"(default {TrainConfig().steps})" in result.output and "(default 2/255)" in result.output
    assert "--config" in result.output and "--set" in result.output
