"""Training losses as modules returning a dict of named terms (the loop sums and logs every key).

ClipLoss gathers features from every rank with a differentiable all_gather, so each rank computes the loss
over the global batch and, after DDP averages the gradients, the update equals that of one process holding the
whole batch (open_clip's `gather_with_grad=True`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """Concatenate `features` of every rank in rank order, keeping gradients to the local part."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    return torch.cat(dist_nn.all_gather(features), dim=0)


def info_nce(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of matching rows (local: no gathering; the attacks' objective too)."""
    logits = (logit_scale * image_features @ text_features.t()).float()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over (image_i, text_i) pairs of the global batch; features L2-normalised."""

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return {"contrastive": info_nce(gather_features(image_features), gather_features(text_features), logit_scale)}


def hard_negatives(similarity: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each row i, a column j != i drawn with probability softmax(similarity[i]) over the others: the hard
    negatives BLIP and ALBEF mine from the contrastive logits (ALBEF adds 1e-4 to the weights, so a row whose
    others all have weight ~0 still draws one)."""
    weights = similarity.detach().float().softmax(dim=1) + 1e-4
    weights.fill_diagonal_(0)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def itm_pairs(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row indices (images, texts) of BLIP's 3B matching pairs and their labels: the B positives (i, i), then
    each text with a hard negative image, then each image with a hard negative text; label 1 = match. The
    similarities are the contrastive logits (cosine / temperature), as BLIP and ALBEF mine them."""
    similarity = logit_scale * image_features @ text_features.t()
    count = similarity.shape[0]
    rows = torch.arange(count, device=similarity.device)
    images = torch.cat([rows, hard_negatives(similarity.t(), generator), rows])
    texts = torch.cat([rows, rows, hard_negatives(similarity, generator)])
    labels = torch.cat([torch.ones(count, dtype=torch.long), torch.zeros(2 * count, dtype=torch.long)])
    return images, texts, labels.to(similarity.device)


class FareLoss(nn.Module):
    """FARE (Schlarmann et al. 2024): squared L2 between the adversarial image embedding and the frozen
    original model's embedding of the clean image, summed over dimensions, averaged over the batch."""

    def forward(self, adv_embeddings: torch.Tensor, clean_reference: torch.Tensor) -> dict[str, torch.Tensor]:
        distance = (adv_embeddings.float() - clean_reference.float()).pow(2).sum(dim=-1)
        return {"fare": distance.mean()}
