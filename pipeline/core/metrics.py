"""Feature statistics: mergeable float64 Gaussian sums, Frechet distance, Mahalanobis shift.

Per shard we keep (count, sum, sum of outer products) in float64: adding them is exact up to float rounding,
so the stage-level Frechet distance merges across shards and machines without revisiting any feature.
"""

from __future__ import annotations

import base64
import logging
import warnings
from dataclasses import dataclass, field

import numpy as np

from pipeline.core.lazy import lazy_module

linalg = lazy_module("scipy.linalg")  # a quarter second to import: loaded when a distance is computed, not by --help

logger = logging.getLogger(__name__)

_DTYPE = "<f8"


class FewSamplesWarning(UserWarning):
    """Fewer samples than feature dimensions: the covariance is singular and the distance is biased."""


def _encode(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=_DTYPE).tobytes()).decode("ascii")


def _decode(text: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=_DTYPE).reshape(shape).astype(np.float64)


@dataclass
class RunningGaussian:
    """count, sum and sum of outer products of d-dimensional features, float64."""

    dim: int
    count: int = 0
    total: np.ndarray = field(default=None)  # type: ignore[assignment]
    outer: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.dim <= 0:
            raise ValueError(f"dim must be positive, got {self.dim}")
        if self.total is None:
            self.total = np.zeros(self.dim, dtype=np.float64)
        if self.outer is None:
            self.outer = np.zeros((self.dim, self.dim), dtype=np.float64)

    def update(self, features: np.ndarray) -> "RunningGaussian":
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must have shape (n, {self.dim}), got {x.shape}")
        self.count += x.shape[0]
        self.total += x.sum(axis=0)
        self.outer += x.T @ x
        return self

    def merge(self, other: "RunningGaussian") -> "RunningGaussian":
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dim {other.dim} into dim {self.dim}")
        return RunningGaussian(self.dim, self.count + other.count, self.total + other.total, self.outer + other.outer)

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("no features accumulated")
        return self.total / self.count

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (ddof=1), as numpy.cov and pytorch-fid use."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 features, got {self.count}")
        mu = self.mean
        cov = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return (cov + cov.T) / 2

    def to_dict(self) -> dict:
        """JSON-serialisable and bit-exact: float64 bytes, upper triangle of the symmetric outer sum."""
        upper = self.outer[np.triu_indices(self.dim)]
        return {"dim": self.dim, "count": self.count, "sum": _encode(self.total), "outer_triu": _encode(upper)}

    @classmethod
    def from_dict(cls, data: dict) -> "RunningGaussian":
        dim = int(data["dim"])
        upper = _decode(data["outer_triu"], (dim * (dim + 1) // 2,))
        outer = np.zeros((dim, dim), dtype=np.float64)
        outer[np.triu_indices(dim)] = upper
        outer = outer + np.triu(outer, 1).T
        return cls(dim, int(data["count"]), _decode(data["sum"], (dim,)), outer)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)). When the product is near-singular
    the square root is retried with eps on both diagonals (as pytorch-fid does); a small imaginary part from
    rounding is dropped, a large one is an error.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if covmean is None:
        logger.warning("Frechet distance: singular covariance product, adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if covmean is None:
            raise ValueError("Frechet distance: covariance square root is not finite even with eps on the diagonal")
    if np.iscomplexobj(covmean):
        largest = np.max(np.abs(covmean.imag))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: covariance square root has an imaginary part of {largest:.3g}")
        covmean = covmean.real
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
    return max(value, 0.0)  # rounding can give -1e-12 for identical distributions


def _sqrtm(matrix: np.ndarray) -> np.ndarray | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        root = linalg.sqrtm(matrix)
    if isinstance(root, tuple):  # older scipy returns (root, errest) with disp=False only
        root = root[0]
    return root if np.isfinite(root).all() else None


def frechet_from_stats(a: RunningGaussian, b: RunningGaussian, eps: float = 1e-6) -> float:
    """Frechet distance between the Gaussians of two accumulated feature sets; warns when n <= dim."""
    for name, stats in (("first", a), ("second", b)):
        if stats.count <= stats.dim:
            warnings.warn(
                f"Frechet distance: the {name} set has {stats.count} samples for {stats.dim} dimensions; "
                "its covariance is singular and the distance is biased (compare only sets of equal size)",
                FewSamplesWarning,
                stacklevel=2,
            )
    return frechet_distance(a.mean, a.cov, b.mean, b.cov, eps=eps)


@dataclass(frozen=True)
class MahalanobisReference:
    """The Gaussian of the original features, with a shrunk covariance so it inverts even when n < dim."""

    mean: np.ndarray
    precision: np.ndarray

    @classmethod
    def fit(cls, stats: RunningGaussian, shrinkage: float = 0.1) -> "MahalanobisReference":
        if not 0.0 < shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in (0, 1], got {shrinkage}")
        cov = stats.cov
        target = np.trace(cov) / stats.dim
        if target <= 0:
            raise ValueError("reference features have zero variance")
        shrunk = (1 - shrinkage) * cov + shrinkage * target * np.eye(stats.dim)
        return cls(stats.mean, linalg.pinvh(shrunk))

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance per row divided by sqrt(dim): about 1 for a typical original feature."""
        centred = np.atleast_2d(np.asarray(features, np.float64)) - self.mean
        squared = np.sum((centred @ self.precision) * centred, axis=1)  # BLAS; a 3-operand einsum is not
        return np.sqrt(np.maximum(squared, 0.0) / self.mean.size)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "precision": self.precision}


# Per-shard feature stats, as stored under "features" in a shard's stats file:
#   {side: {"original": RunningGaussian.to_dict(), "variant": RunningGaussian.to_dict()}}  side in {"image", "text"}
FeatureStats = dict[str, dict[str, dict]]


def merge_feature_stats(shard_stats: list[FeatureStats]) -> FeatureStats:
    """Sum the running stats of many shards, side by side and role by role (missing entries are skipped)."""
    merged: dict[str, dict[str, RunningGaussian]] = {}
    for stats in shard_stats:
        for side, roles in (stats or {}).items():
            for role, data in roles.items():
                gaussian = RunningGaussian.from_dict(data)
                current = merged.setdefault(side, {}).get(role)
                merged[side][role] = gaussian if current is None else current.merge(gaussian)
    return {side: {role: g.to_dict() for role, g in roles.items()} for side, roles in merged.items()}


def frechet_summary(stats: FeatureStats) -> dict[str, float | int | None]:
    """Stage-level Frechet distance variants vs originals per side: {"fd_image", "fd_text", "n_*_variant"}."""
    summary: dict[str, float | int | None] = {}
    for side in ("image", "text"):
        roles = (stats or {}).get(side, {})
        original = RunningGaussian.from_dict(roles["original"]) if "original" in roles else None
        variant = RunningGaussian.from_dict(roles["variant"]) if "variant" in roles else None
        summary[f"n_{side}_variant"] = variant.count if variant else 0
        usable = original is not None and variant is not None and original.count >= 2 and variant.count >= 2
        summary[f"fd_{side}"] = frechet_from_stats(variant, original) if usable else None
    return summary
