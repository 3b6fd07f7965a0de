"""Each training mode lowers its own loss in a few steps on a fixed toy batch (tiny CLIP, CPU, seconds)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.models.hf import load_clip, load_mlm
from pipeline.core.config import apply_overrides
from pipeline.train.config import TrainAttackConfig, TrainConfig
from pipeline.train.loop import train_step
from pipeline.train.modes import MODES, DualEncoder, build_mode
from pipeline.train.toy import COLOURS



def _attack(**changes) -> TrainAttackConfig:
    """Training's attack with fields changed by dotted name (image.eps, text.top_k, order)."""
    return apply_overrides(TrainAttackConfig(), changes)


def _batch(size: int) -> dict:
    names = list(COLOURS)[:size]
    images = torch.stack([torch.tensor(COLOURS[n], dtype=torch.float32).view(3, 1, 1).expand(3, 32, 32) / 255
                          for n in names])
    images = (images + 0.05 * torch.rand(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    return {"images": images, "texts": [f"a {n} circle on a plain background" for n in names]}


def _run(mode_name: str, model_dirs: dict, steps: int = 8, lr: float = 3e-3) -> tuple[list[float], object]:
    torch.manual_seed(0)
    clip = load_clip(model_dirs["clip"])
    mlm = load_mlm(model_dirs["mlm"]) if "mlm" in MODES.get(mode_name).needs else None
    cfg = TrainConfig(mode=mode_name, data=dataclasses.replace(
        TrainConfig().data, stages=("x",) if mode_name == "matplus" else ()))
    mode = build_mode(cfg, clip, mlm)
    mode.prepare(clip.model)
    if mode_name == "fare":  # FARE starts at its optimum (the model is its own reference): move away first
        with torch.no_grad():
            for param in clip.model.vision_model.parameters():
                param.add_(0.05 * torch.randn_like(param))
    net = DualEncoder(clip).train()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr)
    batch, losses = _batch(6), []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        losses.append(train_step(net, mode, [batch], bf16=False, device=torch.device("cpu"))["loss"])
        optimizer.step()
    return losses, mode


@pytest.mark.parametrize("mode_name", ["ft", "tecoa", "fare", "mat", "matplus"])
def test_mode_lowers_its_loss(mode_name, tiny_model_dirs):
    losses, mode = _run(mode_name, tiny_model_dirs, lr=1e-3 if mode_name == "fare" else 3e-3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 < losses[0], losses


def test_tecoa_and_fare_train_only_the_vision_tower(tiny_model_dirs):
    for name in ("tecoa", "fare"):
        _, mode = _run(name, tiny_model_dirs, steps=1)
        trainable = {n for n, p in mode.clip.model.named_parameters() if p.requires_grad}
        assert trainable and all(n.startswith(("vision_model.", "visual_projection.")) for n in trainable)


def test_adversarial_loss_exceeds_clean_loss(tiny_model_dirs):
    """The 2-step PGD inside TeCoA raises the contrastive loss over the clean one at the same weights."""
    clip = load_clip(tiny_model_dirs["clip"])
    cfg = TrainConfig(mode="tecoa", attack=_attack(**{"image.eps": 8 / 255, "image.step_size": 4 / 255}))
    batch = _batch(6)
    ft = build_mode(dataclasses.replace(cfg, mode="ft"), clip)
    tecoa = build_mode(cfg, clip)
    net = DualEncoder(clip)
    with torch.no_grad():
        clean = ft(net, batch)["contrastive"]
    torch.manual_seed(0)
    adversarial = tecoa(net, batch)["contrastive"]
    assert adversarial > clean
    assert tecoa.timings["image_attack"] > 0


@pytest.mark.parametrize("order", ["text-first", "image-first", "joint"])
def test_mat_order_decides_what_guides_each_attack(order, tiny_model_dirs, monkeypatch):
    """text-first: text guided by the clean image, image by the adversarial texts; image-first: image by the
    clean texts, text by the adversarial image; joint: both from the clean pair."""
    import pipeline.train.modes as modes

    clip, mlm = load_clip(tiny_model_dirs["clip"]), load_mlm(tiny_model_dirs["mlm"])
    cfg = TrainConfig(mode="mat", attack=_attack(**{"image.eps": 8 / 255, "image.step_size": 4 / 255, "order": order}))
    mode = build_mode(cfg, clip, mlm)
    seen: dict[str, list] = {"goal_image": [], "pgd_texts": [], "trained": []}
    goal_builder, text_features, contrastive = modes.image_similarity_goal, mode._text_features, mode._contrastive

    def record_goal(image_emb):
        seen["goal_image"].append(image_emb.detach().clone())
        return goal_builder(image_emb)

    def record_text_features(texts):
        seen["pgd_texts"].append(list(texts))
        return text_features(texts)

    def record_contrastive(net, images, texts):
        seen["trained"].append((images.detach().clone(), list(texts)))
        return contrastive(net, images, texts)

    monkeypatch.setattr(modes, "image_similarity_goal", record_goal)
    monkeypatch.setattr(mode, "_text_features", record_text_features)
    monkeypatch.setattr(mode, "_contrastive", record_contrastive)
    batch = _batch(6)
    mode(DualEncoder(clip), batch)

    [(adv_images, adv_texts)] = seen["trained"]
    [goal_image], [pgd_texts] = seen["goal_image"], seen["pgd_texts"]
    with torch.no_grad():
        clean_emb, adv_emb = clip.encode_images(batch["images"]).float(), clip.encode_images(adv_images).float()
    assert not torch.allclose(clean_emb, adv_emb, atol=1e-3) and adv_texts != batch["texts"]
    text_guide = adv_emb if order == "image-first" else clean_emb
    assert torch.allclose(goal_image, text_guide, atol=1e-6)
    assert pgd_texts == (adv_texts if order == "text-first" else batch["texts"])
    assert set(mode.timings) == {"text_attack", "image_attack"}


def test_unknown_mode_and_bad_values_are_named():
    with pytest.raises(ValueError, match="mode='nope'"):
        TrainConfig(mode="nope")
    with pytest.raises(ValueError, match="order"):
        TrainConfig(attack=TrainAttackConfig(order="sideways"))
    with pytest.raises(ValueError, match="attack.image.eps"):
        _attack(**{"image.eps": 2.0})
    with pytest.raises(ValueError, match="top_k"):
        _attack(**{"text.top_k": 0})



@pytest.mark.parametrize("eps, step_size, expected", [(2 / 255, None, 1 / 255), (4 / 255, None, 2 / 255),
                                                      (4 / 255, 0.5 / 255, 0.5 / 255)])
def test_training_pgd_step_follows_eps_unless_given(eps, step_size, expected, tiny_model_dirs, monkeypatch):
    from pipeline.attacks import PGD

    real_call, used = PGD.__call__, []

    def recording_call(self, *args, **kwargs):
        used.append(self)
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(PGD, "__call__", recording_call)
    cfg = TrainConfig(mode="tecoa", attack=_attack(**{"image.eps": eps, "image.step_size": step_size}))
    clip = load_clip(tiny_model_dirs["clip"])
    mode = build_mode(cfg, clip)
    net = DualEncoder(clip).train()
    train_step(net, mode, [_batch(4)], bf16=False, device=torch.device("cpu"))
    assert used and used[0] is cfg.attack.image and used[0].step_length == pytest.approx(expected)


def test_training_attacks_default_to_the_former_settings():
    """eps 2/255, 2 steps of eps/2 from a symmetric random start; BERT-Attack reference, 1 word, top-10, threshold 0.3."""
    from pipeline.attacks import PGD, BERTAttack

    attack = TrainConfig().attack
    assert attack.image == PGD(eps=2 / 255, steps=2, step_size=None, step_ratio=0.5, random_start=True)
    assert attack.image.step_length == pytest.approx(1 / 255) and attack.image.start == "symmetric"
    assert attack.text == BERTAttack(n_words=1, top_k=10, variant="reference") and attack.text.mlm_threshold == 0.3
    assert attack.order == "text-first"


def test_text_attack_settings_reach_the_bert_attack_mat_builds(tiny_model_dirs):
    clip, mlm = load_clip(tiny_model_dirs["clip"]), load_mlm(tiny_model_dirs["mlm"])
    cfg = apply_overrides(TrainConfig(mode="mat"), ["attack.text.mlm_threshold=0.5", "attack.text.top_k=4"])
    mode = build_mode(cfg, clip, mlm)
    assert mode.text_attack.mlm_threshold == 0.5 and mode.text_attack.top_k == 4 and mode.text_attack.variant == "reference"


def test_matplus_stages_come_from_its_mode_class():
    from pipeline.train.config import DataConfig, resolve_stages

    assert MODES.get("matplus").default("stages") == ("i2t-human",) and "stages" in MODES.get("matplus").needs
    assert resolve_stages(TrainConfig(mode="matplus")).data.stages == ("i2t-human",)
    assert resolve_stages(TrainConfig(mode="matplus", data=DataConfig(stages=("eda",)))).data.stages == ("eda",)
    assert resolve_stages(TrainConfig(mode="mat")).data.stages == ()
    with pytest.raises(ValueError, match="captions='all'"):  # the default stages are checked against the data
        TrainConfig(mode="matplus", data=DataConfig(captions="all"))
