"""The study: statistics on known inputs, claims that follow from the numbers, and a plan that resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluation.bootstrap import Bootstrap, Outcomes
from pipeline.study.plan import Cell, StudyConfig, plan_cells
from pipeline.study.report import CONTRADICTS, SUPPORTS, UNDECIDED, CellResult, build_study_report, mean_r1, recall

N_IMAGES, CAPTIONS = 300, 2


def planted(p: float, seed: int, n: int = N_IMAGES) -> Outcomes:
    """Outcomes where each image's TR and each caption's IR is a hit at R@1 with probability p (else rank 10)."""
    rng = np.random.default_rng(seed)
    return Outcomes(np.where(rng.random(n) < p, 0, 10), np.where(rng.random(n * CAPTIONS) < p, 0, 10),
                    np.repeat(np.arange(n), CAPTIONS))


def permuted(o: Outcomes, seed: int) -> Outcomes:
    """The same per-image results given to other images: the same recall, no real difference."""
    order = np.random.default_rng(seed).permutation(o.n_images)
    ir = o.ir_rank.reshape(o.n_images, CAPTIONS)[order].ravel()
    return Outcomes(o.tr_rank[order], ir, o.owner)


# ------------------------------------------------------------------ statistics


def test_interval_of_a_constant_is_zero_width():
    boot = Bootstrap(N_IMAGES, n_resamples=200)
    all_hit = {"clean": Outcomes(np.zeros(N_IMAGES, int), np.zeros(N_IMAGES * CAPTIONS, int),
                                 np.repeat(np.arange(N_IMAGES), CAPTIONS))}
    for side in ("tr", "ir"):
        stat = recall("clean", side, 1)
        iv = boot.interval(boot.point([all_hit], stat), boot.replicates([all_hit], stat, "c"))
        assert (iv.point, iv.low, iv.high) == (100.0, 100.0, 100.0)


def test_point_is_the_plain_recall_and_the_interval_holds_it():
    boot = Bootstrap(N_IMAGES, n_resamples=300)
    o = {"clean": planted(0.6, seed=1)}
    stat = recall("clean", "ir", 1)
    iv = boot.interval(boot.point([o], stat), boot.replicates([o], stat, "c"))
    assert iv.point == pytest.approx(100 * (o["clean"].ir_rank == 0).mean())
    assert iv.low < iv.point < iv.high and iv.high - iv.low < 15


def _difference(a: Outcomes, b: Outcomes):
    from pipeline.study.report import Study

    cells = [CellResult(Cell(name, "mat", attacks=("sga",)), {0: {"clean": o, "sga": o}}) for name, o in (("a", a), ("b", b))]
    return Study(cells, resamples=500).difference(["a"], ["b"], "robust", mean_r1(("sga",)))


def test_a_planted_difference_is_detected():
    iv = _difference(planted(0.6, seed=1), planted(0.4, seed=2))
    assert iv.point > 10 and iv.excludes_zero and iv.sign == 1


def test_a_null_difference_is_not():
    a = planted(0.5, seed=3)
    same = _difference(a, a)
    assert (same.point, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero
    shuffled = _difference(a, permuted(a, seed=4))
    assert shuffled.point == pytest.approx(0.0) and not shuffled.excludes_zero


def test_seeds_widen_the_interval():
    """Two seeds far apart: the two-level bootstrap's interval covers the seed spread, one seed's does not."""
    from pipeline.study.report import Study

    low, high = planted(0.3, seed=5), planted(0.7, seed=6)
    one = Study([CellResult(Cell("c", "mat"), {0: {"clean": low}})], resamples=500)
    two = Study([CellResult(Cell("c", "mat"), {0: {"clean": low}, 1: {"clean": high}})], resamples=500)
    stat = recall("clean", "tr", 1)
    assert two.value("c", "tr", stat).high - two.value("c", "tr", stat).low > \
        2 * (one.value("c", "tr", stat).high - one.value("c", "tr", stat).low)
    assert two.spread("c", stat) > 20 and one.spread("c", stat) is None


def test_asr_at_r5_and_r10_count_clean_hits_at_k_pushed_out(tmp_path):
    rng = np.random.default_rng(12)
    clean = Outcomes(rng.integers(0, 11, N_IMAGES), rng.integers(0, 11, N_IMAGES * CAPTIONS),
                     np.repeat(np.arange(N_IMAGES), CAPTIONS))
    adv = Outcomes(rng.integers(0, 11, N_IMAGES), rng.integers(0, 11, N_IMAGES * CAPTIONS), clean.owner)
    cell = CellResult(Cell("mat", "mat", steps=10, tables=("defences",), attacks=("sga",)), {0: {"clean": clean, "sga": adv}})
    report = build_study_report([cell], {}, StudyConfig(resamples=50, augmentation=False), tmp_path)
    metrics = report["records"][0]["metrics"]["sga"]
    for side, before, after in (("tr", clean.tr_rank, adv.tr_rank), ("ir", clean.ir_rank, adv.ir_rank)):
        for k in (5, 10):
            hits = before < k
            assert metrics[f"{side}_asr_r{k}"] == pytest.approx(100 * (hits & (after >= k)).sum() / hits.sum())
    row = next(line for line in report["markdown"].splitlines() if line.startswith("| MAT | SGA"))
    tr = f"{metrics['tr_asr']:.1f} / {metrics['tr_asr_r5']:.1f} / {metrics['tr_asr_r10']:.1f}"
    assert tr in row


# ------------------------------------------------------------------ claims follow from the numbers

ATTACKS = ("coattack", "sga")


def _cells(robust: dict[str, float], clean: float = 0.9, seed: int = 0) -> list[CellResult]:
    results = []
    for i, (mode, p) in enumerate(robust.items()):
        outcomes = {"clean": planted(clean, seed + 100 + i), **{a: planted(p, seed + 10 * i + j) for j, a in enumerate(ATTACKS)}}
        results.append(CellResult(Cell(mode, mode, steps=0 if mode == "pretrained" else 10, tables=("defences",),
                                       attacks=ATTACKS), {0: outcomes}))
    return results


def _claim(report: dict, start: str) -> dict:
    return next(c for c in report["claims"] if c["claim"].startswith(start))


def _report(results, tmp_path, **cfg):
    return build_study_report(results, {}, StudyConfig(resamples=400, **cfg), tmp_path)


def test_mat_significantly_above_tecoa_supports_the_claim(tmp_path):
    report = _report(_cells({"pretrained": 0.1, "tecoa": 0.2, "mat": 0.5}), tmp_path)
    assert _claim(report, "multimodal")["verdict"] == SUPPORTS and not report["meaningless"]
    assert "**supports**: multimodal" in (tmp_path / "report.md").read_text()
    assert _claim(report, "one-to-many")["verdict"] == UNDECIDED  # no MAT+ cell: nothing to compare


def test_reversed_contradicts(tmp_path):
    assert _claim(_report(_cells({"tecoa": 0.5, "mat": 0.2}), tmp_path), "multimodal")["verdict"] == CONTRADICTS


def test_overlapping_cannot_decide(tmp_path):
    results = _cells({"tecoa": 0.4, "mat": 0.4})
    mat = results[1].seeds[0]
    results[1].seeds[0] = {a: permuted(results[0].seeds[0][a], seed=9) if a != "clean" else o for a, o in mat.items()}
    claim = _claim(_report(results, tmp_path), "multimodal")
    assert claim["verdict"] == UNDECIDED and "within noise" in claim["why"]


def test_near_chance_clean_retrieval_is_called_meaningless(tmp_path):
    # R@1 chance is 1/300 = 0.33 %; clean hits at 0.5 % sit below 3x chance, robust differences are planted large
    report = _report(_cells({"tecoa": 0.0, "mat": 0.2}, clean=0.005), tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert report["meaningless"] and "robustness comparison is meaningless" in text
    assert all(c["verdict"] == UNDECIDED for c in report["claims"])


def _augmentation_cells() -> tuple[list[CellResult], dict[str, dict]]:
    """MAT and four single-stage MAT+ cells whose gains are planted to rise with alignment and diversity and fall
    with Frechet distance, with their stage statistics."""
    gains = {"eda": 0.3, "randaug": 0.4, "i2t-human": 0.55, "t2i-sd": 0.7}  # robust hit rates; MAT at 0.2
    cells = [CellResult(Cell("mat", "mat", tables=("augmentation",), attacks=ATTACKS),
                        {0: {"clean": planted(0.9, 1), **{a: planted(0.2, 2 + j) for j, a in enumerate(ATTACKS)}}})]
    stats = {}
    for i, (stage, p) in enumerate(gains.items()):
        cells.append(CellResult(Cell(f"matplus-{stage}", "matplus", (stage,), tables=("augmentation",), attacks=ATTACKS),
                                {0: {"clean": planted(0.9, 20 + i), **{a: planted(p, 30 + 2 * i + j) for j, a in enumerate(ATTACKS)}}}))
        modality = "image" if stage in ("randaug", "t2i-sd") else "text"
        stats[stage] = {"alignment_mean": 0.3 + 0.1 * i, "diversity_mean": 0.2 + 0.05 * i, f"fd_{modality}": 0.5 - 0.1 * i}
    return cells, stats


def test_augmentation_quality_claim_and_figure(tmp_path):
    """Gains planted to rise with alignment and diversity and fall with Frechet distance: supported, and the
    figure is drawn; the cross- vs intra-modal claim follows the planted gains too."""
    cells, stats = _augmentation_cells()
    report = build_study_report(cells, stats, StudyConfig(resamples=400), tmp_path)
    assert _claim(report, "good augmentations")["verdict"] == SUPPORTS
    assert _claim(report, "cross-modal")["verdict"] == SUPPORTS  # i2t-human, t2i-sd above eda, randaug
    assert _claim(report, "text augmentations")["verdict"] == CONTRADICTS  # text (0.3, 0.55) below image (0.4, 0.7)
    assert (tmp_path / "augmentation_quality.png").stat().st_size > 0
    rows = {r["cell"]: r for r in report["augmentation"]}
    assert rows["matplus-randaug"]["pairing"] == "N:1" and rows["matplus-eda"]["pairing"] == "1:N"
    assert rows["mat"]["gain"] is None and rows["matplus-t2i-sd"]["gain"]["low"] > 0


# ------------------------------------------------------------------ the plan


def test_plan_merges_shared_cells_and_gives_each_stage_its_pairing():
    cfg = StudyConfig(modes=("tecoa", "mat", "matplus"), steps=50, attacks=("pgd", "sga"))
    cells = {c.id: c for c in plan_cells(cfg, ["i2t-human", "eda", "randaug"])}
    assert set(cells) == {"pretrained", "tecoa", "mat", "matplus-i2t-human", "matplus-eda", "matplus-randaug",
                          "matplus-eda_randaug"}
    assert cells["mat"].tables == ("defences", "augmentation") and cells["mat"].attacks == ("pgd", "sga")
    assert cells["matplus-eda"].attacks == ("sga",)  # augmentation cells: the multimodal attacks only
    assert [cells[c].pairing for c in ("matplus-eda", "matplus-randaug", "matplus-eda_randaug")] == ["1:N", "N:1", "N:N"]
    fewer = {c.id for c in plan_cells(StudyConfig(modes=("mat",), steps=50, aug_steps=20, combos=()), ["eda"])}
    assert fewer == {"pretrained", "mat", "mat-20steps", "matplus-eda-20steps"}  # MAT baseline at the same steps


@pytest.mark.parametrize("dataset, clip, steps, expected", [
    ("coco", "openai/clip-vit-base-patch16", None, 10_000), ("flickr30k", "openai/clip-vit-base-patch16", None, 5_000),
    ("coco", None, None, 2000), ("synth", "some/clip", None, 2000), ("coco", "some/clip", 300, 300)])
def test_a_released_clip_trains_the_papers_budget_on_coco_and_flickr30k(dataset, clip, steps, expected):
    cfg = StudyConfig(dataset=dataset, clip=clip, steps=steps, modes=("ft", "mat"), mode_steps=(("ft", 7),))
    trained = {c.id: c.steps for c in plan_cells(cfg, []) if c.mode != "pretrained"}
    assert trained["mat"] == expected and trained["ft"] == 7  # per-mode steps still win
    assert ("paper's budget" in cfg.steps_source) == (steps is None and expected != 2000)


@pytest.mark.parametrize("change", [{"seeds": 0}, {"modes": ("nope",)}, {"attacks": ("pgd", "x")}, {"eval_size": 1},
                                    {"dataset": "../x"}, {"eval_steps": 0}])
def test_bad_config_raises(change):
    with pytest.raises(ValueError):
        StudyConfig(**change)


@pytest.fixture()
def toy_layout(tmp_path, tiny_model_dirs):
    from pipeline.core.paths import Layout
    from pipeline.train.toy import write_toy_shards

    write_toy_shards(tmp_path / "shards", "toy", shards=1, per_shard=16)
    write_toy_shards(tmp_path / "shards", "toy", shards=1, per_shard=8, split="test", seed=1)
    return Layout(tmp_path / "shards", tmp_path / "manifests", tmp_path / "runs", tmp_path / "models")


def test_a_study_on_a_gpu_this_machine_lacks_stops_before_its_plan(toy_layout, monkeypatch):
    """DEVICE=cuda without a GPU: the plan was written and the first unit failed, before."""
    import torch

    from pipeline.study.run import run_study

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device='cuda': .*; devices: auto, cpu"):
        run_study(StudyConfig(dataset="toy", device="cuda"), toy_layout)
    assert not toy_layout.manifests_dir.exists()


def _study(layout, tiny_model_dirs, steps: int) -> subprocess.Popen:
    env = {**os.environ, "MAT_SHARDS_DIR": str(layout.shards_dir), "MAT_MANIFESTS_DIR": str(layout.manifests_dir),
           "MAT_RUNS_DIR": str(layout.runs_dir), "MAT_MODELS_DIR": str(layout.models_dir), "MAT_PRECISION": "fp32"}
    argv = [sys.executable, "-m", "pipeline", "study", "--dataset", "toy", "--clip", tiny_model_dirs["clip"],
            "--mlm", tiny_model_dirs["mlm"], "--modes", "ft", "--steps", str(steps), "--batch-size", "8",
            "--eval-size", "8", "--attacks", "pgd", "--no-augmentation", "--resamples", "50",
            "--data-workers", "0", "--device", "cpu"]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_killed_study_resumes_without_redoing_done_units(toy_layout, tiny_model_dirs):
    units = toy_layout.manifests_dir / "toy" / "study" / "units"
    first = units / "eval-pretrained-s0.json"
    proc = _study(toy_layout, tiny_model_dirs, steps=40)
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), proc.stdout.read()
    assert not (units / "train-ft-s0.json").exists()  # killed while training: the plan was not finished
    done_at = first.stat().st_mtime_ns
    eval_json = toy_layout.manifests_dir / "toy" / "evals" / "study-pretrained-s0.json"
    eval_at = eval_json.stat().st_mtime_ns
    rerun = _study(toy_layout, tiny_model_dirs, steps=40)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    assert "eval-pretrained-s0: done" in out and "train-ft-s0: ran" in out
    assert first.stat().st_mtime_ns == done_at and eval_json.stat().st_mtime_ns == eval_at
    report = json.loads((toy_layout.manifests_dir / "toy" / "study" / "report.json").read_text())
    assert {(r["cell"], r["seed"]) for r in report["records"]} == {("pretrained", 0), ("ft", 0)}
    plan = json.loads((toy_layout.manifests_dir / "toy" / "study" / "plan.json").read_text())
    assert [u["name"] for u in plan["units"]] == ["eval-pretrained-s0", "train-ft-s0", "eval-ft-s0"]
    assert (toy_layout.runs_dir / "study-toy" / "ft-s0" / "tensorboard").is_dir()  # the study's default trackers
    assert (toy_layout.manifests_dir / "toy" / "study" / "defences.csv").is_file()
    # a changed budget is a new fingerprint: the training reruns (its old folder set aside), the pretrained eval not
    again = _study(toy_layout, tiny_model_dirs, steps=3)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    assert "eval-pretrained-s0: done" in out and "train-ft-s0: ran" in out and "eval-ft-s0: ran" in out
    assert any(p.name.startswith("ft-s0.stale-") for p in (toy_layout.runs_dir / "study-toy").iterdir())


def test_eval_takes_several_checkpoints(monkeypatch, tmp_path):
    """`make eval CKPT=a,b` runs one evaluation per checkpoint; EVAL_NAME with several is refused."""
    from typer.testing import CliRunner

    import pipeline.evaluation.evaluate as evaluate
    from pipeline.commands.cli import app

    seen = []

    def fake(cfg, layout):
        seen.append(cfg.checkpoint)
        row = {k: 0.0 for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "tr_asr", "ir_asr")}
        return {"name": Path(cfg.checkpoint).name, "metrics": {"clean": row}}

    monkeypatch.setattr(evaluate, "evaluate", fake)
    result = CliRunner().invoke(app, ["eval", "--ckpt", "runs/a, runs/b", "--attacks", ""])
    assert result.exit_code == 0, result.output
    assert seen == ["runs/a", "runs/b"] and result.output.count("clean") == 2
    refused = CliRunner().invoke(app, ["eval", "--ckpt", "runs/a,runs/b", "--name", "one"])
    assert refused.exit_code == 2 and "EVAL_NAME" in refused.output and seen == ["runs/a", "runs/b"]


def test_time_left_uses_the_rates_measured_so_far():
    from pipeline.study.run import Unit, _time_left

    left = [Unit("t", "train", {}, Path("x"), cost=30.0), Unit("e", "eval", {}, Path("y"), cost=60.0),
            Unit("a", "augment", {}, Path("z"), cost=1e6, prepare=True)]
    assert "known after" in _time_left(left, {"augment": [300.0, 90.0]})
    # 2 s per cost unit measured on training; evaluation not yet run takes the same; an unmeasured prepare unit
    # adds nothing: (30 + 60) * 2 s = 3 min
    assert _time_left(left, {"train": [10.0, 20.0]}) == "about 3.0 min left"
    assert _time_left([], {}) == "nothing left"


def test_plan_evaluates_on_val_when_there_is_no_test_split(tmp_path):
    from pipeline.core.paths import Layout
    from pipeline.study.run import build_plan
    from pipeline.train.toy import write_toy_shards

    write_toy_shards(tmp_path / "shards", "toy", shards=1, per_shard=4, split="val")
    layout = Layout(tmp_path / "shards", tmp_path / "manifests", tmp_path / "runs", tmp_path / "models")
    cells, units = build_plan(StudyConfig(dataset="toy", clip="some/clip", modes=("ft",), augmentation=False), layout)
    assert [u.name for u in units] == ["eval-pretrained-s0", "train-ft-s0", "eval-ft-s0"]
    assert {u.settings["split"] for u in units if u.kind == "eval"} == {"val"}
    _, units = build_plan(StudyConfig(dataset="toy", clip="c", modes=("ft",), augmentation=False, eval_split="train"), layout)
    assert {u.settings["split"] for u in units if u.kind == "eval"} == {"train"}


def test_training_units_keep_the_fingerprint_they_had_before_the_attack_configs():
    """The attack settings became PGD / BERTAttack objects; a study's default-attack units still match their
    records (this hash is the one the former flat AttackConfig gave), so finished trainings are not redone."""
    import dataclasses

    from pipeline.core.config import apply_overrides
    from pipeline.evaluation.resume import fingerprint
    from pipeline.study.run import train_settings
    from pipeline.train.config import DataConfig, OptimConfig, TrainConfig

    tcfg = TrainConfig(mode="matplus", dataset="toy", clip="c", mlm="m", steps=7, batch_size=8, precision="fp32",
                       seed=1, device="cpu", run_dir="r", report_to=(), optim=OptimConfig(lr=1e-5),
                       data=DataConfig(stages=("i2t-human",), num_workers=0))
    # training's text attack was the fast variant then: units trained with it keep their fingerprints
    fast = apply_overrides(tcfg, ["attack.text.variant=fast"])
    assert fingerprint(train_settings(fast)) == "a4ae368ba6993730c86c4a6c3c5cf19022494a91844e37cca68b95db0c987da5"
    # ... but a MAT+ unit made with it is stale under today's default (the reference attack), while a mode that
    # attacks no text keeps its fingerprint
    assert train_settings(tcfg)["attack"]["text"]["variant"] == "reference"
    ft = dataclasses.replace(tcfg, mode="ft", data=DataConfig(num_workers=0))
    assert train_settings(ft) == train_settings(dataclasses.replace(fast, mode="ft", data=DataConfig(num_workers=0)))
    assert train_settings(ft)["attack"] == train_settings(fast)["attack"]
    changed = apply_overrides(tcfg, ["attack.text.mlm_threshold=0.5"])
    assert train_settings(changed)["attack"]["text"]["mlm_threshold"] == 0.5  # other attacks: their full settings


def test_study_train_set_reaches_every_training_cell(tmp_path):
    from pipeline.core.paths import Layout
    from pipeline.study.run import LEGACY_DEFAULT_ATTACK, build_plan
    from pipeline.train.toy import write_toy_shards

    write_toy_shards(tmp_path / "shards", "toy", shards=1, per_shard=4, split="test")
    layout = Layout(tmp_path / "shards", tmp_path / "manifests", tmp_path / "runs", tmp_path / "models")
    cfg = StudyConfig(dataset="toy", clip="c", mlm="m", modes=("ft", "mat"), augmentation=False,
                      train_set=("attack.text.variant=fast",))
    _, units = build_plan(cfg, layout)
    trained = [u for u in units if u.kind == "train"]
    assert trained and all(u.settings["attack"] == LEGACY_DEFAULT_ATTACK for u in trained)
    import dataclasses

    _, units = build_plan(dataclasses.replace(cfg, train_set=()), layout)
    assert [u.settings["attack"]["text"]["variant"] for u in units if u.kind == "train" and "mat" in u.name] == ["reference"]


def test_study_trackers_reach_every_training_cell_and_keep_the_fingerprints(tmp_path, monkeypatch):
    """REPORT_TO of the study reaches each training run's TrainConfig (TensorBoard by default, as `make train`),
    while the units' fingerprints stay those the study had when it trained with no trackers: a study resumed
    after the option came, or rerun with other trackers, retrains nothing."""
    import pipeline.train.main
    from pipeline.core.paths import Layout
    from pipeline.evaluation.resume import fingerprint
    from pipeline.study.run import build_plan
    from pipeline.train.toy import write_toy_shards

    write_toy_shards(tmp_path / "shards", "toy", shards=1, per_shard=4, split="test")
    layout = Layout(tmp_path / "shards", tmp_path / "manifests", tmp_path / "runs", tmp_path / "models")
    trained: list = []
    monkeypatch.setattr(pipeline.train.main, "train", lambda tcfg, layout: trained.append(tcfg))

    def plan(**change):
        cfg = StudyConfig(dataset="toy", clip="c", mlm="m", modes=("ft", "mat"), augmentation=False, **change)
        units = [u for u in build_plan(cfg, layout)[1] if u.kind == "train"]
        trained.clear()
        for unit in units:
            unit.run()
        return {u.name: fingerprint(u.settings) for u in units}, [t.report_to for t in trained]

    default, reporters = plan()
    assert StudyConfig().report_to == ("tensorboard",) and reporters == [("tensorboard",)] * 2
    none, reporters = plan(report_to=())
    assert reporters == [(), ()] and none == default
    assert plan(report_to=("tensorboard",), wandb_mode="online")[0] == default
    # the fingerprints these units had before the option existed (the study then trained with report_to=())
    assert default == {"train-ft-s0": "b501f9e7a5ac44e51ee11a4a0e59d76ccd0ce6b738c27cad649a840551549644",
                       "train-mat-s0": "12c774ba028d5cf9287c8a23408456fb92fd07355f1813ce4e7ce9e50532850a"}
    with pytest.raises(ValueError, match="report_to"):
        StudyConfig(report_to=("tensorbord",))


def _csv(path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _same(field: str, value) -> bool:
    return field == ("" if value is None else "+".join(map(str, value)) if isinstance(value, list) else str(value))


def test_study_tables_as_csv_hold_the_json_numbers(tmp_path):
    """defences.csv and augmentation.csv: the rows of report.json's `defences` and `augmentation` tables, our metric
    keys under CLIP_benchmark's column names (pipeline/evaluation/columns.py), the same numbers; a cell's points
    are those of its per-seed records (one seed), with intervals and the spread of several seeds."""
    from pipeline.core.ledger import is_recorded
    from pipeline.evaluation.columns import column

    cells, stats = _augmentation_cells()
    seeds = {s: {"clean": planted(0.9, 60 + s), **{a: planted(0.4, 70 + 2 * s + j) for j, a in enumerate(ATTACKS)}}
             for s in range(2)}
    cells += [*_cells({"pretrained": 0.1, "tecoa": 0.2}), CellResult(Cell("ft", "ft", steps=10, tables=("defences",),
                                                                           attacks=ATTACKS), seeds)]
    report = build_study_report(cells, stats, StudyConfig(resamples=100, seeds=2), tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    defences, augmentation = _csv(tmp_path / "defences.csv"), _csv(tmp_path / "augmentation.csv")
    assert {"text_retrieval_recall@1", "text_retrieval_recall@1_ci_low", "text_retrieval_recall@1_seed_sd",
            "image_retrieval_recall@10", "image_retrieval_asr@5"} <= set(defences[0])
    assert {"robust_mean_recall@1", "robust_mean_recall@1_gain_over_mat_ci_high"} <= set(augmentation[0])
    assert len(defences) == len(saved["defences"]) == 3 * (1 + len(ATTACKS))
    for row, record in zip(defences, saved["defences"]):
        assert all(_same(row[column(k)], v) for k, v in record.items()), record
    by_cell = {(r["cell"], r["attack"]): r for r in saved["defences"]}
    per_seed = {(r["cell"], r["seed"]): r["metrics"] for r in saved["records"]}
    for (cell, attack), row in by_cell.items():  # one seed: the points are that seed's metrics
        if cell != "ft":
            metrics = per_seed[(cell, 0)][attack]
            assert {k: row[k] for k in metrics} == pytest.approx(metrics, rel=1e-12), (cell, attack)
    assert by_cell[("tecoa", "clean")]["tr_asr"] is None and by_cell[("tecoa", "sga")]["tr_r1_sd"] is None
    ft = by_cell[("ft", "sga")]
    assert ft["seeds"] == 2 and ft["tr_r1_sd"] > 0 and ft["tr_r1_low"] <= ft["tr_r1"] <= ft["tr_r1_high"]
    assert np.isclose(ft["ir_r5"], np.mean([per_seed[("ft", s)]["sga"]["ir_r5"] for s in range(2)]))
    assert len(augmentation) == len(saved["augmentation"]) == 5
    for row, record in zip(augmentation, saved["augmentation"]):
        flat = {k: v for k, v in record.items() if k not in ("robust", "gain")}
        for name in ("robust", "gain"):
            flat |= {name: (record[name] or {}).get("point"), f"{name}_low": (record[name] or {}).get("low"),
                     f"{name}_high": (record[name] or {}).get("high")}
        assert all(_same(row[column(k)], v) for k, v in flat.items()), record
        assert row["robust_attacks"] == "coattack+sga"
    assert is_recorded(tmp_path / "defences.csv") and is_recorded(tmp_path / "augmentation.csv")
    assert report["defences"] == saved["defences"]


def test_quality_figure_panels_labels_gaps_and_one_colour_per_stage(tmp_path):
    """Image and text Frechet distances in panels of their own; a stage without a value named n/a in its panel;
    a stage in one colour and marker in every panel; the legend and points named by the stages' display labels."""
    from matplotlib.colors import to_hex

    from pipeline.core.figures import NA, pyplot
    from pipeline.study.plan import STAGE_LABELS
    from pipeline.study.report import augmentation_rows, quality_figure, Study

    cells, stats = _augmentation_cells()
    del stats["randaug"]["diversity_mean"], stats["i2t-human"]["fd_text"]
    rows = augmentation_rows(Study(cells, resamples=50), [c.cell for c in cells], stats)
    fig = quality_figure(rows, ATTACKS)
    try:
        xlabels = [ax.get_xlabel() for ax in fig.axes]
        assert xlabels[:2] == ["alignment (cosine image-text)", "diversity (1 - cosine to the original)"]
        assert xlabels[2:] == ["Frechet distance of image features", "Frechet distance of text features"]
        points = [{t.get_text() for t in ax.texts} for ax in fig.axes]
        assert points == [{"eda", "randaug", "i2t-human", "t2i-sd"}, {"eda", "i2t-human", "t2i-sd"},
                          {"randaug", "t2i-sd"}, {"eda"}]
        assert [ax.get_title(loc="right") for ax in fig.axes] == ["", f"{NA}: randaug", "", f"{NA}: i2t-human"]
        colours: dict[str, set] = {}
        for ax in fig.axes:
            for bar, text in zip(ax.containers, ax.texts):  # an error bar per point, its label after it
                line = bar.lines[0]
                colours.setdefault(text.get_text(), set()).add((to_hex(line.get_color()), line.get_marker()))
        assert all(len(c) == 1 for c in colours.values()) and len({next(iter(c)) for c in colours.values()}) == 4
        assert colours["eda"].pop()[1] == "o" and colours["randaug"].pop()[1] == "s"  # text circle, image square
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend == [f"{STAGE_LABELS[s]} ({p})" for s, p in
                          (("eda", "1:N"), ("randaug", "N:1"), ("i2t-human", "1:N"), ("t2i-sd", "N:1"))]
        assert "Co-Attack / SGA" in fig._suptitle.get_text()
    finally:
        pyplot().close(fig)
