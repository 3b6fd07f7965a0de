"""Confidence intervals for retrieval results: a bootstrap over test queries, paired between models, and seeds.

The unit of resampling is the test *image with its captions* (the queries of TR and IR are not independent:
an image and its captions share one picture), drawn with replacement with a fixed seed. One resample is a
vector of image counts ``w`` (multinomial, summing to the number of images); every statistic is a weighted
mean under ``w``:

- TR R@K = sum_i w_i [tr_rank_i < K] / sum_i w_i;
- IR R@K = sum_i w_i c_i / sum_i w_i m_i, with c_i the captions of image i found at K and m_i its captions.

All models evaluated on the same test images share the same resamples, so the difference of two models is
*paired*: its interval is the percentile interval of the per-resample differences (Efron & Tibshirani, ch. 13),
and a difference is called significant only when that interval excludes zero. A cell trained with several
seeds also resamples its seeds (with replacement, per resample), so its interval holds both the query noise and
the seed-to-seed spread (a two-level bootstrap).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Outcomes:
    """Per-query results of one evaluation under one attack: 0-based ranks (capped ranks are fine) of the right
    answer for each image (TR, its best caption) and each caption (IR), and each caption's image."""

    tr_rank: np.ndarray  # int [n_images]
    ir_rank: np.ndarray  # int [n_texts]
    owner: np.ndarray  # int [n_texts], index of the caption's image

    def __post_init__(self) -> None:
        if self.ir_rank.shape != self.owner.shape:
            raise ValueError(f"ir_rank {self.ir_rank.shape} and owner {self.owner.shape} differ in shape")
        if len(self.owner) and (self.owner.min() < 0 or self.owner.max() >= len(self.tr_rank)):
            raise ValueError(f"owner refers to images outside [0, {len(self.tr_rank)})")

    @property
    def n_images(self) -> int:
        return len(self.tr_rank)

    def recall(self, side: str, k: int, weights: np.ndarray) -> np.ndarray:
        """R@k (percent) of ``side`` ("tr" or "ir") under each row of ``weights`` [B, n_images]."""
        if side == "tr":
            hits, counts = (self.tr_rank < k).astype(np.float64), np.ones(self.n_images)
        elif side == "ir":
            hits = np.bincount(self.owner, weights=(self.ir_rank < k), minlength=self.n_images)
            counts = np.bincount(self.owner, minlength=self.n_images).astype(np.float64)
        else:
            raise ValueError(f"side={side!r}: choose 'tr' or 'ir'")
        return 100.0 * (weights @ hits) / np.maximum(weights @ counts, 1e-12)


#: A statistic of one evaluation (its Outcomes per attack) under resample weights [B, n] -> values [B].
Statistic = Callable[[dict[str, Outcomes], np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Interval:
    point: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    @property
    def sign(self) -> int:
        """+1 / -1 when the interval lies above / below zero, 0 when it holds zero."""
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    def as_dict(self) -> dict[str, float]:
        return {"point": self.point, "low": self.low, "high": self.high}


def _stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class Bootstrap:
    """Shared resamples of ``n_images`` test images (and of seeds, per cell) for every model of a study."""

    def __init__(self, n_images: int, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                 level: float = DEFAULT_LEVEL) -> None:
        if n_images < 1 or n_resamples < 1:
            raise ValueError(f"n_images={n_images}, n_resamples={n_resamples}: both must be >= 1")
        if not 0 < level < 1:
            raise ValueError(f"level={level}: must be in (0, 1)")
        self.n_images, self.n_resamples, self.seed, self.level = n_images, n_resamples, seed, level
        rng = np.random.default_rng(seed)
        self.weights = rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=n_resamples).astype(np.float64)
        self.ones = np.ones((1, n_images))

    def replicates(self, seeds: Sequence[dict[str, Outcomes]], statistic: Statistic, cell: str) -> np.ndarray:
        """[B] values of ``statistic`` for a cell evaluated once per seed: resampled images, and resampled seeds
        when there are several (the seed draw depends on the cell's name and the bootstrap seed only)."""
        if not seeds:
            raise ValueError(f"cell {cell!r} has no evaluation")
        for outcomes in seeds:
            for attack, o in outcomes.items():
                if o.n_images != self.n_images:
                    raise ValueError(f"cell {cell!r} {attack}: {o.n_images} images, the study has {self.n_images}")
        values = np.stack([statistic(outcomes, self.weights) for outcomes in seeds])  # [S, B]
        if len(seeds) == 1:
            return values[0]
        pick = np.random.default_rng(_stable_seed("seeds", self.seed, cell)).integers(
            0, len(seeds), size=(self.n_resamples, len(seeds)))
        return values[pick, np.arange(self.n_resamples)[:, None]].mean(axis=1)

    def point(self, seeds: Sequence[dict[str, Outcomes]], statistic: Statistic) -> float:
        """The statistic on the test set as it is, averaged over seeds."""
        return float(np.mean([statistic(outcomes, self.ones)[0] for outcomes in seeds]))

    def interval(self, point: float, replicates: np.ndarray) -> Interval:
        tail = 100 * (1 - self.level) / 2
        low, high = np.percentile(replicates, [tail, 100 - tail])
        return Interval(float(point), float(low), float(high))


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of ``x`` [P] with each row of ``y`` [B, P] (ties get average ranks; 0 where a
    side is constant)."""
    from scipy.stats import rankdata

    rx = rankdata(np.asarray(x, dtype=np.float64))
    ry = rankdata(np.atleast_2d(np.asarray(y, dtype=np.float64)), axis=1)
    rx = rx - rx.mean()
    ry = ry - ry.mean(axis=1, keepdims=True)
    denom = np.sqrt((rx ** 2).sum() * (ry ** 2).sum(axis=1))
    return np.divide(ry @ rx, denom, out=np.zeros(len(ry)), where=denom > 0)
