"""PGD: projected gradient ascent in an L-inf ball around [0, 1] pixels.

Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks" (ICLR 2018).
Defaults are the image-attack settings of SGA / Co-Attack evaluations on CLIP: eps 2/255, 10 steps,
step 0.5/255, uniform random start. Training (TeCoA, FARE, MAT) uses the same class with 2 steps.

The attack is model-free: it maximises any differentiable ``loss_fn(adv_images01) -> scalar``; the caller
closes over the model (normalisation happens inside the CLIP bundle). Gradients are taken with
``torch.autograd.grad`` with respect to the images only, so model parameters' ``.grad`` stay untouched and
the attack can run in the middle of a training step. Co-Attack and SGA reuse this class with their losses.

Shapes: images01 [B, 3, H, W] in [0, 1] -> adversarial images of the same shape, detached, with
``|adv - images01|_inf <= eps`` and ``0 <= adv <= 1``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.attacks.base import (
    MultimodalAttack,
    check_positive,
    embed_texts,
    make_generator,
    pair_similarity_loss,
)
from pipeline.models import CLIPBundle, MLMBundle

LossFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PGD:
    eps: float = 2 / 255
    steps: int = 10
    step_size: float = 0.5 / 255
    random_start: bool = True

    def __post_init__(self) -> None:
        check_positive("eps", self.eps, allow_zero=True)
        check_positive("steps", self.steps, allow_zero=True)
        check_positive("step_size", self.step_size)
        if int(self.steps) != self.steps:
            raise ValueError(f"steps must be an integer, got {self.steps!r}")

    def init(self, images01: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Starting point: the clean images, or a uniform draw from the eps ball clipped to [0, 1]."""
        if not self.random_start or self.eps == 0:
            return images01.detach().clone()
        noise = torch.rand(images01.shape, generator=generator, device=images01.device, dtype=images01.dtype)
        return (images01.detach() + (2 * noise - 1) * self.eps).clamp(0.0, 1.0)

    def step(self, adv: torch.Tensor, images01: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """One signed-gradient ascent step, projected onto the eps ball and [0, 1]."""
        adv = adv.detach() + self.step_size * grad.sign()
        adv = torch.minimum(torch.maximum(adv, images01 - self.eps), images01 + self.eps)
        return adv.clamp(0.0, 1.0)

    def __call__(self, images01: torch.Tensor, loss_fn: LossFn,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        images01 = images01.detach()
        adv = self.init(images01, generator)
        for _ in range(int(self.steps)):
            adv.requires_grad_(True)
            with torch.enable_grad():
                loss = loss_fn(adv)
                (grad,) = torch.autograd.grad(loss, adv)
            adv = self.step(adv, images01, grad)
        return adv.detach()


@dataclass(frozen=True)
class PGDAttack(MultimodalAttack):
    """Evaluation-level PGD: perturb each image away from its own captions (minus mean cosine); texts untouched."""

    image: PGD = PGD()
    seed: int | None = 0

    def forward(self, clip: CLIPBundle, mlm: MLMBundle | None, images01: torch.Tensor, texts: list[str],
                txt2img: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        text_emb = embed_texts(clip, texts)
        adv = self.image(images01, lambda x: pair_similarity_loss(clip.encode_images(x), text_emb, txt2img),
                         make_generator(images01.device, self.seed))
        return adv, list(texts)
