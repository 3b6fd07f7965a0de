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
