"""The one config system (pipeline/core/config.py): overrides, files, strictness, validation on rebuild."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from pipeline.core.config import (
    apply_overrides,
    build_config,
    check_positive,
    from_dict,
    load_config,
    option_names,
    save_config,
    to_dict,
)


@dataclass(frozen=True)
class Inner:
    eps: float = 2 / 255
    steps: int = 2
    start: bool = True

    def __post_init__(self) -> None:
        check_positive(self, "steps")


@dataclass(frozen=True)
class Outer:
    name: str = "run"
    stages: tuple[str, ...] = ()
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.name == "matplus" and not self.stages:
            raise ValueError("name='matplus' needs stages")


def test_overrides_convert_by_field_type():
    cfg = apply_overrides(Outer(), ["inner.eps=4/255", "inner.steps=10", "inner.start=false", "stages=eda,randaug",
                                    "limit=7"])
    assert cfg.inner == Inner(eps=4 / 255, steps=10, start=False)
    assert cfg.stages == ("eda", "randaug") and cfg.limit == 7
    assert apply_overrides(cfg, ["limit=none"]).limit is None


def test_overrides_are_applied_together_then_validated_once():
    # Each change alone would be invalid for one moment (matplus without stages); together they are fine.
    assert apply_overrides(Outer(), ["name=matplus", "stages=eda"]).stages == ("eda",)
    with pytest.raises(ValueError, match="needs stages"):
        apply_overrides(Outer(), ["name=matplus"])
    with pytest.raises(ValueError, match="steps=0"):
        apply_overrides(Outer(), ["inner.steps=0"])


@pytest.mark.parametrize("assignment, message", [
    ("inner.nope=1", r"no option 'nope' in inner; options: eps, start, steps"),
    ("nope=1", r"no option 'nope'"),
    ("inner.steps=ten", r"inner.steps='ten': not a valid int"),
    ("inner=3", r"group of options"),
    ("name.x=3", r"single option"),
    ("steps", r"expected name=value"),
])
def test_bad_overrides_name_the_problem(assignment, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(Outer(), [assignment])


def test_dict_round_trip_and_strictness():
    cfg = Outer(name="x", stages=("eda",), limit=3, inner=Inner(steps=5))
    payload = json.loads(json.dumps(to_dict(cfg)))
    assert payload["stages"] == ["eda"]
    assert from_dict(Outer, payload) == cfg
    with pytest.raises(ValueError, match="unknown option.*typo"):
        from_dict(Outer, {**payload, "typo": 1})
    with pytest.raises(ValueError, match=r"inner: unknown option.*typo"):
        from_dict(Outer, {**payload, "inner": {"typo": 1}})


def test_saved_config_replays_with_its_resolved_values_skipped(tmp_path):
    cfg = Outer(name="x", inner=Inner(eps=0.01))
    path = save_config(cfg, tmp_path / "config.json", resolved={"precision": "bf16"})
    assert json.loads(path.read_text())["resolved"] == {"precision": "bf16"}
    assert load_config(Outer, path) == cfg
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("name: y\ninner:\n  steps: 4\nstages: [eda]\n")
    assert load_config(Outer, yaml_path) == Outer(name="y", stages=("eda",), inner=Inner(steps=4))


def test_build_config_precedence(tmp_path):
    (tmp_path / "run.yaml").write_text("name: from-file\nlimit: 5\n")
    cfg = build_config(Outer, tmp_path / "run.yaml", {"limit": 9, "name": None}, ["inner.steps=3"])
    assert (cfg.name, cfg.limit, cfg.inner.steps) == ("from-file", 9, 3)


def test_build_config_validates_once_after_merging(tmp_path):
    # The file alone is invalid (matplus without stages); the --set completes it.
    (tmp_path / "run.yaml").write_text("name: matplus\n")
    assert build_config(Outer, tmp_path / "run.yaml", {}, ["stages=eda"]).stages == ("eda",)
    with pytest.raises(ValueError, match="needs stages"):
        build_config(Outer, tmp_path / "run.yaml")
    (tmp_path / "typo.yaml").write_text("nmae: x\n")
    with pytest.raises(ValueError, match="typo.yaml: unknown option"):
        build_config(Outer, tmp_path / "typo.yaml")


def test_bad_config_files_say_which_file(tmp_path):
    with pytest.raises(ValueError, match="missing.yaml"):
        load_config(Outer, tmp_path / "missing.yaml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_config(Outer, tmp_path / "bad.json")


def test_option_names_expand_groups():
    assert option_names(Outer) == ["name", "stages", "limit", "inner.eps", "inner.steps", "inner.start"]


@pytest.mark.parametrize("text, message", [
    ("inner:\n  eps: true\n", r"inner.eps=True: expected a number"),
    ("inner:\n  steps: 2.5\n", r"inner.steps=2.5: expected an integer"),
    ("inner:\n  steps: [1, 2]\n", r"inner.steps=\[1, 2\]: expected an integer"),
    ("inner:\n  steps: true\n", r"inner.steps=True: expected an integer"),
    ("inner:\n  start: 1\n", r"inner.start=1: expected true or false"),
    ("name: 3\n", r"name=3: expected a string"),
    ("stages: [eda, 4]\n", r"stages=4: expected a string"),
    ("limit: {a: 1}\n", r"limit=\{'a': 1\}: expected an integer"),
    ("inner:\n  eps: .inf\n", r"inner.eps=inf: must be a finite number"),
    ("inner:\n  eps: .nan\n", r"inner.eps=nan: must be a finite number"),
])
def test_config_files_with_a_value_of_the_wrong_type_name_the_field(tmp_path, text, message):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ValueError, match=f"run.yaml: {message}"):
        load_config(Outer, tmp_path / "run.yaml")
    with pytest.raises(ValueError, match=message):
        build_config(Outer, tmp_path / "run.yaml")


@pytest.mark.parametrize("assignment, message", [
    ("inner.eps=inf", r"inner.eps=inf: must be a finite number"),
    ("inner.eps=nan", r"inner.eps=nan: must be a finite number"),
    ("inner.eps=-1e999", r"inner.eps=-inf: must be a finite number"),
])
def test_non_finite_overrides_are_refused(assignment, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(Outer(), [assignment])


def test_a_real_training_config_refuses_lr_true_and_fractional_steps():
    from pipeline.train.config import TrainConfig

    with pytest.raises(ValueError, match=r"optim.lr=True: expected a number"):
        from_dict(TrainConfig, {"optim": {"lr": True}})
    with pytest.raises(ValueError, match=r"steps=2.5: expected an integer"):
        from_dict(TrainConfig, {"steps": 2.5})
    with pytest.raises(ValueError, match=r"optim.lr=inf: must be a finite number"):
        build_config(TrainConfig, None, {}, ["optim.lr=inf"])


@dataclass(frozen=True)
class Free:
    options: dict = field(default_factory=dict)  # as AugmentConfig.stage_options: values of any shape


def test_config_files_are_capped_in_size_and_alias_expansion(tmp_path):
    levels = ["  a: &a [x, x, x, x, x, x, x, x, x, x]\n"]
    for i in range(1, 6):  # each level lists the previous one 10 times: 10^6 values (the real bomb: 10^9)
        name, previous = chr(97 + i), chr(96 + i)
        levels.append(f"  {name}: &{name} [{', '.join([f'*{previous}'] * 10)}]\n")
    (tmp_path / "bomb.yaml").write_text("options:\n" + "".join(levels))
    assert (tmp_path / "bomb.yaml").stat().st_size < 400
    with pytest.raises(ValueError, match=r"bomb.yaml: more than 100,000 values once its aliases are expanded"):
        to_dict(build_config(Free, tmp_path / "bomb.yaml"))
    (tmp_path / "big.yaml").write_text("name: x\n" + "# padding\n" * 200_000)
    with pytest.raises(ValueError, match=r"big.yaml: larger than 1,000,000 bytes"):
        load_config(Outer, tmp_path / "big.yaml")


# Every config with a device field, and what else it needs to build.
DEVICE_CONFIGS = [
    ("pipeline.train.config:TrainConfig", {}),
    ("pipeline.train.config:PretrainConfig", {}),
    ("pipeline.evaluation.config:EvalConfig", {}),
    ("pipeline.evaluation.config:ZeroShotConfig", {}),
    ("pipeline.study.plan:StudyConfig", {}),
    ("pipeline.augment.runner:AugmentConfig", {}),
    ("pipeline.augment.scoring:ScorerConfig", {"model": "some/clip"}),
    ("stages.t2i_sd:StableDiffusionConfig", {}),
    ("stages.i2t_internvl:InternVLCaptionConfig", {}),
]


def _config_class(target: str) -> type:
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("target, needs", DEVICE_CONFIGS)
@pytest.mark.parametrize("device", ["gpu", "tpu", "cuda0", "cuda:", "cuda:-1", "CPU", ""])
def test_every_device_field_refuses_a_name_of_no_device_at_validation(target, needs, device):
    """DEVICE=gpu: a 148-line traceback (or, in augment, silently ignored) before; now the config refuses it."""
    with pytest.raises(ValueError, match=rf"^device='{device}': choose one of auto, cpu, cuda, cuda:N \(N a GPU "
                                         r"index\), mps$"):
        from_dict(_config_class(target), {**needs, "device": device})


@pytest.mark.parametrize("target, needs", DEVICE_CONFIGS)
def test_every_device_field_takes_the_names_the_pipeline_runs_on(target, needs):
    """Whether this machine has the device is resolve_device's question, not the config's."""
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:3", "mps"):
        assert from_dict(_config_class(target), {**needs, "device": device}).device == device
