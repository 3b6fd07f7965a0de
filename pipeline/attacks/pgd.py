"""PGD: projected gradient ascent in an L-inf ball around [0, 1] pixels.

Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks" (ICLR 2018). Defaults are the
image-only PGD of the SGA evaluation on CLIP (Zoky-2020/SGA, ``attacker.py`` ``ImageAttacker`` with the
``eval_*.py`` settings): eps 2/255, 10 steps, step 0.5/255, start uniform in [-eps, eps] clipped to [0, 1],
signed-gradient steps projected onto the ball and [0, 1]. Training (TeCoA, FARE, MAT) uses the same class with
2 steps and an explicit step size.

Step size: ``step_size=None`` (the default) follows eps by the published ratio, ``eps * step_ratio`` (0.25: SGA's
0.5/255 at 2/255), or ``eps * step_ratio / steps`` with ``step_ratio_over_steps`` (Co-Attack's
``eps / steps * 1.25``), so overriding eps keeps each attack's published step-to-budget ratio; an explicit
``step_size`` wins. Random start: ``start="symmetric"`` draws from [-eps, eps] (SGA, TeCoA, FARE),
``"positive"`` from [0, eps] (Co-Attack's ``random_init``).

Remaining differences: the start is clipped to [0, 1] before the first gradient (Co-Attack's and FARE's code
evaluate the first gradient at the unclipped start, which can leave [0, 1] by up to eps; our threat model never
does); SGA divides the gradient by its mean absolute value before the sign, which leaves the sign unchanged.

The attack is model-free: it maximises any differentiable ``loss_fn(adv_images01) -> scalar``; the caller
closes over the model (normalisation happens inside the CLIP bundle). Gradients are taken with
``torch.autograd.grad`` with respect to the images only, so model parameters' ``.grad`` stay untouched and
the attack can run in the middle of a training step. Co-Attack and SGA reuse this class with their losses.

Shapes: images01 [B, 3, H, W] in [0, 1] -> adversarial images of the same shape, detached, with
``|adv - images01|_inf <= eps`` and ``0 <= adv <= 1``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.core.lazy import lazy_module
from pipeline.core.config import option
from pipeline.attacks.base import (
    MultimodalAttack,
    check_positive,
    embed_texts,
    make_generator,
    pair_similarity_loss,
)

torch = lazy_module("torch")  # imported on first use: the CLI reads these settings without torch

if TYPE_CHECKING:  # type hints only: importing transformers here would slow every command's start
    from pipeline.models.hf import CLIPBundle, MLMBundle

LossFn = Callable[["torch.Tensor"], "torch.Tensor"]
STARTS = ("symmetric", "positive")


@dataclass(frozen=True)
class PGD:
    eps: float = field(default=2 / 255, metadata=option("EPS", "L-inf budget on [0, 1] pixels (a fraction such as 4/255 works).", pixels=True))
    steps: int = field(default=10, metadata=option("PGD_STEPS", "PGD steps.", flag="--pgd-steps"))
    step_size: float | None = field(default=None, metadata=option(  # None: follows eps, see step_length
        "PGD_STEP_SIZE", "PGD step size (default: EPS x step_ratio).", flag="--pgd-step-size", pixels=True))
    step_ratio: float = 0.25
    step_ratio_over_steps: bool = False
    random_start: bool = True
    start: str = "symmetric"

    def __post_init__(self) -> None:
        check_positive("eps", self.eps, allow_zero=True)
        check_positive("steps", self.steps, allow_zero=True)
        if self.step_size is not None:
            check_positive("step_size", self.step_size)
        check_positive("step_ratio", self.step_ratio)
        if int(self.steps) != self.steps:
            raise ValueError(f"steps must be an integer, got {self.steps!r}")
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {self.start!r}")

    @property
    def step_length(self) -> float:
        """The step actually taken: ``step_size`` if given, else eps times the ratio (per step or per run)."""
        if self.step_size is not None:
            return float(self.step_size)
        return self.eps * self.step_ratio / (max(int(self.steps), 1) if self.step_ratio_over_steps else 1)

    def init(self, images01: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Starting point: the clean images, or a uniform draw ([-eps, eps] or [0, eps]) clipped to [0, 1]."""
        if not self.random_start or self.eps == 0:
            return images01.detach().clone()
        noise = torch.rand(images01.shape, generator=generator, device=images01.device, dtype=images01.dtype)
        offset = noise if self.start == "positive" else 2 * noise - 1
        return (images01.detach() + offset * self.eps).clamp(0.0, 1.0)

    def step(self, adv: torch.Tensor, images01: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """One signed-gradient ascent step, projected onto the eps ball and [0, 1]."""
        adv = adv.detach() + self.step_length * grad.sign()
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
    """Evaluation-level PGD: perturb each image away from its own captions (minus mean cosine); texts untouched.

    This is SGA's ``ImageAttacker.txt_guided_attack`` without rescaled copies, guided by the clean captions (the
    image-only baseline of the SGA evaluation). Co-Attack's image-only baseline (``ImageAttacker.run_trades``)
    differs (it pushes the image embedding away from its clean self, a KL, with Co-Attack's step rule) and is
    not provided. ``seed`` seeds the random start (None: the global torch RNG)."""

    image: PGD = PGD()
    seed: int | None = 0

    def forward(self, clip: CLIPBundle, mlm: MLMBundle | None, images01: torch.Tensor, texts: list[str],
                txt2img: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        text_emb = embed_texts(clip, texts)
        adv = self.image(images01, lambda x: pair_similarity_loss(clip.encode_images(x), text_emb, txt2img),
                         make_generator(images01.device, self.seed))
        return adv, list(texts)
