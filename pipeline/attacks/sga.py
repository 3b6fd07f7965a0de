"""SGA: Set-level Guidance Attack.

Lu, Wang, Tang, Wang and Wu, "Set-level Guidance Attack: Boosting Adversarial Transferability of
Vision-Language Pre-training Models" (ICCV 2023); reference code Zoky-2020/SGA, ``attacker.py``
(``SGAttacker.attack``, ``ImageAttacker.txt_guided_attack`` / ``get_scaled_imgs``, ``TextAttacker``) run with the
settings of ``eval_clip-vit2clip-cnn.py``. Three steps, each guided by a *set* from the other modality:

1. text: BERT-Attack on every caption, lowering its cosine to the clean image;
2. image: PGD lowering the cosine between the image and *all* of its adversarial captions, the loss summed over
   the image itself and rescaled copies of it (scales 0.5, 0.75, 1.25, 1.5; each copy gets fresh Gaussian
   noise of std 0.05, is resized bicubically to the scale, clipped to [0, 1] and resized back). The captions
   are embedded as the reference's ``inference_text`` sees them: masked-LM ids truncated to 30 tokens
   (:data:`IMAGE_STEP_VIEW`, fixed in ``SGAttacker.attack`` whatever the text attack's length), decoded back;
3. text again: BERT-Attack on the *clean* captions, now lowering their cosine to the adversarial image.

Defaults as published: eps 2/255, 10 steps, step 0.5/255 (eps / 4: it follows eps unless ``step_size`` is
given), random start uniform in [-eps, eps] clipped to [0, 1], top-10 candidates, one word, MLM threshold 0.3,
text attack at ``max_length`` 77 masked-LM tokens (the CLIP script's ``TextAttacker(max_length=77)``; a masked
LM with fewer positions, such as the demo's 64, runs at its own limit instead, logged),
resizes without antialiasing (the reference's torchvision 0.15 ``transforms.Resize`` on tensors does not
antialias; ``antialias=True`` is the option). ``seed`` seeds the random start and the copies' noise (None: the
global torch RNG).

Remaining differences: the reference divides the gradient by its mean absolute value before the sign (the sign
is unchanged); its loss sums each image's caption cosines and averages over images, ours averages over all
captions, a positive constant factor per batch that the signed step ignores; the noise comes from torch's RNG
instead of numpy's.

Shapes: images01 [B, 3, H, W] in [0, 1], captions grouped per image -> :class:`AttackOutput`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as TF

from pipeline.attacks.base import MultimodalAttack, check_positive, make_generator, pair_similarity_loss
from pipeline.attacks.bert_attack import BERTAttack, image_similarity_goal
from pipeline.attacks.pgd import PGD
from pipeline.attacks.text_parts import view_embed

if TYPE_CHECKING:  # type hints only: importing transformers here would slow every command's start
    from pipeline.models.hf import CLIPBundle, MLMBundle

log = logging.getLogger(__name__)

TEXT_MAX_LENGTH = 77  # eval_clip-vit2clip-cnn.py: TextAttacker(max_length=77)
IMAGE_STEP_VIEW = 30  # attacker.py SGAttacker.attack tokenises the adversarial captions at 30 for the image step
_CUT_LOGGED: set[tuple[int, int]] = set()


def scaled_copies(images01: torch.Tensor, scales: tuple[float, ...], noise_std: float,
                  generator: torch.Generator | None = None, antialias: bool = False) -> list[torch.Tensor]:
    """The images followed by their noisy rescaled copies (differentiable), each [B, 3, H, W]."""
    size = list(images01.shape[-2:])
    out = [images01]
    for scale in scales:
        noise = torch.randn(images01.shape, generator=generator, device=images01.device, dtype=images01.dtype)
        x = images01 + noise_std * noise
        x = TF.resize(x, [int(scale * size[0]), int(scale * size[1])],
                      interpolation=TF.InterpolationMode.BICUBIC, antialias=antialias).clamp(0.0, 1.0)
        out.append(TF.resize(x, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=antialias))
    return out


@dataclass(frozen=True)
class SGA(MultimodalAttack):
    image: PGD = PGD(eps=2 / 255, steps=10, step_ratio=0.25)
    text: BERTAttack = BERTAttack(max_length=TEXT_MAX_LENGTH)
    scales: tuple[float, ...] = (0.5, 0.75, 1.25, 1.5)
    noise_std: float = 0.05
    antialias: bool = False
    seed: int | None = 0

    def __post_init__(self) -> None:
        check_positive("noise_std", self.noise_std, allow_zero=True)
        for scale in self.scales:
            check_positive("scales", scale)

    def forward(self, clip: CLIPBundle, mlm: MLMBundle | None, images01: torch.Tensor, texts: list[str],
                txt2img: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        if mlm is None:
            raise ValueError("SGA needs a masked LM (mlm bundle)")
        generator = make_generator(images01.device, self.seed)
        text = self.text_attack(mlm)

        # 1. Captions guided by the clean image.
        with torch.no_grad():
            clean_image = clip.encode_images(images01).float()
        adv_texts = text(clip, mlm, texts, image_similarity_goal(clean_image[txt2img])).texts

        # 2. Image guided by the set of its adversarial captions, over the set of rescaled copies.
        adv_text = view_embed(clip, mlm, adv_texts, IMAGE_STEP_VIEW, text.batch_size)

        def loss_fn(x: torch.Tensor) -> torch.Tensor:
            copies = scaled_copies(x, self.scales, self.noise_std, generator, self.antialias)
            emb = clip.encode_images(torch.cat(copies)).float().view(len(copies), len(x), -1)
            return sum(pair_similarity_loss(e, adv_text, txt2img) for e in emb)

        adv_images = self.image(images01, loss_fn, generator)

        # 3. Clean captions again, guided by the adversarial image.
        with torch.no_grad():
            adv_image = clip.encode_images(adv_images).float()
        return adv_images, text(clip, mlm, texts, image_similarity_goal(adv_image[txt2img])).texts

    def text_attack(self, mlm: MLMBundle) -> BERTAttack:
        """``self.text``, its ``max_length`` cut to the masked LM's positions where it has fewer."""
        limit = mlm.model.config.max_position_embeddings
        if self.text.max_length <= limit:
            return self.text
        if (limit, self.text.max_length) not in _CUT_LOGGED:  # once, not per batch
            _CUT_LOGGED.add((limit, self.text.max_length))
            log.info("SGA: text attack at max_length %d, the masked LM's positions (reference: %d)", limit,
                     self.text.max_length)
        return dataclasses.replace(self.text, max_length=limit)
