"""Image-text retrieval metrics on the full similarity matrix, and the attack success rate.

Protocol of the CLIP retrieval evaluations in Co-Attack / SGA (Flickr30k / COCO, 5 captions per image):

- text retrieval (TR): each image ranks all captions; a hit at K when *any* of its captions is in the top K;
- image retrieval (IR): each caption ranks all images; a hit at K when its image is in the top K;
- attack success rate (ASR, as SGA reports it): among queries right at R@1 on clean data, the share the attack
  makes wrong.

A query's rank is the number of candidates scoring strictly higher than the right one (ties resolve in the
query's favour; with float embeddings exact ties do not occur in practice). Values are percentages.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def similarity(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix [images, captions] in float32 (inputs need not be normalised)."""
    return F.normalize(img_emb.float(), dim=-1) @ F.normalize(txt_emb.float(), dim=-1).T


def _as_index(txt2img: Sequence[int] | torch.Tensor, n_images: int, n_texts: int) -> torch.Tensor:
    index = torch.as_tensor(txt2img, dtype=torch.long)
    if index.shape != (n_texts,):
        raise ValueError(f"txt2img has shape {tuple(index.shape)}, expected ({n_texts},)")
    if n_texts and (index.min() < 0 or index.max() >= n_images):
        raise ValueError(f"txt2img refers to images outside [0, {n_images})")
    if torch.bincount(index, minlength=n_images).min() == 0:
        raise ValueError("every image needs at least one caption (txt2img leaves some image without one)")
    return index


def retrieval_ranks(sim: torch.Tensor, txt2img: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(best rank of each image's captions [images], rank of each caption's image [captions]), 0 = first."""
    sim = sim.float().cpu()
    n_images, n_texts = sim.shape
    index = _as_index(txt2img, n_images, n_texts)
    cols = torch.arange(n_texts)
    positive = sim[index, cols]  # similarity of each caption with its own image
    # TR: rank of caption j in the row of its image, then the best over the image's captions.
    caption_rank = (sim[index] > positive[:, None]).sum(dim=1)
    tr_rank = torch.full((n_images,), n_texts, dtype=torch.long).scatter_reduce(0, index, caption_rank, "amin")
    # IR: rank of each caption's image in its column.
    ir_rank = (sim > positive[None, :]).sum(dim=0)
    return tr_rank, ir_rank


def recall_at_k(sim: torch.Tensor, txt2img: Sequence[int] | torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                img2txts: Sequence[Sequence[int]] | None = None) -> dict[str, object]:
    """TR / IR recall at each K (percent) on the full matrix ``sim`` [images, captions].

    Returns ``{"tr_r1": .., "tr_r5": .., ..., "ir_r10": ..}`` plus the per-query R@1 correctness vectors
    ``"_tr_hits"`` (bool [images]) and ``"_ir_hits"`` (bool [captions]) for :func:`attack_success_rate`.
    ``img2txts`` (captions of each image) is implied by ``txt2img``; when given it must agree.
    """
    tr_rank, ir_rank = retrieval_ranks(sim, txt2img)
    if img2txts is not None:
        expected = [sorted(j for j, i in enumerate(torch.as_tensor(txt2img).tolist()) if i == img)
                    for img in range(sim.shape[0])]
        if [sorted(group) for group in img2txts] != expected:
            raise ValueError("img2txts does not agree with txt2img")
    out: dict[str, object] = {}
    for side, rank in (("tr", tr_rank), ("ir", ir_rank)):
        for k in ks:
            out[f"{side}_r{k}"] = 100.0 * (rank < k).float().mean().item()
    out["_tr_hits"], out["_ir_hits"] = tr_rank == 0, ir_rank == 0
    return out


def attack_success_rate(clean_correct: torch.Tensor, adv_correct: torch.Tensor) -> float:
    """Percent of the queries correct at R@1 on clean data that are wrong under attack (0 if none was correct)."""
    clean_correct, adv_correct = torch.as_tensor(clean_correct).bool(), torch.as_tensor(adv_correct).bool()
    if clean_correct.shape != adv_correct.shape:
        raise ValueError(f"shapes differ: {tuple(clean_correct.shape)} vs {tuple(adv_correct.shape)}")
    n = int(clean_correct.sum())
    return 100.0 * int((clean_correct & ~adv_correct).sum()) / n if n else 0.0
