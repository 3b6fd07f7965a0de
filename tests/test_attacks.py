from __future__ import annotations

import contextlib

import pytest
import torch

import pipeline.attacks.sga as sga_module
from pipeline.attacks import (
    ATTACKS,
    PGD,
    SGA,
    BERTAttack,
    build_attack,
    run_attack,
)
from pipeline.attacks.base import kl_drift, pair_similarity_loss
from pipeline.attacks.sga import scaled_copies
from pipeline.attacks.text_parts import view_embed


def _captions(tiny_captions: list[str], n: int) -> list[str]:
    return [tiny_captions[(7 * i) % len(tiny_captions)] for i in range(n)]


def _pair_sims(clip, images, texts) -> torch.Tensor:
    with torch.no_grad():
        return (clip.encode_images(images) * clip.encode_texts(texts)).sum(-1)


# ------------------------------------------------------------------------------------------------ PGD


def test_pgd_respects_eps_and_pixel_range_and_increases_the_loss(tiny_clip, tiny_images, tiny_captions):
    images = tiny_images.clone()
    images[:, :, :4] = 0.0  # pixels on the box edges must stay inside [0, 1]
    images[:, :, -4:] = 1.0
    text_emb = tiny_clip.encode_texts(_captions(tiny_captions, len(images))).detach()
    txt2img = torch.arange(len(images))

    def loss_fn(x):
        return pair_similarity_loss(tiny_clip.encode_images(x), text_emb, txt2img)

    pgd = PGD(eps=2 / 255, steps=5, step_size=0.5 / 255)
    adv = pgd(images, loss_fn, torch.Generator().manual_seed(0))
    assert (adv - images).abs().max() <= pgd.eps + 1e-7
    assert adv.min() >= 0 and adv.max() <= 1 and not adv.requires_grad
    assert (adv - images).abs().max() > pgd.eps / 2  # it actually moved
    with torch.no_grad():
        assert loss_fn(adv) > loss_fn(images)
    assert all(p.grad is None for p in tiny_clip.model.parameters())  # model grads untouched


def test_pgd_without_steps_or_start_is_identity(tiny_images):
    out = PGD(steps=0, random_start=False)(tiny_images, lambda x: x.sum())
    assert torch.equal(out, tiny_images)


@pytest.mark.parametrize("kwargs,name", [({"eps": -1.0}, "eps"), ({"step_size": 0.0}, "step_size"),
                                         ({"steps": 1.5}, "steps"), ({"step_ratio": 0.0}, "step_ratio"),
                                         ({"start": "gaussian"}, "start")])
def test_pgd_config_is_validated(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PGD(**kwargs)


# -------------------------------------------------------------------------------- evaluation attacks


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_evaluation_attacks_stay_in_threat_model_and_lower_similarity(name, tiny_clip, tiny_mlm, tiny_captions):
    images = torch.rand(3, 3, tiny_clip.image_size, tiny_clip.image_size, generator=torch.Generator().manual_seed(2))
    groups = [_captions(tiny_captions[i:], 2) for i in range(len(images))]
    tiny_clip.model.train()
    out = run_attack(name, tiny_clip, tiny_mlm, images, groups, steps=3, mlm_threshold=None)
    assert tiny_clip.model.training  # mode restored
    tiny_clip.model.eval()
    eps = build_attack(name).eps
    assert (out.images - images).abs().max() <= eps + 1e-7 and out.images.min() >= 0 and out.images.max() <= 1
    assert [len(g) for g in out.texts] == [len(g) for g in groups]
    flat_clean = [t for g in groups for t in g]
    flat_adv = [t for g in out.texts for t in g]
    owner = torch.tensor([i for i, g in enumerate(groups) for _ in g])
    if name == "coattack":  # its objective: image away from its clean self and from the adversarial captions
        with torch.no_grad():
            clean_img, adv_img = tiny_clip.encode_images(images), tiny_clip.encode_images(out.images)
            adv_txt = tiny_clip.encode_texts(flat_adv)
        assert kl_drift(adv_img, clean_img) > 0
        assert kl_drift(adv_img[owner], adv_txt) > kl_drift(clean_img[owner], adv_txt)
    else:
        clean = _pair_sims(tiny_clip, images[owner], flat_clean)
        adv = _pair_sims(tiny_clip, out.images[owner], flat_adv)
        assert adv.mean() < clean.mean()
    if name in ("bert", "coattack", "sga"):
        # one word at most per caption (n_words=1); a caption stays when no candidate helps (the reference rule),
        # so only "most changed" holds for any model
        changed = [sum(a != c for a, c in zip(adv.split(" "), clean.split(" "))) for adv, clean in zip(flat_adv, flat_clean)]
        assert set(changed) <= {0, 1} and sum(changed) > len(flat_clean) // 2
    if name in ("pgd", "bert"):
        assert (flat_adv == flat_clean) == (name == "pgd") and torch.equal(out.images, images) == (name == "bert")


def test_published_defaults():
    sga, co, pgd = build_attack("sga"), build_attack("coattack"), build_attack("pgd")
    assert sga.image.eps == co.image.eps == pgd.image.eps == 2 / 255
    assert sga.image.steps == co.image.steps == pgd.image.steps == 10
    assert sga.image.step_length == pytest.approx(0.5 / 255) and pgd.image.step_length == pytest.approx(0.5 / 255)
    assert co.image.step_length == pytest.approx(0.25 / 255) and co.alpha == 3.0
    assert (sga.image.start, pgd.image.start, co.image.start) == ("symmetric", "symmetric", "positive")
    assert sga.scales == (0.5, 0.75, 1.25, 1.5) and sga.noise_std == 0.05 and not sga.antialias
    assert sga.text.top_k == 10 and sga.text.n_words == 1 and sga.text.mlm_threshold == 0.3
    assert (sga.text.max_length, co.text.max_length) == (77, 30)  # SGA's CLIP script; Co-Attack's BertAttack


def test_step_size_follows_eps_by_the_published_ratio_unless_given():
    for name in ("pgd", "sga"):
        assert build_attack(name, eps=4 / 255).image.step_length == pytest.approx(1 / 255)  # eps / 4
        assert build_attack(name, eps=4 / 255, step_size=0.1 / 255).image.step_length == pytest.approx(0.1 / 255)
    assert build_attack("coattack", eps=4 / 255).image.step_length == pytest.approx(0.5 / 255)  # eps / steps * 1.25
    assert build_attack("coattack", eps=4 / 255, steps=20).image.step_length == pytest.approx(0.25 / 255)
    assert build_attack("coattack", step_size=1 / 255, steps=20).image.step_length == pytest.approx(1 / 255)


def test_random_starts_cover_the_published_ranges(tiny_images):
    images = torch.full_like(tiny_images, 0.5)
    eps = 4 / 255
    for start, low in (("symmetric", -eps), ("positive", 0.0)):
        delta = PGD(eps=eps, start=start).init(images, torch.Generator().manual_seed(0)) - images
        assert delta.min() >= low - 1e-7 and delta.max() <= eps + 1e-7
        assert delta.min() < low + eps / 10 and delta.max() > eps * 0.9  # fills the range


def test_registry_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="valid"):
        build_attack("fgsm")
    with pytest.raises(ValueError, match="epsilon"):
        build_attack("pgd", epsilon=0.1)
    assert build_attack("bert", eps=4 / 255, scales=(1.0,)).eps == 0.0  # options of absent parts are ignored
    assert build_attack("coattack", eps=4 / 255, top_k=3).text.top_k == 3


def test_sga_scaled_copies_are_differentiable_and_resized_back(tiny_images):
    x = tiny_images.clone().requires_grad_(True)
    copies = scaled_copies(x, SGA().scales, 0.05, torch.Generator().manual_seed(0))
    assert len(copies) == 5 and all(c.shape == x.shape for c in copies)
    torch.stack(copies).sum().backward()
    assert x.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ reference fidelity


@contextlib.contextmanager
def _scaled_image_tower(clip, factor: float):
    """Multiply the vision projection's output (the raw image features) by ``factor`` while inside."""
    handle = clip.model.visual_projection.register_forward_hook(lambda module, inputs, out: out * factor)
    try:
        yield
    finally:
        handle.remove()


def _groups(tiny_captions, n_images: int, per_image: int = 2) -> list[list[str]]:
    return [_captions(tiny_captions[i:], per_image) for i in range(n_images)]


@pytest.mark.parametrize("name", ["pgd", "coattack", "sga"])
def test_image_attacks_are_invariant_to_scaling_the_raw_image_features(name, tiny_clip, tiny_mlm, tiny_captions):
    images = torch.rand(3, 3, tiny_clip.image_size, tiny_clip.image_size, generator=torch.Generator().manual_seed(3))
    groups = _groups(tiny_captions, len(images))
    options = {"steps": 4, "top_k": 4, "mlm_threshold": None}
    plain = run_attack(name, tiny_clip, tiny_mlm, images, groups, **options)
    with _scaled_image_tower(tiny_clip, 8.0):  # a power of two: the unit-sphere embeddings are bit-identical
        scaled = run_attack(name, tiny_clip, tiny_mlm, images, groups, **options)
        assert not torch.allclose(tiny_clip.image_features(images), plain.images.new_tensor(0.0))
    moved = (plain.images - images).abs().mean()
    assert moved > 0
    assert (scaled.images - plain.images).abs().mean() <= 1e-3 * moved
    assert scaled.texts == plain.texts


def test_sga_runs_text_image_text_with_set_level_guidance(tiny_clip, tiny_mlm, tiny_captions, monkeypatch):
    images = torch.rand(3, 3, tiny_clip.image_size, tiny_clip.image_size, generator=torch.Generator().manual_seed(4))
    groups = _groups(tiny_captions, len(images), per_image=3)
    flat = [t for g in groups for t in g]
    owner = torch.tensor([i for i, g in enumerate(groups) for _ in g])
    events: list[tuple] = []
    encode_images, text_attack = tiny_clip.encode_images, BERTAttack.__call__
    goal_builder, loss = sga_module.image_similarity_goal, sga_module.pair_similarity_loss

    def record_images(x):
        events.append(("encode_images", len(x)))
        return encode_images(x)

    def record_text_attack(self, clip, mlm, texts, goal):
        result = text_attack(self, clip, mlm, texts, goal)
        events.append(("text_attack", list(texts), result.texts))
        return result

    def record_goal(image_emb):
        events.append(("goal", image_emb.detach().clone()))
        return goal_builder(image_emb)

    def record_loss(image_emb, text_emb, txt2img):
        events.append(("loss", len(image_emb), text_emb.detach().clone()))
        return loss(image_emb, text_emb, txt2img)

    monkeypatch.setattr(tiny_clip, "encode_images", record_images)
    monkeypatch.setattr(BERTAttack, "__call__", record_text_attack)
    monkeypatch.setattr(sga_module, "image_similarity_goal", record_goal)
    monkeypatch.setattr(sga_module, "pair_similarity_loss", record_loss)
    steps, scales = 2, (0.5, 1.5)
    out = run_attack("sga", tiny_clip, tiny_mlm, images, groups, steps=steps, scales=scales, mlm_threshold=None)
    monkeypatch.undo()

    kinds = [e[0] for e in events]
    first, second = [i for i, k in enumerate(kinds) if k == "text_attack"]
    image_step = [e for e in events[first:second] if e[0] in ("encode_images", "loss")]
    # text, then image (every step on the image and its rescaled copies at once), then text
    assert [e for e in image_step if e[0] == "encode_images"][:steps] == [("encode_images", 3 * len(images))] * steps
    losses = [e for e in image_step if e[0] == "loss"]
    assert len(losses) == steps * (1 + len(scales)) and all(e[1] == len(images) for e in losses)
    # step 1: the clean captions, guided by the clean image
    goals = [e[1] for e in events if e[0] == "goal"]
    assert events[first][1] == flat
    with torch.no_grad():
        clean_emb, adv_emb = encode_images(images), encode_images(out.images)
    assert torch.allclose(goals[0], clean_emb[owner], atol=1e-6)
    # step 2: the set of all adversarial captions of step 1 guides every copy
    adv_texts_1 = events[first][2]
    assert adv_texts_1 != flat
    expected = view_embed(tiny_clip, tiny_mlm, adv_texts_1, 30)  # the reference's 30-token view
    assert all(torch.allclose(e[2], expected, atol=1e-6) for e in losses)
    # step 3: the clean captions again, guided by the adversarial image
    assert events[second][1] == flat and events[second][2] == [t for g in out.texts for t in g]
    assert torch.allclose(goals[1], adv_emb[owner], atol=1e-6)
    assert not torch.allclose(goals[1], goals[0], atol=1e-4)


@pytest.mark.parametrize("name", ["pgd", "coattack", "sga"])
def test_eval_eps_without_step_size_scales_how_far_images_move(name, tiny_clip, tiny_mlm, tiny_captions):
    from pipeline.evaluation.evaluate import EvalConfig

    images = torch.rand(3, 3, tiny_clip.image_size, tiny_clip.image_size, generator=torch.Generator().manual_seed(5))
    groups = _groups(tiny_captions, len(images))
    change = {}
    for eps in (2 / 255, 4 / 255):
        options = {**EvalConfig(checkpoint="unused", eps=eps).attack_options(), "steps": 3, "top_k": 4, "mlm_threshold": None}
        # no random start: the distance travelled is the steps' alone, so a step fixed at its 2/255 value fails
        out = run_attack(name, tiny_clip, tiny_mlm, images, groups, random_start=False, **options)
        change[eps] = (out.images - images).abs().mean().item()
    assert change[4 / 255] > 1.6 * change[2 / 255] > 0


@pytest.mark.parametrize("name", ["pgd", "coattack", "sga"])
def test_seed_reaches_the_random_start_and_noise(name, tiny_clip, tiny_mlm, tiny_captions):
    images = torch.rand(2, 3, tiny_clip.image_size, tiny_clip.image_size, generator=torch.Generator().manual_seed(6))
    groups = _groups(tiny_captions, len(images))

    def attack(seed):
        return run_attack(name, tiny_clip, tiny_mlm, images, groups, steps=2, top_k=3, mlm_threshold=None,
                          seed=seed).images

    first = attack(1)
    assert torch.equal(first, attack(1))
    assert not torch.equal(first, attack(2))


def test_sga_seed_reaches_the_noise_of_the_copies(tiny_clip, tiny_mlm, tiny_captions):
    images = torch.rand(2, 3, tiny_clip.image_size, tiny_clip.image_size, generator=torch.Generator().manual_seed(7))
    groups = _groups(tiny_captions, len(images))

    def attack(seed):  # no random start: only the rescaled copies' noise depends on the seed
        return run_attack("sga", tiny_clip, tiny_mlm, images, groups, steps=2, top_k=3, mlm_threshold=None,
                          random_start=False, seed=seed).images

    assert torch.equal(attack(1), attack(1)) and not torch.equal(attack(1), attack(2))
