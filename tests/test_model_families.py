"""Model families behind one interface: Hugging Face CLIP, open_clip and BLIP, each a tiny model built from its
config (no downloads), saved and loaded back by `load_model`; every attack, every training mode and the evaluation
run on each."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pipeline.attacks import ATTACKS, BERTAttack, build_attack, image_similarity_goal
from pipeline.attacks.text_parts import Caption, TokenEditor
from pipeline.models.hf import ModelNotFoundError, load_clip, load_mlm
from pipeline.models.loading import UnsupportedModelError, load_model, model_family

open_clip = pytest.importorskip("open_clip", reason="the 'families' extra (open_clip_torch) is not installed")

FAMILIES = ("clip", "open_clip", "blip")
from conftest import TINY_OPEN_CLIP  # noqa: E402  (the family builders are shared with test_study_families)


@pytest.fixture(scope="module")
def family_dirs(tiny_family_dirs) -> dict[str, str]:
    """{family: saved model dir} plus "mlm"; the CLIP is the suite's tiny one."""
    return tiny_family_dirs


@pytest.fixture(scope="module")
def models(family_dirs):
    return {f: load_model(family_dirs[f]) for f in FAMILIES}


@pytest.fixture(scope="module")
def mlm(family_dirs):
    return load_mlm(family_dirs["mlm"])


def _images(model, n=4, seed=0):
    return torch.rand(n, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ loading


def test_load_model_detects_each_family_and_round_trips(family_dirs, models, tmp_path, tiny_captions):
    for family in FAMILIES:
        model = models[family]
        assert model_family(family_dirs[family]) == family == model.family
        images, texts = _images(model), tiny_captions[:3]
        again = load_model(model.save(tmp_path / family))
        with torch.no_grad():
            assert torch.allclose(model.encode_images(images), again.encode_images(images), atol=1e-6)
            assert torch.allclose(model.encode_texts(texts), again.encode_texts(texts), atol=1e-6)
            emb = model.encode_texts(texts)
        assert emb.shape == (3, model.embed_dim) and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert torch.allclose(model.logit_scale, again.logit_scale)
        image, text = (dict(model.tower_parameters(t)) for t in ("image", "text"))
        assert image and text and not set(image) & set(text)
        assert len(model.tower_parameters("scale")) == 1


def test_hf_clip_through_load_model_is_load_clip(family_dirs, tiny_captions):
    a, b = load_model(family_dirs["clip"]), load_clip(family_dirs["clip"])
    images = _images(a)
    with torch.no_grad():
        assert torch.equal(a.encode_images(images), b.encode_images(images))
        assert torch.equal(a.encode_texts(tiny_captions[:4]), b.encode_texts(tiny_captions[:4]))


def test_open_clip_spec_and_unknown_families(family_dirs, tmp_path):
    model = load_model("open_clip:tiny-test-oc")  # registered by build_open_clip in the fixture
    assert model.family == "open_clip" and model.image_size == 32 and model.max_length == 32
    with pytest.raises(UnsupportedModelError, match="open_clip.*|.*BLIP"):
        load_model(family_dirs["mlm"])  # a BERT: model_type bert
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsupportedModelError, match="supported families"):
        load_model(tmp_path / "empty")
    with pytest.raises(ModelNotFoundError):
        load_model(tmp_path / "missing")


def test_open_clip_missing_gives_install_hint(monkeypatch):
    import builtins

    from pipeline.models import openclip

    real = builtins.__import__

    def no_open_clip(name, *args, **kwargs):
        if name == "open_clip":
            raise ImportError("no")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_open_clip)
    with pytest.raises(ImportError, match="open_clip_torch"):
        openclip.load_open_clip("open_clip:ViT-B-32")


# ------------------------------------------------------------------------------------------------ attacks


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_runs_on_every_family(family, name, models, mlm, tiny_captions):
    model = models[family]
    images = _images(model)
    texts = [[tiny_captions[2 * i], tiny_captions[2 * i + 1]] for i in range(4)]
    attack = build_attack(name, steps=3, eps=4 / 255, seed=0)
    out = attack(model, mlm, images, texts)
    assert out.images.shape == images.shape
    assert (out.images - images).abs().max() <= attack.eps + 1e-6
    if name != "bert":
        assert (out.images - images).abs().max() > 0
    if name != "pgd":
        assert out.texts != texts  # some caption changed


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_bert_attack_scores_equal_tokenising_the_strings(family, models, tiny_captions):
    """The fast path (spliced ids where exact, re-tokenised strings elsewhere; open_clip: always strings) scores
    every edit as the model scores the edited string."""
    model = models[family]
    texts = tiny_captions[:5]
    captions = [Caption.parse(t) for t in texts]
    editor = TokenEditor(model, captions)
    edits = [(i, p, w) for i, c in enumerate(captions) for p in range(len(c.words)) for w in ("", "blue")]
    editor.prepare(["blue"])
    spliced = sum(editor.edit(i, p, w, None) is not None for i, p, w in edits)
    assert (spliced == 0) if family == "open_clip" else spliced > 10
    goal = image_similarity_goal(model.encode_images(_images(model, len(texts))).detach())
    got = BERTAttack(variant="fast")._score_edits(model, editor, None, edits, goal)
    strings = [captions[i].with_word(p, w) for i, p, w in edits]
    with torch.no_grad():
        expected = goal(model.encode_texts(strings).float(), torch.tensor([e[0] for e in edits])).float()
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("family", ("blip",))
def test_blip_token_editor_equals_tokenising_the_edited_string(family, models, tiny_captions):
    model = models[family]
    captions = [Caption.parse(t) for t in tiny_captions[:6] + ["x,red,y and a dog's toy"]]
    editor = TokenEditor(model, captions)
    editor.prepare(["blue", "triangle"])
    for i, caption in enumerate(captions):
        for p in range(len(caption.words)):
            for word in ("", "blue", "triangle"):
                ids = editor.edit(i, p, word, None)
                if ids is not None:
                    assert ids == model.token_ids([caption.with_word(p, word)])[0], (caption.text, p, word)


# ----------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode_name", ["ft", "tecoa", "fare", "mat", "matplus"])
def test_every_training_mode_steps_on_every_family(family, mode_name, family_dirs, mlm, tiny_captions):
    from pipeline.train.config import TrainConfig
    from pipeline.train.loop import train_step
    from pipeline.train.modes import MODES, DualEncoder, build_mode

    torch.manual_seed(0)
    model = load_model(family_dirs[family])
    cfg = TrainConfig(mode=mode_name, data=dataclasses.replace(
        TrainConfig().data, stages=("x",) if mode_name == "matplus" else ()))
    mode = build_mode(cfg, model, mlm if "mlm" in MODES.get(mode_name).needs else None)
    mode.prepare(model.model)
    if mode_name == "fare":  # the model is its own reference: move away so the loss is not 0
        with torch.no_grad():
            for _, param in model.tower_parameters("image"):
                param.add_(0.05 * torch.randn_like(param))
    net = DualEncoder(model).train()
    batch = {"images": _images(model), "texts": tiny_captions[:4]}
    row = train_step(net, mode, [batch], bf16=False, device=torch.device("cpu"))
    assert row["loss"] == row["loss"] and row["loss"] > 0  # finite, not NaN
    image_grads = [p.grad for _, p in model.tower_parameters("image")]
    text_grads = [p.grad for _, p in model.tower_parameters("text")]
    assert any(g is not None and g.abs().sum() > 0 for g in image_grads)
    if mode_name in ("tecoa", "fare"):  # the vision tower only
        assert all(g is None for g in text_grads)
    else:
        assert any(g is not None and g.abs().sum() > 0 for g in text_grads)


# ----------------------------------------------------------------------------- BLIP's ITM loss (issue 24)


def test_hard_negatives_follow_the_contrastive_similarity_and_never_the_positive():
    from pipeline.train.losses import hard_negatives

    count = 6
    hardest = torch.tensor([(i + 1) % count for i in range(count)])
    similarity = torch.zeros(count, count)
    similarity[torch.arange(count), hardest] = 6.0  # one far more similar non-matching column per row (logits)
    similarity.fill_diagonal_(7.0)  # the positive: the most similar of all, never drawn
    draws = torch.stack([hard_negatives(similarity, torch.Generator().manual_seed(s)) for s in range(200)])
    assert not (draws == torch.arange(count)).any()
    assert (draws == hardest).float().mean() > 0.9  # uniform draws would hit it 1 time in 5


def test_itm_pairs_are_the_positives_then_a_negative_image_per_text_and_a_negative_text_per_image():
    from pipeline.train.losses import itm_pairs

    features = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    images, texts, labels = itm_pairs(features, features, 1 / 0.07, torch.Generator().manual_seed(1))
    rows = torch.arange(5)
    assert labels.tolist() == [1] * 5 + [0] * 10
    assert torch.equal(images[:5], rows) and torch.equal(texts[:5], rows)
    assert torch.equal(texts[5:10], rows) and not (images[5:10] == rows).any()
    assert torch.equal(images[10:], rows) and not (texts[10:] == rows).any()


@pytest.mark.parametrize("mode_name", ["tecoa", "mat"])
def test_blip_trains_the_itm_loss_on_the_adversarial_pairs(mode_name, family_dirs, mlm, tiny_captions):
    from pipeline.train.config import TrainConfig
    from pipeline.train.loop import train_step
    from pipeline.train.modes import DualEncoder, build_mode

    torch.manual_seed(0)
    model = load_model(family_dirs["blip"])
    cfg = TrainConfig(mode=mode_name, losses=("contrastive", "itm"))
    mode = build_mode(cfg, model, mlm if mode_name == "mat" else None)
    mode.prepare(model.model)
    net = DualEncoder(model).train()
    seen = []
    forward = net.forward
    net.forward = lambda **kw: seen.append(kw) or forward(**kw)
    clean = _images(model)
    row = train_step(net, mode, [{"images": clean, "texts": tiny_captions[:4]}], bf16=False, device=torch.device("cpu"))
    assert row["itm"] == row["itm"] and row["itm"] > 0 and row["contrastive"] > 0
    assert seen[-1]["itm"] and not torch.equal(seen[-1]["pixels01"], clean)  # matched on the attacked images
    head = [p.grad for name, p in model.model.named_parameters() if name.startswith("itm_head")]
    assert all(g is not None and g.abs().sum() > 0 for g in head) == (mode_name == "mat")  # TeCoA: image tower only
    image_grads = [p.grad for _, p in model.tower_parameters("image")]
    assert any(g is not None and g.abs().sum() > 0 for g in image_grads)


def test_the_itm_loss_is_refused_where_it_cannot_run(family_dirs):
    from pipeline.study.run import train_settings
    from pipeline.train.config import TrainConfig
    from pipeline.train.modes import build_mode

    with pytest.raises(ValueError, match="matching head"):
        build_mode(TrainConfig(mode="ft", losses=("contrastive", "itm")), load_model(family_dirs["clip"]))
    with pytest.raises(ValueError, match="contrastive loss is always trained"):
        TrainConfig(mode="ft", losses=("itm",))
    with pytest.raises(ValueError, match="fare"):
        TrainConfig(mode="fare", losses=("contrastive", "itm"))
    # the default keeps the study's fingerprints of units trained before `losses` existed
    assert "losses" not in train_settings(TrainConfig()) and "losses" in train_settings(TrainConfig(losses=("contrastive", "itm")))


# --------------------------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def synth_layout(tmp_path_factory):
    from pipeline.core.executor import RunOptions
    from pipeline.core.paths import Layout
    from pipeline.data.ingest import IngestConfig, run_ingest

    root = tmp_path_factory.mktemp("family_eval")
    layout = Layout(shards_dir=root / "shards", manifests_dir=root / "manifests", runs_dir=root / "runs",
                    models_dir=root / "models")
    run_ingest(IngestConfig(dataset="synth", synth_size=100, shard_size=1000), layout, RunOptions(workers=1))
    return layout


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluation_runs_on_every_family(family, family_dirs, synth_layout):
    from pipeline.evaluation.evaluate import EvalConfig, evaluate

    record = evaluate(EvalConfig(checkpoint=family_dirs[family], mlm=family_dirs["mlm"], name=f"fam-{family}",
                                 size=6, batch_size=6, steps=2, report_to=()), synth_layout)
    assert set(record["metrics"]) == {"clean", *ATTACKS} and record["family"] == family
    assert record["attack_setting"] == "white-box"
    assert all(row["setting"] == "white-box" for a, row in record["metrics"].items() if a != "clean")
    for row in record["metrics"].values():
        assert 0 <= row["tr_r1"] <= row["tr_r5"] <= row["tr_r10"] <= 100


def test_itm_reranking_on_blip_and_refused_elsewhere(family_dirs, synth_layout, models):
    from pipeline.evaluation.evaluate import EvalConfig, evaluate
    from pipeline.evaluation.itm import rerank

    blip = models["blip"]
    images, texts = _images(blip, 5), [f"caption {i}" for i in range(7)]
    with torch.no_grad():
        sim = blip.encode_images(images) @ blip.encode_texts(texts).T
        i2t, t2i = rerank(blip, images, texts, sim, k=3)
        itm = blip.itm_scores(images[[1]], [texts[4]])
    top = sim[1].topk(3).indices
    assert (i2t[1] > -100).sum() == 3 and set((i2t[1] > -100).nonzero().flatten().tolist()) == set(top.tolist())
    if 4 in top.tolist():
        assert torch.isclose(i2t[1, 4], itm[0] + sim[1, 4], atol=1e-5)
    assert ((t2i > -100).sum(0) == 3).all()

    record = evaluate(EvalConfig(checkpoint=family_dirs["blip"], name="blip-itm", size=6, batch_size=6, steps=2,
                                 attacks=("pgd",), itm_k=4, report_to=()), synth_layout)
    assert record["itm_k"] == 4 and record["metrics"]["pgd"]["itm_k"] == 4
    with pytest.raises(ValueError, match="ITM re-ranking needs a BLIP"):
        evaluate(EvalConfig(checkpoint=family_dirs["clip"], name="clip-itm", size=6, attacks=(), itm_k=4,
                            report_to=()), synth_layout)


def test_blip_without_itm_head_refuses_reranking(family_dirs, tmp_path, synth_layout):
    from safetensors.torch import load_file, save_file

    from pipeline.evaluation.evaluate import EvalConfig, evaluate

    import shutil

    copy = tmp_path / "blip-no-itm"
    shutil.copytree(family_dirs["blip"], copy)
    weights = load_file(str(copy / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("itm_head.")}, str(copy / "model.safetensors"))
    model = load_model(copy)
    assert not model.has_itm
    with pytest.raises(ValueError, match="itm_head"):
        evaluate(EvalConfig(checkpoint=str(copy), name="noitm", size=6, attacks=(), itm_k=4, report_to=()),
                 synth_layout)


def test_transfer_marks_rows_and_resizes(family_dirs, synth_layout, tmp_path):
    """Attacks crafted on the tiny CLIP (32 px), evaluated on a 48 px open_clip: rows say transfer, the record
    says the images were resized; white-box on the same target differs."""
    from pipeline.evaluation.evaluate import EvalConfig, evaluate
    from pipeline.models.openclip import build_open_clip

    cfg48 = json.loads(json.dumps(TINY_OPEN_CLIP))
    cfg48["vision_cfg"]["image_size"] = 48
    torch.manual_seed(1)
    target = str(build_open_clip(cfg48, name="tiny-test-oc48").save(tmp_path / "oc48"))
    record = evaluate(EvalConfig(checkpoint=target, name="transfer", size=6, batch_size=6, steps=2, attacks=("pgd",),
                                 attack_source=family_dirs["clip"], report_to=()), synth_layout)
    assert record["attack_setting"] == "transfer" and record["metrics"]["pgd"]["setting"] == "transfer"
    assert record["transfer_resize"] == "adversarial images resized 32 -> 48 px (bicubic, antialiased)"
    white = evaluate(EvalConfig(checkpoint=target, name="white", size=6, batch_size=6, steps=2, attacks=("pgd",),
                                report_to=()), synth_layout)
    assert white["metrics"]["clean"]["embeddings_sha256"] == record["metrics"]["clean"]["embeddings_sha256"]
    assert white["metrics"]["pgd"]["embeddings_sha256"] != record["metrics"]["pgd"]["embeddings_sha256"]
