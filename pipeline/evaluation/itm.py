"""Retrieval with ITM re-ranking, as BLIP and ALBEF evaluate it (``evaluation`` in salesforce/BLIP
``train_retrieval.py``, salesforce/ALBEF ``Retrieval.py``).

1. contrastive ranking: the similarity matrix of the ITC embeddings (images x captions);
2. for each image, its top ``k`` captions by that similarity are scored by the image-text matching head; the
   image's row becomes -100 everywhere except those k, which get ``itm + similarity`` (BLIP's ``score +
   topk_sim``; ALBEF keeps the ITM score alone); TR is ranked on these rows;
3. the same per caption over its top ``k`` images gives the columns IR is ranked on.

BLIP's COCO setting is k = 256 (Flickr30k: 128); ``itm_k`` chooses it (0: contrastive ranking only). A query
whose right answer is outside its top k is a miss at every K <= k. Cost: (images + captions) x k ITM forwards.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from pipeline.evaluation.retrieval import recall_at_k

FILL = -100.0  # BLIP's score_matrix fill value


def check_itm(model: Any, k: int) -> None:
    """ValueError when re-ranking (k > 0) is asked of a model without an ITM head."""
    if k < 0:
        raise ValueError(f"itm_k={k}: must be >= 0 (0: contrastive ranking only)")
    if k and not getattr(model, "has_itm", False):
        raise ValueError(f"itm_k={k}: ITM re-ranking needs a BLIP retrieval checkpoint with its itm_head; "
                         f"this {getattr(model, 'family', type(model).__name__)} model has none (use itm_k=0)")


@torch.no_grad()
def _pair_scores(model: Any, images01: torch.Tensor, texts: list[str], pairs: list[tuple[int, int]],
                 batch_size: int) -> torch.Tensor:
    out = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        pixels = images01[torch.tensor([i for i, _ in chunk])].to(model.device)
        out.append(model.itm_scores(pixels, [texts[j] for _, j in chunk]).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def rerank(model: Any, images01: torch.Tensor, texts: list[str], sim: torch.Tensor, k: int,
           batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t [images, captions], t2i [images, captions]) score matrices after ITM re-ranking of the top k."""
    check_itm(model, k)
    sim = sim.float().cpu()
    n_images, n_texts = sim.shape
    i2t = torch.full_like(sim, FILL)
    t2i = torch.full_like(sim, FILL)
    ki, kt = min(k, n_texts), min(k, n_images)
    top_sim, top_txt = sim.topk(ki, dim=1)  # [images, ki]
    pairs = [(i, j) for i in range(n_images) for j in top_txt[i].tolist()]
    i2t.scatter_(1, top_txt, _pair_scores(model, images01, texts, pairs, batch_size).view(n_images, ki) + top_sim)
    top_sim, top_img = sim.topk(kt, dim=0)  # [kt, captions]
    pairs = [(i, j) for j in range(n_texts) for i in top_img[:, j].tolist()]
    scores = _pair_scores(model, images01, texts, pairs, batch_size).view(n_texts, kt).T
    t2i.scatter_(0, top_img, scores + top_sim)
    return i2t, t2i


def itm_retrieval_metrics(model: Any, images01: torch.Tensor, texts: list[str], image_emb: torch.Tensor,
                          text_emb: torch.Tensor, txt2img: torch.Tensor, k: int, ks=(1, 5, 10),
                          batch_size: int = 64) -> dict[str, Any]:
    """:func:`pipeline.evaluation.evaluate.retrieval_metrics` with TR ranked on the re-ranked rows and IR on the
    re-ranked columns; the digest also covers the re-ranked scores."""
    i2t, t2i = rerank(model, images01, texts, image_emb.float() @ text_emb.float().T, k, batch_size)
    tr, ir = recall_at_k(i2t, txt2img, ks), recall_at_k(t2i, txt2img, ks)
    out = {key: value for key, value in tr.items() if key.startswith(("tr_", "_tr_"))}
    out.update({key: value for key, value in ir.items() if key.startswith(("ir_", "_ir_"))})
    digest = hashlib.sha256(image_emb.float().contiguous().numpy())
    digest.update(text_emb.float().contiguous().numpy())
    digest.update(i2t.contiguous().numpy())
    digest.update(t2i.contiguous().numpy())
    out["embeddings_sha256"] = digest.hexdigest()
    out["itm_k"] = k
    return out
