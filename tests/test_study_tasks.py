"""The study's task axis (STUDY_TASKS): the defences evaluated on captioning and grounding too, one table and
the paper's two claims per task, with intervals over images / expressions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.study.plan import Cell, StudyConfig
from pipeline.study.tasks import ItemScores, task_section

CELLS = [Cell("pretrained", "pretrained", tables=("defences",)), Cell("tecoa", "tecoa", tables=("defences",)),
         Cell("mat", "mat", tables=("defences",)), Cell("matplus", "matplus", tables=("defences",))]


def _scores(hits: dict[str, float], n: int = 60) -> dict[str, dict[int, dict[str, ItemScores]]]:
    """cell -> seed 0 -> attack -> 0/100 hits, a share `hits[cell]` of the items right under every attack."""
    rng = np.random.default_rng(0)
    return {cell: {0: {a: ItemScores(100.0 * (rng.random(n) < share)) for a in ("clean", "coattack", "sga")}}
            for cell, share in hits.items()}


def test_the_claims_follow_the_per_item_scores():
    markdown, part = task_section("grounding", CELLS, _scores({"pretrained": 0.2, "tecoa": 0.2, "mat": 0.8, "matplus": 0.8}),
                                  resamples=200, level=0.95)
    verdicts = {c["claim"].split(": ", 1)[1]: c["verdict"] for c in part["claims"]}
    assert verdicts == {"MAT beats unimodal defences under multimodal attacks": "supports",
                        "one-to-many augmentation (MAT+) helps over MAT": "cannot decide"}
    mat = next(r for r in part["rows"] if r["cell"] == "mat")["coattack"]
    assert mat["low"] <= mat["point"] <= mat["high"] and 65 < mat["point"] < 95
    assert "## Grounding" in markdown and markdown.count("\n| ") == len(CELLS) + 1
    _, worse = task_section("grounding", CELLS, _scores({"pretrained": 0.2, "tecoa": 0.8, "mat": 0.2, "matplus": 0.2}),
                            resamples=200, level=0.95)
    assert worse["claims"][0]["verdict"] == "contradicts"


def test_cells_on_different_test_sets_are_refused():
    scores = _scores({"tecoa": 0.5, "mat": 0.5})
    scores["mat"][0] = {a: ItemScores(s.values[:-1]) for a, s in scores["mat"][0].items()}
    with pytest.raises(ValueError, match="different test sets"):
        task_section("captioning", CELLS, scores, resamples=50, level=0.95)


def test_other_tasks_need_a_blip(tmp_path, tiny_model_dirs):
    from pipeline.core.paths import Layout
    from pipeline.study.tasks import check_tasks

    layout = Layout(tmp_path / "s", tmp_path / "m", tmp_path / "r", tmp_path / "models")
    cfg = StudyConfig(clip=tiny_model_dirs["clip"], tasks=("retrieval", "grounding"))
    with pytest.raises(ValueError, match="needs a BLIP"):
        check_tasks(cfg, cfg.clip, layout)
    with pytest.raises(ValueError, match="tasks"):
        StudyConfig(tasks=("retrieval", "segmentation"))


@pytest.fixture(scope="module")
def blip_study(tmp_path_factory, tiny_model_dirs):
    """A tiny study of a tiny BLIP on synth with every task: FT, TeCoA, MAT, 1 step each, 12 test images."""
    from transformers import AutoTokenizer

    from conftest import tiny_blip
    from pipeline.core.executor import RunOptions
    from pipeline.core.paths import Layout
    from pipeline.data.ingest import IngestConfig, run_ingest
    from pipeline.study.run import run_study
    from pipeline.train.captioner import build_captioner_for

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tasks")
    layout = Layout(root / "shards", root / "manifests", root / "runs", root / "models")
    run_ingest(IngestConfig(dataset="synth", synth_size=120, shard_size=1000), layout, RunOptions(workers=1))
    torch.manual_seed(0)
    blip = tiny_blip(AutoTokenizer.from_pretrained(tiny_model_dirs["mlm"]))
    blip_dir = str(blip.save(root / "blip"))
    build_captioner_for(blip).save(layout.model_dir("synth", "blip-captioning"))
    cfg = StudyConfig(dataset="synth", clip=blip_dir, mlm=tiny_model_dirs["mlm"], modes=("ft", "tecoa", "mat"),
                      steps=1, batch_size=8, precision="fp32", eval_size=6, eval_batch=8, eval_steps=1,
                      attacks=("pgd",), augmentation=False, resamples=50, data_workers=0, device="cpu",
                      tasks=("retrieval", "captioning", "grounding"))
    import pipeline.evaluation.caption_metrics as metrics

    java = metrics.java_available
    metrics.java_available = lambda: False  # METEOR's java start (20 s per evaluation) is not what is tested here
    try:
        run_study(cfg, layout)
    finally:
        metrics.java_available = java
        torch.set_num_threads(threads)
    return layout.study_dir("synth")


def test_the_study_has_a_table_and_claims_per_task(blip_study):
    report = json.loads((blip_study / "report.json").read_text())
    assert set(report["tasks"]) == {"captioning", "grounding"}
    for task, attacks in (("captioning", {"clean", "pgd-lm", "pgd", "coattack", "sga"}),
                          ("grounding", {"clean", "pgd", "coattack", "sga"})):
        part = report["tasks"][task]
        assert [r["cell"] for r in part["rows"]] == ["pretrained", "ft", "tecoa", "mat"]
        assert all(set(r) >= attacks for r in part["rows"])
        assert [c["verdict"] for c in part["claims"]][1] == "cannot decide"  # no MAT+ in this study
    markdown = (blip_study / "report.md").read_text()
    assert "## Captioning" in markdown and "## Grounding" in markdown and "## Defences" in markdown
    units = {p.stem for p in (blip_study / "units").glob("eval-*.json")}
    assert {f"eval-{t}-{c}-s0" for t in ("captioning", "grounding") for c in ("pretrained", "ft", "tecoa", "mat")} <= units
