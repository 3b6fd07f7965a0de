from __future__ import annotations

import pytest
import torch

from pipeline.evaluation.retrieval import asr_at_k, attack_success_rate, recall_at_k, retrieval_ranks, similarity


def _brute_force(sim: torch.Tensor, txt2img: list[int], k: int) -> tuple[float, float]:
    n_images, n_texts = sim.shape
    tr = 0
    for i in range(n_images):
        top = torch.argsort(sim[i], descending=True)[:k].tolist()
        tr += any(txt2img[j] == i for j in top)
    ir = 0
    for j in range(n_texts):
        top = torch.argsort(sim[:, j], descending=True)[:k].tolist()
        ir += txt2img[j] in top
    return 100.0 * tr / n_images, 100.0 * ir / n_texts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_brute_force_on_a_random_matrix(seed):
    g = torch.Generator().manual_seed(seed)
    n_images = 20
    counts = torch.randint(1, 6, (n_images,), generator=g).tolist()  # 1-5 captions per image
    txt2img = [i for i, c in enumerate(counts) for _ in range(c)]
    perm = torch.randperm(len(txt2img), generator=g).tolist()  # captions not grouped by image
    txt2img = [txt2img[p] for p in perm]
    sim = torch.randn(n_images, len(txt2img), generator=g)
    sim[torch.tensor(txt2img), torch.arange(len(txt2img))] += 1.5  # better than chance, far from perfect
    out = recall_at_k(sim, txt2img, ks=(1, 5, 10))
    for k in (1, 5, 10):
        tr, ir = _brute_force(sim, txt2img, k)
        assert out[f"tr_r{k}"] == pytest.approx(tr) and out[f"ir_r{k}"] == pytest.approx(ir)
    assert 0 < out["tr_r1"] < 100 and out["tr_r1"] <= out["tr_r5"] <= out["tr_r10"]
    assert out["_tr_hits"].float().mean() * 100 == pytest.approx(out["tr_r1"])
    assert out["_ir_hits"].shape == (len(txt2img),)


def _full_matrix_ranks(sim: torch.Tensor, txt2img: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward ranks (the code before chunking): a captions x captions comparison for TR."""
    index = torch.tensor(txt2img)
    positive = sim[index, torch.arange(len(txt2img))]
    caption_rank = (sim[index] > positive[:, None]).sum(dim=1)
    tr = torch.stack([caption_rank[index == i].min() for i in range(sim.shape[0])])
    return tr, (sim > positive[None, :]).sum(dim=0)


@pytest.mark.parametrize("chunk_elements", [1, 37, 1 << 24])
@pytest.mark.parametrize("seed", [0, 1])
def test_chunked_ranks_equal_full_matrix_ranks_with_ties(seed, chunk_elements):
    """Small-integer features make many exact ties (every dot product is exact in float32, whatever the order)."""
    g = torch.Generator().manual_seed(seed)
    n_images = 30
    counts = torch.randint(1, 6, (n_images,), generator=g).tolist()
    txt2img = [i for i, c in enumerate(counts) for _ in range(c)]
    txt2img = [txt2img[p] for p in torch.randperm(len(txt2img), generator=g).tolist()]
    img = torch.randint(-2, 3, (n_images, 4), generator=g).float()
    txt = torch.randint(-2, 3, (len(txt2img), 4), generator=g).float()
    img[1] = img[0]  # duplicate images and captions: tied rows and columns
    txt[3] = txt[2]
    sim = img @ txt.T
    assert (sim[:, :, None] == sim[:, None, :]).sum() > 2 * sim.numel()  # ties beyond the diagonal
    tr, ir = retrieval_ranks(sim, txt2img, chunk_elements=chunk_elements)
    tr_full, ir_full = _full_matrix_ranks(sim, txt2img)
    assert torch.equal(tr, tr_full) and torch.equal(ir, ir_full)
    assert 0 < (tr == 0).sum() < n_images and (ir > 0).any()


def test_img2txts_must_agree_with_txt2img():
    sim = torch.randn(2, 3)
    recall_at_k(sim, [0, 1, 1], img2txts=[[0], [2, 1]])
    with pytest.raises(ValueError, match="agree"):
        recall_at_k(sim, [0, 1, 1], img2txts=[[0, 1], [2]])
    for wrong in ([[0], [1, 1]], [[0], [2, 1], []], [[0], [2, 7]]):  # a duplicate, an extra image, a bad index
        with pytest.raises(ValueError, match="agree"):
            recall_at_k(sim, [0, 1, 1], img2txts=wrong)


def test_image_without_caption_is_rejected():
    with pytest.raises(ValueError, match="caption"):
        recall_at_k(torch.randn(3, 2), [0, 1])


def test_similarity_is_cosine():
    img, txt = torch.randn(4, 8), torch.randn(6, 8)
    sim = similarity(3 * img, txt)
    assert sim.shape == (4, 6) and sim.abs().max() <= 1 + 1e-6
    assert sim[1, 2] == pytest.approx(torch.cosine_similarity(img[1], txt[2], dim=0).item(), abs=1e-6)


def test_attack_success_rate_counts_broken_clean_hits_only():
    clean = torch.tensor([True, True, True, True, False])
    adv = torch.tensor([True, False, False, True, True])  # the last query was wrong before: not a success
    assert attack_success_rate(clean, adv) == pytest.approx(50.0)
    assert attack_success_rate(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) == 0.0
    with pytest.raises(ValueError):
        attack_success_rate(clean, adv[:3])


def test_asr_at_k_counts_clean_hits_at_k_pushed_to_k_or_beyond():
    clean = torch.tensor([0, 3, 4, 4, 7, 12])
    adv = torch.tensor([9, 4, 5, 2, 0, 0])  # at R@5 (ranks 0-4) queries 0-3 were hits; 0 and 2 are no more
    assert asr_at_k(clean, adv, 5) == pytest.approx(50.0)
    assert asr_at_k(clean, adv, 10) == pytest.approx(0.0)  # 9 is still inside the top 10
    assert asr_at_k(clean, adv, 1) == pytest.approx(100.0)
