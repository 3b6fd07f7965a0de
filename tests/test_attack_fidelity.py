"""Details of the reference attacks that the end-to-end attack tests would not notice if they changed: where
BERT-Attack reads its candidates, which text view each guidance embedding uses, the Co-Attack loss terms, SGA's
text length and its resize. Each test names the one-line change it guards (it fails when that change is made).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pipeline.attacks import PGD, BERTAttack, TextAttackResult, run_attack
from pipeline.models.hf import MLMBundle

# Words of the tiny vocabulary (tests/conftest.py) that are no filter word and not in CAPTION.
PREDICTED = ["blue", "green", "yellow", "purple", "orange", "square", "triangle", "star", "striped", "checkered",
             "noisy", "pattern"]
CAPTION = "a red circle on a plain background"
UNK_CAPTION = "the 猫 square is blue with a noisy pattern"  # the masked LM reads 猫 as [UNK]


def _long_caption(tiny_captions: list[str]) -> str:
    return " ".join(tiny_captions[:6])  # more words than 28 masked-LM pieces


class _PositionLM(torch.nn.Module):
    """A masked LM that predicts ``PREDICTED[p % 12]`` (logit 10) at position p, whatever it reads."""

    def __init__(self, tokenizer, positions: int = 64):
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=positions)
        self.ids = torch.tensor(tokenizer.convert_tokens_to_ids(PREDICTED))
        self.vocab = len(tokenizer)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the bundle a device

    def forward(self, input_ids, attention_mask=None, **_):
        n, length = input_ids.shape
        logits = torch.zeros(n, length, self.vocab)
        logits[:, torch.arange(length), self.ids[torch.arange(length) % len(self.ids)]] = 10.0
        return SimpleNamespace(logits=logits)


def test_bert_attack_reads_candidates_one_position_early_by_default(tiny_clip, tiny_mlm):
    """Guards ``skip_cls`` defaulting to False (the reference's offsets without [CLS])."""
    tok = tiny_mlm.tokenizer
    assert tok.unk_token_id not in tok.convert_tokens_to_ids(PREDICTED)  # one vocabulary token each
    lm = MLMBundle(model=_PositionLM(tok), tokenizer=tok)
    words = CAPTION.split(" ")
    assert all(len(tok.tokenize(w)) == 1 for w in words)  # word j is piece j, at position j + 1 after [CLS]
    with torch.no_grad():
        clean = tiny_clip.encode_texts([CAPTION]).float()

    def away(emb, owner):  # any replacement moves the caption away from itself
        return -(emb * clean[owner]).sum(-1)

    def changes(attack):
        out = attack(tiny_clip, lm, [CAPTION], away).changes[0]
        assert out, "no word was replaced"
        return {c.word_index: c.replacement for c in out}

    default = changes(BERTAttack(n_words=3, top_k=1))
    assert default == {j: PREDICTED[j % 12] for j in default}  # read at position j: the piece before word j
    at_word = changes(BERTAttack(n_words=3, top_k=1, skip_cls=True))
    assert at_word == {j: PREDICTED[(j + 1) % 12] for j in at_word}


# ------------------------------------------------------------------------- guidance views and losses


def _reference_view(tiny_clip, tiny_mlm, texts: list[str], max_length: int) -> torch.Tensor:
    """The reference wrappers' inference_text: masked-LM ids as ALBEF's tokenizer makes them ([CLS] and the
    pieces, no [SEP]) padded to max_length, decoded, specials dropped."""
    tok = tiny_mlm.tokenizer
    ids = [[tok.cls_token_id] + tok(t, add_special_tokens=False)["input_ids"][:max_length - 1] for t in texts]
    ids = [row + [tok.pad_token_id] * (max_length - len(row)) for row in ids]
    decoded = [tok.decode(row).replace("[PAD]", "").replace("[CLS]", "").replace("[SEP]", "").strip() for row in ids]
    with torch.no_grad():
        return tiny_clip.encode_texts(decoded).float()


def _kl_rows(adv: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return F.kl_div(adv.log_softmax(-1), ref.softmax(-1), reduction="none").sum(-1)


def _spy(monkeypatch, adversarial: dict[str, str]) -> dict:
    """Replace the text attack (its goal and the attack itself recorded; captions mapped by ``adversarial``) and
    PGD (its loss recorded; images returned unchanged)."""
    seen: dict = {"goals": [], "lengths": [], "losses": []}

    def text_attack(self, clip, mlm, texts, goal):
        seen["goals"].append(goal)
        seen["lengths"].append(self.max_length)
        return TextAttackResult([adversarial.get(t, t) for t in texts], [[] for _ in texts])

    def pgd(self, images01, loss_fn, generator=None):
        seen["losses"].append(loss_fn)
        return images01.clone()

    monkeypatch.setattr(BERTAttack, "__call__", text_attack)
    monkeypatch.setattr(PGD, "__call__", pgd)
    return seen


@pytest.fixture()
def two_images(tiny_clip, tiny_captions):
    images = torch.rand(2, 3, tiny_clip.image_size, tiny_clip.image_size, generator=torch.Generator().manual_seed(8))
    groups = [[UNK_CAPTION, _long_caption(tiny_captions)], [tiny_captions[3]]]
    owner = torch.tensor([0, 0, 1])
    adversarial = {t: "orange " + t for g in groups for t in g}
    moved = (images + 0.03 * torch.rand(images.shape, generator=torch.Generator().manual_seed(9))).clamp(0, 1)
    return images, groups, owner, adversarial, moved


def test_views_differ_on_these_captions(tiny_clip, tiny_mlm, two_images):
    """The captions below tell the raw text, the 30-token view and the 77-token view apart."""
    _, groups, _, _, _ = two_images
    texts = [t for g in groups for t in g]
    with torch.no_grad():
        raw = tiny_clip.encode_texts(texts).float()
    v30, v77 = (_reference_view(tiny_clip, tiny_mlm, texts, n) for n in (30, 77))
    assert not torch.allclose(raw[0], v77[0], atol=1e-4)  # [UNK]
    assert not torch.allclose(v30[1], v77[1], atol=1e-4)  # truncated at 30


def test_coattack_text_goal_is_the_drift_from_the_30_token_view(tiny_clip, tiny_mlm, two_images, monkeypatch):
    """Guards the clean-text goal's view (reference: inference_text at 30) and its kind (KL drift from the clean
    caption, not image similarity)."""
    images, groups, owner, adversarial, _ = two_images
    seen = _spy(monkeypatch, adversarial)
    run_attack("coattack", tiny_clip, tiny_mlm, images, groups)
    texts = [t for g in groups for t in g]
    emb = F.normalize(torch.randn(len(texts), tiny_clip.encode_texts(texts[:1]).shape[-1],
                                  generator=torch.Generator().manual_seed(10)), dim=-1)
    got = seen["goals"][0](emb, torch.arange(len(texts)))
    expected = _kl_rows(emb, _reference_view(tiny_clip, tiny_mlm, texts, 30))
    assert torch.allclose(got, expected, atol=1e-5)


def test_coattack_image_loss_weights_the_adversarial_text_term(tiny_clip, tiny_mlm, two_images, monkeypatch):
    """Guards ``alpha`` on the adversarial-text term (not the clean-image one) and that term's target: the
    adversarial captions' 77-token view (RetrievalCLIPEval.py)."""
    images, groups, owner, adversarial, moved = two_images
    seen = _spy(monkeypatch, adversarial)
    alpha = 3.0
    run_attack("coattack", tiny_clip, tiny_mlm, images, groups, alpha=alpha)
    adv_texts = [adversarial[t] for g in groups for t in g]
    with torch.no_grad():
        got = seen["losses"][0](moved)
        clean_img, emb = tiny_clip.encode_images(images).float(), tiny_clip.encode_images(moved).float()
    away_from_clean = F.kl_div(emb.log_softmax(-1), clean_img.softmax(-1), reduction="batchmean")
    per_caption = _kl_rows(emb[owner], _reference_view(tiny_clip, tiny_mlm, adv_texts, 77))
    per_image = torch.stack([per_caption[owner == i].mean() for i in range(len(images))])
    assert torch.allclose(got, away_from_clean + alpha * per_image.mean(), rtol=1e-4)


def test_sga_text_attack_at_77_where_the_masked_lm_can(tiny_clip, tiny_mlm, two_images, monkeypatch):
    """SGA's CLIP script runs its text attack at 77 masked-LM tokens; the demo's masked LM has 64 positions."""
    images, groups, _, adversarial, _ = two_images
    seen = _spy(monkeypatch, adversarial)
    run_attack("sga", tiny_clip, tiny_mlm, images, groups)
    monkeypatch.setattr(tiny_mlm.model.config, "max_position_embeddings", 512)
    run_attack("sga", tiny_clip, tiny_mlm, images, groups)
    assert seen["lengths"] == [64, 64, 77, 77]  # two text steps per run


def _sga_loss(tiny_clip, copies: list[torch.Tensor], text_emb: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return sum(-(tiny_clip.encode_images(c).float()[owner] * text_emb).sum(-1).mean() for c in copies)


def test_sga_image_step_is_guided_by_the_30_token_view(tiny_clip, tiny_mlm, two_images, monkeypatch):
    """Guards the image step's guidance: the adversarial captions tokenised at 30 (attacker.py, SGAttacker)."""
    images, groups, owner, adversarial, moved = two_images
    seen = _spy(monkeypatch, adversarial)
    run_attack("sga", tiny_clip, tiny_mlm, images, groups, scales=())
    adv_texts = [adversarial[t] for g in groups for t in g]
    with torch.no_grad():
        got = seen["losses"][0](moved)
    expected = _sga_loss(tiny_clip, [moved], _reference_view(tiny_clip, tiny_mlm, adv_texts, 30), owner)
    assert torch.allclose(got, expected, atol=1e-6)


def test_sga_copies_are_resized_without_antialiasing(tiny_clip, tiny_mlm, tiny_captions, monkeypatch):
    """Guards the resize of SGA's copies: bicubic without antialiasing, as the reference's torchvision does."""
    images = torch.rand(2, 3, tiny_clip.image_size, tiny_clip.image_size, generator=torch.Generator().manual_seed(11))
    groups = [[tiny_captions[0]], [tiny_captions[5]]]
    seen = _spy(monkeypatch, {})
    run_attack("sga", tiny_clip, tiny_mlm, images, groups, scales=(0.5,), noise_std=0.0)
    with torch.no_grad():
        got = seen["losses"][0](images)
    text_emb = _reference_view(tiny_clip, tiny_mlm, [tiny_captions[0], tiny_captions[5]], 30)
    size, half = images.shape[-2:], [s // 2 for s in images.shape[-2:]]

    def copy(antialias: bool) -> torch.Tensor:
        small = F.interpolate(images, size=half, mode="bicubic", align_corners=False, antialias=antialias)
        return F.interpolate(small.clamp(0, 1), size=size, mode="bicubic", align_corners=False, antialias=antialias)

    owner = torch.tensor([0, 1])
    expected = _sga_loss(tiny_clip, [images, copy(False)], text_emb, owner)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, _sga_loss(tiny_clip, [images, copy(True)], text_emb, owner), atol=1e-6)
