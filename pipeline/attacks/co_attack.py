"""Co-Attack: collaborative multimodal attack, text first, then the image.

Zhang, Yi and Sang, "Towards Adversarial Attack on Vision-Language Pre-training Models" (ACM MM 2022), in the
form its code runs on CLIP (embeddings compared before any fusion):

1. text: BERT-Attack whose goal moves each caption's embedding away from its clean embedding
   (KL of the softmaxed embeddings, :func:`text_drift_goal`);
2. image: PGD maximising ``KL(clean image feature || adv image feature)
   + alpha * KL(adv caption embedding || adv image embedding)`` (the second term on L2-normalised embeddings,
   averaged over the image's captions), so the image leaves both its clean self and the adversarial text.

Defaults as published: eps 2/255, 10 steps, step 0.25/255 (the code's eps / steps * 1.25), alpha 3, top-10
candidates, one word. Difference: the published code starts PGD from a uniform draw in [0, eps]; ours from
[-eps, eps] (the shared PGD).

Shapes: images01 [B, 3, H, W] in [0, 1], captions grouped per image -> :class:`AttackOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.attacks.base import MultimodalAttack, check_positive, embed_texts, kl_drift, make_generator
from pipeline.attacks.bert_attack import BERTAttack, text_drift_goal
from pipeline.attacks.pgd import PGD
from pipeline.models import CLIPBundle, MLMBundle


@dataclass(frozen=True)
class CoAttack(MultimodalAttack):
    image: PGD = PGD(eps=2 / 255, steps=10, step_size=0.25 / 255)
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
        clean_text = embed_texts(clip, texts, self.text.batch_size)
        adv_texts = self.text(clip, mlm, texts, text_drift_goal(clean_text)).texts

        # 2. Image attack away from the clean image and from the adversarial captions.
        adv_text = embed_texts(clip, adv_texts, self.text.batch_size)
        with torch.no_grad():
            clean_image = clip.image_features(images01).float()

        def loss_fn(x: torch.Tensor) -> torch.Tensor:
            feats = clip.image_features(x).float()
            away_from_text = kl_drift(F.normalize(feats, dim=-1)[txt2img], adv_text)
            return kl_drift(feats, clean_image) + self.alpha * away_from_text

        adv_images = self.image(images01, loss_fn, make_generator(images01.device, self.seed))
        return adv_images, adv_texts
