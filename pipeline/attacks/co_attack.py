"""Co-Attack: collaborative multimodal attack, text first, then the image.

Zhang, Yi and Sang, "Towards Adversarial Attack on Vision-Language Pre-training Models" (ACM MM 2022), in the
form its code runs on CLIP (adversarial-for-goodness/Co-Attack: ``RetrievalCLIPEval.py`` with ``--adv 4``,
``attack/multimodalAttack.py`` ``MultiModalAttacker.run_before_fusion``, ``attack/imageAttack.py``
``ImageAttacker``; embeddings from ``models/clip/model.py`` ``inference_image`` / ``inference_text``, both
L2-normalised):

1. text: BERT-Attack whose goal moves each caption's embedding away from its clean embedding
   (KL of the softmaxed embeddings, :func:`text_drift_goal`); the clean embedding is that of the caption as the
   reference's ``inference_text`` sees it at the text attack's ``max_length`` (30): masked-LM ids decoded back
   (:func:`~pipeline.attacks.text_parts.view_embed`);
2. image: PGD maximising ``KL(clean image emb || adv image emb) + alpha * KL(adv caption emb || adv image emb)``
   on L2-normalised embeddings (KL over the softmax of the embedding dimension, the reference's
   ``KLDivLoss(reduction='batchmean')``), so the image leaves both its clean self and the adversarial text.
   The adversarial captions are embedded through the same decoded view at 77 masked-LM tokens
   (:data:`IMAGE_STEP_VIEW`: ``RetrievalCLIPEval.py`` passes ``max_length=77`` to ``run_before_fusion``).
   Being on the unit sphere, the loss does not change when the image tower's output is rescaled.

Defaults as published: eps 2/255, 10 steps, step ``eps / steps * 1.25`` (0.25/255 at 2/255; it follows eps and
steps unless ``step_size`` is given), random start uniform in [0, eps] (``start="positive"``), alpha 3, top-10
candidates, one word.

Remaining differences, each for a reason:

- The reference's loader yields (image, caption) pairs, so an image is attacked once per caption and the last
  caption's adversarial copy is the one scored. We attack each image once, with the text term averaged over
  its captions (the per-image loss is the mean of the reference's per-pair losses), so every image has one
  adversarial version, as retrieval scoring needs.
- The random start is clipped to [0, 1] before the first gradient (the reference does not clip it until after
  the first step); see :mod:`pipeline.attacks.pgd`.

Shapes: images01 [B, 3, H, W] in [0, 1], captions grouped per image -> :class:`AttackOutput`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dataclasses import dataclass

import torch

from pipeline.attacks.base import MultimodalAttack, check_positive, kl_drift, make_generator
from pipeline.attacks.bert_attack import BERTAttack, text_drift_goal
from pipeline.attacks.pgd import PGD
from pipeline.attacks.text_parts import view_embed

if TYPE_CHECKING:  # type hints only: importing transformers here would slow every command's start
    from pipeline.models.hf import CLIPBundle, MLMBundle

IMAGE_STEP_VIEW = 77  # masked-LM tokens of the adversarial captions' view in the image step (RetrievalCLIPEval.py)


def per_image_mean(values: torch.Tensor, txt2img: torch.Tensor, n_images: int) -> torch.Tensor:
    """Mean of per-caption ``values`` [N] over each image's captions -> [n_images]."""
    sums = torch.zeros(n_images, dtype=values.dtype, device=values.device).index_add(0, txt2img, values)
    counts = torch.bincount(txt2img, minlength=n_images).clamp(min=1).to(values.dtype)
    return sums / counts


@dataclass(frozen=True)
class CoAttack(MultimodalAttack):
    """``seed`` seeds the PGD random start (None: the global torch RNG)."""

    image: PGD = PGD(eps=2 / 255, steps=10, step_ratio=1.25, step_ratio_over_steps=True, start="positive")
    text: BERTAttack = BERTAttack()
    alpha: float = 3.0
    seed: int | None = 0

    def __post_init__(self) -> None:
        check_positive("alpha", self.alpha, allow_zero=True)

    def forward(self, clip: CLIPBundle, mlm: MLMBundle | None, images01: torch.Tensor, texts: list[str],
                txt2img: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        if mlm is None:
            raise ValueError("Co-Attack needs a masked LM (mlm bundle)")
        # 1. Text attack away from the clean captions.
        clean_text = view_embed(clip, mlm, texts, self.text.max_length, self.text.batch_size)
        adv_texts = self.text(clip, mlm, texts, text_drift_goal(clean_text)).texts

        # 2. Image attack away from the clean image and from the adversarial captions (unit-sphere embeddings).
        adv_text = view_embed(clip, mlm, adv_texts, IMAGE_STEP_VIEW, self.text.batch_size)
        with torch.no_grad():
            clean_image = clip.encode_images(images01).float()

        def loss_fn(x: torch.Tensor) -> torch.Tensor:
            emb = clip.encode_images(x).float()
            away_from_text = kl_drift(emb[txt2img], adv_text, reduction="none").sum(-1)
            per_image = per_image_mean(away_from_text, txt2img, len(x))
            return kl_drift(emb, clean_image) + self.alpha * per_image.mean()

        adv_images = self.image(images01, loss_fn, make_generator(images01.device, self.seed))
        return adv_images, adv_texts
