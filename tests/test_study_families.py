"""The study's defences table (pretrained, FT, TeCoA, FARE, MAT, MAT+ x clean and every attack) runs with a
CLIP= model of each family: Hugging Face CLIP, open_clip and BLIP, each a tiny model built from its config; the
trained checkpoints load back as the same family."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.attacks import ATTACKS
from pipeline.models.loading import load_model, model_family
from pipeline.study.plan import MODES, StudyConfig

# HF CLIP runs the same table in tests/test_study.py (the resumed study); the other two families here.
FAMILIES = ("open_clip", "blip")
METRICS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10")


@pytest.fixture(scope="module")
def synth_with_i2t_human(tmp_path_factory):
    """A few dozen synth images (30 % test) and the i2t-human stage, MAT+'s default."""
    from pipeline.augment.runner import AugmentConfig, run_augment
    from pipeline.core.executor import RunOptions
    from pipeline.core.paths import Layout
    from pipeline.data.ingest import IngestConfig, run_ingest
    from pipeline.data.sources import SplitFractions

    root = tmp_path_factory.mktemp("study_families")
    layout = Layout(shards_dir=root / "shards", manifests_dir=root / "manifests", runs_dir=root / "runs",
                    models_dir=root / "models")
    ingest = IngestConfig(dataset="synth", synth_size=40, shard_size=1000,
                          fractions=SplitFractions(train=0.7, val=0.0, test=0.3))
    run_ingest(ingest, layout, RunOptions(workers=1))
    run_augment(AugmentConfig(ingest=ingest, stages=("i2t-human",), scorer="none", workers=1), layout)
    assert layout.manifest_path("synth", "i2t-human").is_file()
    return layout


@pytest.mark.parametrize("family", FAMILIES)
def test_defences_table_runs_with_each_family(family, tiny_family_dirs, synth_with_i2t_human, tmp_path):
    import shutil

    from pipeline.core.paths import Layout
    from pipeline.study.run import run_study

    base = synth_with_i2t_human  # each family studies its own copy: no records shared between families
    shutil.copytree(base.manifests_dir, tmp_path / "manifests")
    layout = Layout(base.shards_dir, tmp_path / "manifests", tmp_path / "runs", tmp_path / "models")
    clip = tiny_family_dirs[family]
    assert model_family(clip) == family
    cfg = StudyConfig(dataset="synth", clip=clip, mlm=tiny_family_dirs["mlm"], steps=2, batch_size=4,
                      precision="fp32", eval_size=4, eval_batch=4, eval_steps=2, eval_top_k=2,
                      augmentation=False, resamples=20, device="cpu", workers=1, data_workers=0)
    report = run_study(cfg, layout)

    cells = {"pretrained", *(m for m in MODES if m != "matplus"), "matplus-i2t-human"}  # MAT+: its default stage
    records = {r["cell"]: r for r in report["records"]}
    assert set(records) == cells and all(r["n_images"] == 4 for r in records.values())
    for cell, record in records.items():
        assert set(record["metrics"]) == {"clean", *ATTACKS}, cell
        for attack, row in record["metrics"].items():
            values = [row[m] for m in METRICS] + ([row["tr_asr"], row["ir_asr"]] if attack != "clean" else [])
            assert all(isinstance(v, float) and math.isfinite(v) for v in values), (cell, attack, row)
            assert 0 <= row["tr_r1"] <= row["tr_r5"] <= row["tr_r10"] <= 100
    table = report["markdown"].split("## Defences", 1)[1]
    assert "nan" not in table.lower()
    # the evaluations name the family; the MAT+ cell trained on i2t-human
    evals = layout.manifests_dir / "synth" / "evals"
    for cell in cells:
        assert json.loads((evals / f"study-{cell}-s0.json").read_text())["family"] == family
    plan = json.loads((layout.manifests_dir / "synth" / "study" / "plan.json").read_text())
    matplus = next(u for u in plan["units"] if u["name"] == "train-matplus-i2t-human-s0")
    assert matplus["settings"]["data"]["stages"] == ["i2t-human"]
    # every training run's final model and its step checkpoints load back as the same family
    for cell in cells - {"pretrained"}:
        run_dir = layout.runs_dir / "study-synth" / f"{cell}-s0"
        saved = [run_dir / "clip", *sorted((run_dir / "checkpoints").glob("step-*"))]
        assert len(saved) >= 2, (mode, saved)
        for path in saved:
            model = load_model(path / "clip" if (path / "clip").is_dir() else path)
            assert model.family == family, path
