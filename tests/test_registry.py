"""The extension registry (pipeline/core/registry.py), the project's registries, and a caller asking one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.registry import Registry

ROOT = Path(__file__).resolve().parents[1]


def _registry() -> Registry:
    reg = Registry("widget")
    reg.register("plain", object(), description="needs nothing")
    reg.register("big", "json:dumps", needs={"model", "gpu"}, label="Big one", tags={"image"})
    reg.register("small", "json:loads", needs={"model"}, tags={"text"})
    return reg


def test_unknown_name_names_the_kind_and_the_valid_names():
    reg = _registry()
    for call in (reg.get, reg.load, reg.__getitem__):
        with pytest.raises(ValueError, match=r"unknown widget 'nope'; valid: plain, big, small"):
            call("nope")
    assert "nope" not in reg and "big" in reg


def test_order_needs_and_tags_filtering():
    reg = _registry()
    assert list(reg) == ["plain", "big", "small"] and len(reg) == 3
    assert reg.names() == ("plain", "big", "small")
    assert reg.names(needs={"model"}) == ("big", "small")
    assert reg.names(needs={"model", "gpu"}) == ("big",)
    assert reg.names(without={"gpu"}) == ("plain", "small")
    assert reg.names(without={"model"}) == ("plain",)
    assert reg.names(tags={"text"}) == ("small",)
    assert reg.labels() == {"plain": "plain", "big": "Big one", "small": "small"}


def test_registration_errors():
    reg = _registry()
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("big", "json:dumps")
    with pytest.raises(ValueError, match="module:attr"):
        reg.register("bad", "json.dumps")


def test_a_lazy_target_is_imported_only_by_load(tmp_path, monkeypatch):
    (tmp_path / "registry_probe_mod.py").write_text("VALUE = object()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "registry_probe_mod", raising=False)
    reg = Registry("probe")
    entry = reg.register("p", "registry_probe_mod:VALUE", needs={"x"})
    assert entry.lazy
    assert reg.names(needs={"x"}) == ("p",) and "p" in reg and reg.get("p").needs == {"x"}
    assert "registry_probe_mod" not in sys.modules  # listing, filtering and get() import nothing
    value = reg.load("p")
    assert "registry_probe_mod" in sys.modules and value is sys.modules["registry_probe_mod"].VALUE
    assert reg["p"] is value


def test_listing_the_registries_loads_no_heavy_library():
    """The CLI builds its help from every registry and config; none may import a model library or ray (nor torch:
    tests/test_cli_options.py)."""
    code = ("import sys, pipeline.commands.cli, pipeline.evaluation.report, pipeline.study.plan; "
            "print(sorted(m for m in ('transformers', 'diffusers', 'datasets', 'ray', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_the_project_registries_agree_with_their_classes():
    from pipeline.attacks import ATTACKS
    from pipeline.attacks.base import MultimodalAttack
    from pipeline.core.executor import EXECUTORS
    from pipeline.data.sources import SOURCES
    from pipeline.train.modes import MODES, Mode
    from stages import DEFAULT_STAGES, STAGES

    for name in STAGES:
        cls = STAGES[name]
        assert cls.name == name and cls.modality in STAGES.get(name).tags
    assert DEFAULT_STAGES == ("i2t-human", "eda", "randaug")  # the stages needing no downloaded model
    for name in MODES:
        assert issubclass(MODES[name], Mode) and MODES[name].name == name
    assert MODES.names(needs={"mlm"}) == ("mat", "matplus") and MODES.names(needs={"stages"}) == ("matplus",)
    for name in ATTACKS:
        assert issubclass(ATTACKS[name], MultimodalAttack)
    assert ATTACKS.names(needs={"mlm"}) == ("bert", "coattack", "sga")
    assert ATTACKS.names(tags={"image", "text"}) == ("coattack", "sga")
    assert all(callable(SOURCES[name]) for name in SOURCES)
    assert SOURCES.names(without={"data_root"}) == ("synth",)
    assert list(EXECUTORS) == ["local", "ray"]


class _Stop(Exception):
    pass


@pytest.mark.parametrize(("attacks", "mlm_declared_by", "expect_mlm"), [
    (("pgd",), None, False),
    (("pgd", "sga"), None, True),
    (("pgd",), "pgd", True),  # the declaration decides, not the attack's name
])
def test_evaluate_builds_the_mlm_only_when_a_chosen_attack_needs_it(tmp_path, monkeypatch, attacks, mlm_declared_by,
                                                                    expect_mlm):
    import pipeline.attacks
    import pipeline.evaluation.evaluate as evaluate_module
    from pipeline.core.paths import Layout

    if mlm_declared_by:
        reg = Registry("attack")
        for entry in pipeline.attacks.ATTACKS.entries():
            needs = entry.needs | {"mlm"} if entry.name == mlm_declared_by else entry.needs
            reg.register(entry.name, entry.target, needs=needs, label=entry.label, tags=entry.tags)
        monkeypatch.setattr(pipeline.attacks, "ATTACKS", reg)
        monkeypatch.setattr(evaluate_module, "ATTACKS", reg)
    loaded: list[str] = []
    monkeypatch.setattr("pipeline.models.loading.load_model", lambda path, device: "clip")
    monkeypatch.setattr("pipeline.models.hf.load_mlm", lambda path, device: loaded.append(str(path)) or "mlm")

    def stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(evaluate_module, "load_test_set", stop)
    layout = Layout(tmp_path / "shards", tmp_path / "manifests", tmp_path / "runs", tmp_path / "models")
    for folder in (tmp_path / "ckpt", layout.model_dir("synth", "mlm"), layout.base_dir("synth")):
        folder.mkdir(parents=True)  # what evaluate checks is there before it loads anything
    (layout.base_dir("synth") / "test-000000.tar").write_bytes(b"")
    cfg = evaluate_module.EvalConfig(checkpoint=str(tmp_path / "ckpt"), attacks=attacks, device="cpu", report_to=())
    with pytest.raises(_Stop):
        evaluate_module.evaluate(cfg, layout)
    assert loaded == ([str(layout.model_dir("synth", "mlm"))] if expect_mlm else [])
