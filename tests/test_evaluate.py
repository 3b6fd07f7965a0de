"""evaluate.py on a tiny CLIP trained for seconds on synth: retrieval, every attack, ASR ordering, the JSON."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.evaluation.evaluate import (
    CLEAN,
    EvalConfig,
    attacked_embeddings,
    eval_path,
    evaluate,
    load_test_set,
    normalise_caption,
    resolve_checkpoint,
)
from pipeline.core.paths import Layout


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Layout:
    """synth (600 images, 60 test) ingested, a tiny CLIP and masked LM pretrained on it by `pretrain`."""
    from pipeline.data.ingest import IngestConfig, run_ingest
    from pipeline.core.executor import RunOptions
    from pipeline.train.config import PretrainConfig
    from pipeline.train.pretrain import pretrain

    torch.set_num_threads(1)  # the CPU is shared: one thread avoids OpenMP spin-waiting
    root = tmp_path_factory.mktemp("eval")
    layout = Layout(shards_dir=root / "shards", manifests_dir=root / "manifests", runs_dir=root / "runs",
                    models_dir=root / "models")
    run_ingest(IngestConfig(dataset="synth", synth_size=600, shard_size=1000), layout, RunOptions(workers=1))
    pretrain(PretrainConfig(clip_preset="tiny", mlm_preset="tiny", vocab_size=300, steps=400, batch_size=64,
                            warmup=30, mlm_steps=150, num_workers=0), layout)
    return layout


@pytest.fixture(scope="module")
def record(trained) -> dict:
    return evaluate(EvalConfig(checkpoint=str(trained.model_dir("synth", "clip")), name="tiny", size=60,
                               batch_size=32), trained)


def test_the_run_config_is_saved_and_replays(trained, record):
    from pipeline.core.config import load_config

    path = trained.dataset_manifests("synth") / "evals" / "tracking" / "tiny" / "config.json"
    cfg = EvalConfig(checkpoint=str(trained.model_dir("synth", "clip")), name="tiny", size=60, batch_size=32)
    assert load_config(EvalConfig, path) == cfg
    assert json.loads(path.read_text())["resolved"]["precision"] == "fp32"


def test_clean_retrieval_is_far_above_chance(record):
    clean = record["metrics"][CLEAN]
    assert record["n_images"] == 60 and record["n_texts"] == 300
    # chance R@1 is 5/300 (TR) and 1/60 (IR); a model that learned something is far above
    assert clean["tr_r1"] > 20 and clean["ir_r1"] > 15
    assert clean["tr_r1"] <= clean["tr_r5"] <= clean["tr_r10"] and clean["ir_r1"] <= clean["ir_r5"] <= clean["ir_r10"]


def test_every_attack_lowers_r1(record):
    clean = record["metrics"][CLEAN]
    for attack in ("pgd", "bert", "coattack", "sga"):
        m = record["metrics"][attack]
        assert m["tr_r1"] < clean["tr_r1"] and m["ir_r1"] < clean["ir_r1"], attack
        assert m["tr_asr"] > 0 and m["ir_asr"] > 0, attack


def test_asr_ordering_of_multimodal_attacks(record):
    """SGA >= Co-Attack >= PGD as published (SGA, Lu et al. 2023, Table on CLIP ViT-B/16)."""
    asr = {a: (m["tr_asr"] + m["ir_asr"]) / 2 for a, m in record["metrics"].items() if a != CLEAN}
    assert asr["sga"] >= asr["coattack"] >= asr["pgd"], asr


def test_bert_attack_with_the_synonym_constraint_is_weaker_than_pgd(trained, record):
    """The shipped BERT-Attack through the evaluation's own options: with ``constraint="synonyms"`` (a candidate
    must share a WordNet synset with the word it replaces, standing in for the BERT-Attack paper's semantic
    filter) its edits keep the caption's meaning, and it is weaker than PGD at 2/255 and than the unconstrained
    reference attack, the published order PGD > BERT-Attack (Co-Attack / SGA tables)."""
    from pipeline.augment.wordnet import availability

    if not availability()[0]:
        pytest.skip(availability()[1])
    constrained = evaluate(EvalConfig(checkpoint=str(trained.model_dir("synth", "clip")), name="tiny-synonyms",
                                      size=60, batch_size=32, attacks=("bert",), constraint="synonyms"), trained)
    assert constrained["attack_options"] == {"constraint": "synonyms"}
    asr = {name: (m["tr_asr"] + m["ir_asr"]) / 2 for name, m in record["metrics"].items() if name != CLEAN}
    synonyms_only = (constrained["metrics"]["bert"]["tr_asr"] + constrained["metrics"]["bert"]["ir_asr"]) / 2
    assert synonyms_only < asr["pgd"] and synonyms_only < asr["bert"]


def test_asr_at_r5_and_r10_against_the_clean_ranks(record):
    """SGA's ASR at R@5 / R@10: the share of clean hits at K that the attack pushes out of the top K."""
    clean = record["metrics"][CLEAN]["per_query"]
    for attack in ("pgd", "bert", "coattack", "sga"):
        row = record["metrics"][attack]
        for side in ("tr", "ir"):
            before, after = clean[f"{side}_rank"], row["per_query"][f"{side}_rank"]
            for k in (5, 10):
                hits = [a for b, a in zip(before, after) if b < k]
                expected = 100.0 * sum(a >= k for a in hits) / len(hits)
                assert row[f"{side}_asr_r{k}"] == pytest.approx(expected), (attack, side, k)
    assert record["metrics"]["sga"]["tr_asr_r10"] != record["metrics"]["sga"]["tr_asr"]


def test_eval_json_written_with_settings(record, trained):
    written = json.loads(eval_path(trained, "synth", "tiny").read_text())
    assert written["mode"] == "pretrained" and written["settings"]["attacks"] == ["pgd", "bert", "coattack", "sga"]
    assert set(written["metrics"]) == {CLEAN, "pgd", "bert", "coattack", "sga"}
    assert written["metrics"]["sga"]["ir_r1"] == record["metrics"]["sga"]["ir_r1"]
    assert written["settings"]["normalise_captions"] is True and written["settings"]["seed"] == 0
    assert written["precision"] == "fp32"  # the reference protocol's precision by default
    assert written["provenance"]["device"] == "cpu" and written["provenance"]["precision"] == "fp32"


def test_stronger_budget_breaks_more(trained, record):
    """PGD at 8/255 breaks at least as many queries as at the default 2/255 (same model, same images)."""
    strong = evaluate(EvalConfig(checkpoint=str(trained.model_dir("synth", "clip")), name="tiny-eps8", size=60,
                                 attacks=("pgd",), eps=8 / 255, step_size=2 / 255), trained)
    assert strong["metrics"]["pgd"]["tr_asr"] >= record["metrics"]["pgd"]["tr_asr"]
    assert strong["metrics"]["pgd"]["ir_r1"] < record["metrics"][CLEAN]["ir_r1"]
    assert strong["attack_options"] == {"eps": 8 / 255, "step_size": 2 / 255}


@pytest.mark.parametrize("caption, expected", [
    ("A Man's  DOG, running!!", "a mans dog running"),  # case, deleted punctuation, a double space
    ("  Two-tone / striped   cat.\n", "two tone striped cat"),  # '-' and '/' become spaces; ends trimmed
    ("<PERSON> rides (a) \"bike\"; ok? #1 ~ *", "person rides a bike ok 1"),
    ("hello \t\n  world", "hello world"),  # any whitespace run of two or more is one space
    ("a\tb", "a\tb"),  # a single tab stays, as in the reference (only runs of two or more are collapsed)
    ("!!!", ""),
    ("Café ÉTÉ, 3:30", "café été 330"),
    (" ".join(f"w{i}" for i in range(40)), " ".join(f"w{i}" for i in range(30))),  # the first 30 words
])
def test_captions_normalised_as_the_reference_pre_caption(caption, expected):
    assert normalise_caption(caption) == expected


def test_captions_normalised_by_default_and_kept_when_asked(trained):
    from pipeline.models.hf import load_clip

    clip = load_clip(str(trained.model_dir("synth", "clip")), device="cpu")
    normalised = load_test_set(trained.base_dir("synth"), "test", clip, 10)
    raw = load_test_set(trained.base_dir("synth"), "test", clip, 10, normalise=False)
    assert normalised.captions == [[normalise_caption(c) for c in group] for group in raw.captions]
    assert normalised.captions != raw.captions  # synth captions have capitals and full stops


def test_cli_turns_normalisation_off_and_sets_the_seed(trained, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.commands.cli import app

    for key, value in (("MAT_SHARDS_DIR", trained.shards_dir), ("MAT_MANIFESTS_DIR", trained.manifests_dir),
                       ("MAT_RUNS_DIR", trained.runs_dir), ("MAT_MODELS_DIR", trained.models_dir)):
        monkeypatch.setenv(key, str(value))
    monkeypatch.setenv("MAT_CAPTION_NORMALISE", "0")
    monkeypatch.setenv("MAT_ATTACK_CONSTRAINT", "synonyms")
    result = CliRunner().invoke(app, ["eval", "--ckpt", str(trained.model_dir("synth", "clip")), "--name", "raw",
                                      "--size", "10", "--attacks", "", "--seed", "3"])
    assert result.exit_code == 0, result.output
    written = json.loads(eval_path(trained, "synth", "raw").read_text())
    assert written["settings"]["normalise_captions"] is False and written["settings"]["seed"] == 3
    assert written["attack_options"]["constraint"] == "synonyms"


def test_seed_reaches_the_attacks(trained):
    """The same seed gives the same PGD examples, another seed other ones (the random start)."""
    from pipeline.models.hf import load_clip

    clip = load_clip(str(trained.model_dir("synth", "clip")), device="cpu")
    data = load_test_set(trained.base_dir("synth"), "test", clip, 8)

    def adversarial_images(seed: int) -> torch.Tensor:
        cfg = EvalConfig(checkpoint="unused", batch_size=4, attacks=("pgd",), seed=seed)
        return attacked_embeddings(clip, None, data, "pgd", cfg)[0]

    first = adversarial_images(0)
    assert torch.equal(first, adversarial_images(0))
    assert not torch.allclose(first, adversarial_images(1), atol=1e-6)


def test_run_dir_resolves_to_its_clip_and_mode(tmp_path):
    run = tmp_path / "tecoa-synth-20240101-000000"
    (run / "clip").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"mode": "tecoa", "dataset": "synth"}))
    assert resolve_checkpoint(str(run)) == (str(run / "clip"), run.name, "tecoa")
    assert resolve_checkpoint(str(run / "clip")) == (str(run / "clip"), run.name, "tecoa")  # its clip/ is the run
    assert resolve_checkpoint(str(tmp_path / "models" / "synth" / "clip"))[1:] == ("synth-clip", "pretrained")


def test_evaluations_are_named_by_model_and_dataset(tmp_path):
    """MODELS_DIR/synth/clip evaluated on f30k was named "synth", a dataset's name, before."""
    from pipeline.evaluation.evaluate import default_eval_name

    layout = Layout(tmp_path / "shards", tmp_path / "manifests", tmp_path / "runs", tmp_path / "models")
    run = layout.runs_dir / "mat-synth-20240101-000000"
    (run / "clip").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"mode": "mat", "dataset": "synth"}))
    pretrained = str(layout.model_dir("synth", "clip"))
    names = {
        (str(run), "synth"): "mat-synth-20240101-000000",  # made on the dataset evaluated: the run's name, as before
        (str(run), "f30k"): "mat-synth-20240101-000000-on-f30k",
        (str(run / "clip"), "f30k"): "mat-synth-20240101-000000-on-f30k",
        (pretrained, "synth"): "synth-clip",
        (pretrained, "f30k"): "synth-clip-on-f30k",
        ("openai/clip-vit-base-patch16", "coco"): "clip-vit-base-patch16-on-coco",
        ("open_clip:ViT-B-32:laion2b_s34b_b79k", "coco"): "ViT-B-32-laion2b_s34b_b79k-on-coco",
        ("open_clip:hf-hub:timm/ViT-B-16-SigLIP", "coco"): "ViT-B-16-SigLIP-on-coco",
        (str(tmp_path / "elsewhere" / "clip"), "coco"): "elsewhere-clip-on-coco",
        ("x" * 120, "coco"): "x" * 92 + "-on-coco",
    }
    for (checkpoint, dataset), name in names.items():
        assert default_eval_name(checkpoint, dataset, layout) == name
        assert eval_path(layout, dataset, name).name == f"{name}.json"  # a plain name: a file name


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Any model load fails the test: the checks below come before the models."""
    def refuse(spec, *args, **kwargs):
        raise AssertionError(f"loaded {spec}")

    monkeypatch.setattr("pipeline.models.loading.load_model", refuse)
    monkeypatch.setattr("pipeline.models.hf.load_mlm", refuse)


@pytest.fixture()
def toy(tmp_path) -> Layout:
    from pipeline.train.toy import write_toy_shards

    write_toy_shards(tmp_path / "shards", "toy", shards=1, per_shard=4, split="test")
    return Layout(tmp_path / "shards", tmp_path / "manifests", tmp_path / "runs", tmp_path / "models")


def test_a_dataset_without_shards_is_named_before_the_models(toy, tiny_model_dirs, no_model_loads):
    """`eval --dataset nosuch`: it complained about the masked LM, before."""
    with pytest.raises(FileNotFoundError, match=r"^dataset 'nosuch' has no shards \(no test-\*\.tar in .*; datasets "
                                                r"with shards there: toy\): make them with `make ingest DATASET=nosuch "):
        evaluate(EvalConfig(checkpoint=tiny_model_dirs["clip"], dataset="nosuch"), toy)
    with pytest.raises(FileNotFoundError, match=r"^dataset 'toy' has no val shards in .*; its splits: test$"):
        evaluate(EvalConfig(checkpoint=tiny_model_dirs["clip"], dataset="toy", split="val"), toy)


def test_missing_models_are_named_before_any_loads(toy, tiny_model_dirs, no_model_loads, monkeypatch):
    from pipeline.models.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match=r"^no masked LM for dataset 'toy' at .*/models/toy/mlm, where `make "
                                                 r"pretrain DATASET=toy` saves one: run it, or name a model with MLM=<"
                                                 r".*>, or evaluate without the text attacks \(ATTACKS='pgd'\)$"):
        evaluate(EvalConfig(checkpoint=tiny_model_dirs["clip"], dataset="toy"), toy)
    monkeypatch.chdir(toy.runs_dir.parent)
    toy.runs_dir.mkdir()
    for change in ({"checkpoint": "runs/nope"}, {"checkpoint": tiny_model_dirs["clip"], "attack_source": "runs/nope"},
                   {"checkpoint": tiny_model_dirs["clip"], "mlm": "runs/nope"}):
        with pytest.raises(ModelNotFoundError, match=r"^model 'runs/nope' not found: no such folder"):
            evaluate(EvalConfig(dataset="toy", **{"mlm": tiny_model_dirs["mlm"], **change}), toy)


def test_an_evaluation_is_written_under_its_default_or_given_name(toy, tiny_model_dirs):
    clip = toy.model_dir("synth", "clip")
    clip.parent.mkdir(parents=True)
    clip.symlink_to(tiny_model_dirs["clip"])
    record = evaluate(EvalConfig(checkpoint=str(clip), dataset="toy", attacks=(), report_to=()), toy)
    assert record["name"] == "synth-clip-on-toy" and eval_path(toy, "toy", "synth-clip-on-toy").is_file()
    named = evaluate(EvalConfig(checkpoint=str(clip), dataset="toy", attacks=(), report_to=(), name="mine"), toy)
    assert named["name"] == "mine" and eval_path(toy, "toy", "mine").is_file()  # EVAL_NAME as before


@pytest.mark.parametrize("change, message", [({"attacks": ("pgd", "nope")}, "nope"), ({"size": 1}, "size"),
                                             ({"precision": "fp8"}, "fp8"), ({"eps": 2.0}, "eps")])
def test_bad_settings_raise(change, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(checkpoint="x", **change)
