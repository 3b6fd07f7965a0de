"""Frechet distance, mergeable running stats and Mahalanobis shift against independent computations."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from pipeline.core.metrics import (
    FewSamplesWarning,
    MahalanobisReference,
    RunningGaussian,
    frechet_distance,
    frechet_from_stats,
    frechet_summary,
    merge_feature_stats,
)


def _random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def _closed_form(mu1, s1, mu2, s2) -> float:
    """W2^2 via the symmetric form tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), eigendecompositions only."""
    root1 = _psd_sqrt(s1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(_psd_sqrt(root1 @ s2 @ root1)))


def test_diagonal_gaussians_match_textbook_formula() -> None:
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("dim", [2, 16, 64])
def test_non_commuting_covariances_match_closed_form(dim: int) -> None:
    rng = np.random.default_rng(dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    s1, s2 = _random_spd(rng, dim), _random_spd(rng, dim)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_closed_form(mu1, s1, mu2, s2), rel=1e-7)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_sampled_features_converge_to_population_distance() -> None:
    rng = np.random.default_rng(0)
    dim = 4
    mu1, mu2, s1, s2 = rng.normal(size=dim), rng.normal(size=dim), _random_spd(rng, dim), _random_spd(rng, dim)
    x = rng.multivariate_normal(mu1, s1, size=200_000)
    y = rng.multivariate_normal(mu2, s2, size=200_000)
    sampled = frechet_from_stats(RunningGaussian(dim).update(x), RunningGaussian(dim).update(y))
    assert sampled == pytest.approx(_closed_form(mu1, s1, mu2, s2), rel=0.02)


def test_merged_shards_equal_all_at_once() -> None:
    rng = np.random.default_rng(1)
    dim = 32
    originals = rng.normal(size=(900, dim))
    originals /= np.linalg.norm(originals, axis=1, keepdims=True)  # unit-norm like CLIP features
    variants = originals[:700] + 0.3 * rng.normal(size=(700, dim))
    variants /= np.linalg.norm(variants, axis=1, keepdims=True)
    bounds_o, bounds_v = [0, 100, 350, 351, 900], [0, 240, 240, 500, 700]  # uneven, one empty shard
    per_shard = []
    for (o0, o1), (v0, v1) in zip(zip(bounds_o, bounds_o[1:]), zip(bounds_v, bounds_v[1:])):
        shard = {"text": {"original": RunningGaussian(dim).update(originals[o0:o1]).to_dict(),
                          "variant": RunningGaussian(dim).update(variants[v0:v1]).to_dict()}}
        per_shard.append(json.loads(json.dumps(shard)))  # as stored in the stats files
    merged = merge_feature_stats(per_shard)
    summary = frechet_summary(merged)
    direct = _closed_form(variants.mean(0), np.cov(variants, rowvar=False),
                          originals.mean(0), np.cov(originals, rowvar=False))
    assert summary["n_text_variant"] == 700
    assert summary["fd_image"] is None
    assert abs(summary["fd_text"] - direct) / direct < 1e-6


def test_stats_round_trip_is_bit_exact() -> None:
    x = np.random.default_rng(2).normal(size=(10, 5))
    stats = RunningGaussian(5).update(x)
    back = RunningGaussian.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert back.count == 10
    assert np.array_equal(back.total, stats.total) and np.array_equal(back.outer, stats.outer)


def test_fewer_samples_than_dims_warns_and_stays_finite() -> None:
    rng = np.random.default_rng(3)
    dim = 48
    a = RunningGaussian(dim).update(rng.normal(size=(10, dim)))
    b = RunningGaussian(dim).update(rng.normal(size=(12, dim)))
    with pytest.warns(FewSamplesWarning, match="10 samples for 48 dimensions"):
        value = frechet_from_stats(a, b)
    assert isinstance(value, float) and np.isfinite(value) and value > 0


def test_singular_covariances_are_handled() -> None:
    # rank-1 covariances: sigma1 @ sigma2 is singular and sqrtm yields complex rounding noise
    u, v = np.array([1.0, 0.0, 0.0]), np.array([0.6, 0.8, 0.0])
    s1, s2 = np.outer(u, u), np.outer(v, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        value = frechet_distance(np.zeros(3), s1, np.zeros(3), s2)
    assert isinstance(value, float)
    assert value == pytest.approx(_closed_form(np.zeros(3), s1, np.zeros(3), s2), abs=1e-5)
    assert frechet_distance(np.zeros(3), np.zeros((3, 3)), np.ones(3), np.zeros((3, 3))) == pytest.approx(3.0)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="shape"):
        RunningGaussian(4).update(np.zeros((2, 3)))


def test_mahalanobis_is_about_one_for_originals_and_larger_for_outliers() -> None:
    rng = np.random.default_rng(4)
    dim = 8
    cov = _random_spd(rng, dim)
    x = rng.multivariate_normal(np.zeros(dim), cov, size=20_000)
    reference = MahalanobisReference.fit(RunningGaussian(dim).update(x), shrinkage=1e-6)
    rms = np.sqrt(np.mean(reference.distance(x) ** 2))
    assert rms == pytest.approx(1.0, rel=0.01)
    # along the direction of least variance a small step is far in Mahalanobis terms
    values, vectors = np.linalg.eigh(cov)
    near, far = vectors[:, -1] * np.sqrt(values[-1]), vectors[:, 0] * 4 * np.sqrt(values[-1])
    d_near, d_far = reference.distance(np.stack([near, far]))
    assert d_near == pytest.approx(1 / np.sqrt(dim), rel=0.05)
    assert d_far > 3 * d_near


def test_mahalanobis_reference_inverts_with_fewer_samples_than_dims() -> None:
    x = np.random.default_rng(5).normal(size=(5, 20))
    reference = MahalanobisReference.fit(RunningGaussian(20).update(x))
    assert np.isfinite(reference.distance(np.ones((1, 20)))).all()
    with pytest.raises(ValueError, match="shrinkage"):
        MahalanobisReference.fit(RunningGaussian(20).update(x), shrinkage=0.0)
