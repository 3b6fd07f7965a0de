"""Small shared pieces of the attacks: config checks, the result type, the multimodal base class, losses.

Conventions (torchattacks style): images are float pixels in [0, 1], shape [B, 3, H, W]; the CLIP bundle
normalises inside its forward, so perturbations, eps balls and clipping all live in pixel space. Texts of an
evaluation batch come grouped per image (``texts_per_image[i]`` are the captions of image i); attacks work on
the flat list plus ``txt2img`` (caption j belongs to image ``txt2img[j]``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.core.lazy import lazy_module, no_grad

torch = lazy_module("torch")  # imported on first use: the CLI reads these settings without torch

if TYPE_CHECKING:  # type hints only: importing transformers here would slow every command's start
    from pipeline.models.hf import CLIPBundle, MLMBundle


log = logging.getLogger(__name__)


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass
class AttackOutput:
    """Adversarial images [B, 3, H, W] in [0, 1] and adversarial captions grouped per image."""

    images: torch.Tensor
    texts: list[list[str]]


def flatten_texts(texts_per_image: list[list[str]]) -> tuple[list[str], torch.Tensor]:
    """Grouped captions -> (flat list, txt2img index tensor)."""
    flat = [t for group in texts_per_image for t in group]
    owner = [i for i, group in enumerate(texts_per_image) for _ in group]
    return flat, torch.tensor(owner, dtype=torch.long)


def group_texts(flat: list[str], texts_per_image: list[list[str]]) -> list[list[str]]:
    """Inverse of :func:`flatten_texts` given the original grouping."""
    out, start = [], 0
    for group in texts_per_image:
        out.append(flat[start:start + len(group)])
        start += len(group)
    return out


def kl_drift(adv_emb: torch.Tensor, ref_emb: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """KL(softmax(ref) || softmax(adv)) over the embedding dimension: Co-Attack's embedding-distance loss."""
    return torch.nn.functional.kl_div(adv_emb.float().log_softmax(dim=-1), ref_emb.float().softmax(dim=-1), reduction=reduction)


def pair_similarity_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, txt2img: torch.Tensor) -> torch.Tensor:
    """Minus the mean cosine between each caption and its image: maximised, it pushes pairs apart.

    ``image_emb`` [B, D] and ``text_emb`` [N, D] are L2-normalised; ``txt2img`` [N] maps captions to images.
    """
    return -(image_emb[txt2img] * text_emb.to(image_emb.dtype)).sum(-1).float().mean()


@no_grad
def embed_texts(clip: CLIPBundle, texts: list[str], batch_size: int = 512) -> torch.Tensor:
    """L2-normalised text embeddings [N, D] in chunks of ``batch_size`` texts (no gradient)."""
    if not texts:
        raise ValueError("no texts to embed")
    # Chunks of similar length pad less: attacks embed thousands of near-identical variants per batch.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    sorted_texts = [texts[i] for i in order]
    emb = torch.cat([clip.encode_texts(sorted_texts[s:s + batch_size]).float() for s in range(0, len(texts), batch_size)])
    out = torch.empty_like(emb)
    out[torch.tensor(order, device=emb.device)] = emb
    return out


def make_generator(device: torch.device | str, seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Put modules in eval mode for the attack and restore their previous mode afterwards."""
    states = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, was_training in zip(modules, states):
            m.train(was_training)


class MultimodalAttack(ABC):
    """An evaluation-level attack: (clip, mlm, images, captions per image) -> adversarial images and captions.

    Subclasses implement :meth:`forward` on the flat caption list; the base handles eval mode, flattening and
    regrouping, and checks that the returned images stay within ``eps`` of the clean ones and in [0, 1].
    """

    @property
    def eps(self) -> float:
        """The L-inf budget of the image part (``self.image``, a PGD), 0 for text-only attacks."""
        image = getattr(self, "image", None)
        return float(image.eps) if image is not None else 0.0

    def __call__(self, clip: CLIPBundle, mlm: MLMBundle | None, images01: torch.Tensor,
                 texts_per_image: list[list[str]]) -> AttackOutput:
        if images01.dim() != 4 or len(images01) != len(texts_per_image):
            raise ValueError(f"images {tuple(images01.shape)} do not match {len(texts_per_image)} caption groups")
        images01 = images01.to(clip.device)
        texts, txt2img = flatten_texts(texts_per_image)
        modules = [clip.model] + ([mlm.model] if mlm is not None else [])
        with eval_mode(*modules):
            adv_images, adv_texts = self.forward(clip, mlm, images01, texts, txt2img.to(clip.device))
        self._check_bounds(images01, adv_images)
        return AttackOutput(images=adv_images.detach(), texts=group_texts(adv_texts, texts_per_image))

    @abstractmethod
    def forward(self, clip: CLIPBundle, mlm: MLMBundle | None, images01: torch.Tensor, texts: list[str],
                txt2img: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """Return adversarial images [B, 3, H, W] and the flat list of adversarial captions."""

    def _check_bounds(self, clean: torch.Tensor, adv: torch.Tensor) -> None:
        linf = (adv - clean).abs().amax().item() if adv.numel() else 0.0
        if linf > self.eps + 1e-6 or adv.min() < 0 or adv.max() > 1 or torch.isnan(adv).any():
            raise RuntimeError(f"{type(self).__name__} left the threat model: L-inf {linf:.6f} > eps {self.eps:.6f}"
                               " or pixels outside [0, 1] / NaN")
