"""Image-text retrieval metrics on the full similarity matrix, and the attack success rate.

Protocol of the CLIP retrieval evaluations in Co-Attack / SGA (Flickr30k / COCO, 5 captions per image):

- text retrieval (TR): each image ranks all captions; a hit at K when *any* of its captions is in the top K;
- image retrieval (IR): each caption ranks all images; a hit at K when its image is in the top K;
- attack success rate (ASR, as SGA reports it): among queries right at R@K on clean data, the share the attack
  makes wrong at R@K (SGA's ``eval_*.py`` report it at K = 1, 5 and 10 against the clean ranks).

A query's rank is the number of candidates scoring strictly higher than the right one (ties resolve in the
query's favour; with float embeddings exact ties do not occur in practice). Values are percentages.

Memory: besides the matrix itself (images x captions float32: 500 MB at COCO's 5,000 x 25,010), the ranks need
only slices of ``CHUNK_ELEMENTS`` booleans. An image's best caption rank is the rank of its best-scoring caption
(the count of captions above a score only falls as the score grows), so no captions x captions matrix is built.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 24  # elements per comparison slice (16 MB of booleans)


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


def retrieval_ranks(sim: torch.Tensor, txt2img: Sequence[int] | torch.Tensor,
                    chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(best rank of each image's captions [images], rank of each caption's image [captions]), 0 = first.

    Memory beyond ``sim`` is O(``chunk_elements``): the comparisons run over slices of rows (TR) and columns (IR).
    """
    sim = sim.float().cpu()
    n_images, n_texts = sim.shape
    index = _as_index(txt2img, n_images, n_texts)
    positive = sim[index, torch.arange(n_texts)]  # similarity of each caption with its own image
    # TR: the best rank over an image's captions is the rank of its best-scoring caption, since the count of
    # captions scoring above x only falls as x grows; so one row comparison per image, no captions x captions.
    best = torch.full((n_images,), float("-inf")).scatter_reduce(0, index, positive, "amax")
    tr_rank = torch.empty(n_images, dtype=torch.long)
    rows = max(1, chunk_elements // max(n_texts, 1))
    for start in range(0, n_images, rows):
        stop = start + rows
        tr_rank[start:stop] = (sim[start:stop] > best[start:stop, None]).sum(dim=1)
    # IR: rank of each caption's image in its column.
    ir_rank = torch.empty(n_texts, dtype=torch.long)
    cols = max(1, chunk_elements // max(n_images, 1))
    for start in range(0, n_texts, cols):
        stop = start + cols
        ir_rank[start:stop] = (sim[:, start:stop] > positive[None, start:stop]).sum(dim=0)
    return tr_rank, ir_rank


def recall_at_k(sim: torch.Tensor, txt2img: Sequence[int] | torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                img2txts: Sequence[Sequence[int]] | None = None) -> dict[str, object]:
    """TR / IR recall at each K (percent) on the full matrix ``sim`` [images, captions].

    Returns ``{"tr_r1": .., "tr_r5": .., ..., "ir_r10": ..}`` plus the per-query R@1 correctness vectors
    ``"_tr_hits"`` (bool [images]) and ``"_ir_hits"`` (bool [captions]) for :func:`attack_success_rate`, and the
    ranks ``"_tr_rank"`` / ``"_ir_rank"`` (per-query outcomes at every K, for bootstrap intervals).
    ``img2txts`` (captions of each image) is implied by ``txt2img``; when given it must agree.
    """
    tr_rank, ir_rank = retrieval_ranks(sim, txt2img)
    if img2txts is not None:
        _check_groups(img2txts, torch.as_tensor(txt2img, dtype=torch.long), sim.shape[0])
    out: dict[str, object] = {}
    for side, rank in (("tr", tr_rank), ("ir", ir_rank)):
        for k in ks:
            out[f"{side}_r{k}"] = 100.0 * (rank < k).float().mean().item()
    out["_tr_hits"], out["_ir_hits"] = tr_rank == 0, ir_rank == 0
    out["_tr_rank"], out["_ir_rank"] = tr_rank, ir_rank
    return out


def _check_groups(img2txts: Sequence[Sequence[int]], index: torch.Tensor, n_images: int) -> None:
    """ValueError unless every caption is listed exactly once, under its own image."""
    flat = torch.tensor([j for group in img2txts for j in group], dtype=torch.long)
    owners = torch.tensor([i for i, group in enumerate(img2txts) for _ in group], dtype=torch.long)
    covers = len(img2txts) == n_images and torch.equal(flat.sort().values, torch.arange(len(index)))
    if not covers or not torch.equal(index[flat], owners):
        raise ValueError("img2txts does not agree with txt2img")


def attack_success_rate(clean_correct: torch.Tensor, adv_correct: torch.Tensor) -> float:
    """Percent of the queries correct on clean data that are wrong under attack (0 if none was correct); R@K
    hits on both sides give the ASR at R@K (:func:`asr_at_k`)."""
    clean_correct, adv_correct = torch.as_tensor(clean_correct).bool(), torch.as_tensor(adv_correct).bool()
    if clean_correct.shape != adv_correct.shape:
        raise ValueError(f"shapes differ: {tuple(clean_correct.shape)} vs {tuple(adv_correct.shape)}")
    n = int(clean_correct.sum())
    return 100.0 * int((clean_correct & ~adv_correct).sum()) / n if n else 0.0


def asr_at_k(clean_rank: torch.Tensor, adv_rank: torch.Tensor, k: int) -> float:
    """ASR at R@K from per-query ranks (0 = first): the share of clean hits at K that the attack pushes to K or
    beyond."""
    return attack_success_rate(torch.as_tensor(clean_rank) < k, torch.as_tensor(adv_rank) < k)
