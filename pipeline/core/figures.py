"""What the pipeline's figures share: bars that show a missing value and a zero instead of leaving a gap, a note
of the points a panel cannot place, and saving through the ledger.

A missing value (None or NaN: an attack an evaluation did not run, a distance a stage does not have) is written
as :data:`NA` where its bar would stand; a zero is drawn as a line as wide as its bar with its value above it, so
the two never look alike and neither looks like an empty slot. matplotlib is imported on first use only (with the
Agg backend: files, no display).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.core.ledger import claim_file

NA = "n/a"


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _value(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def bars(ax: Any, x: Sequence[float], values: Sequence[float | None], width: float, color: Any, *,
         low: Sequence[float | None] | None = None, high: Sequence[float | None] | None = None,
         value_format: str | None = None) -> None:
    """Bars of ``values`` at ``x`` in ``color``; :data:`NA` where a value is missing, a line and its value at a
    zero. ``low`` / ``high``: each bar's interval (None where unknown), drawn as error bars. ``value_format``
    (e.g. ``"{:.3f}"``): every value written above its bar."""
    import numpy as np

    x = np.asarray(x, dtype=float)
    v = np.array([_value(a) for a in values])
    present, zero = ~np.isnan(v), v == 0
    ax.bar(x[present & ~zero], v[present & ~zero], width, color=color)
    if zero.any():
        ax.hlines(np.zeros(zero.sum()), x[zero] - width / 2, x[zero] + width / 2, colors=[color], linewidth=3,
                  clip_on=False, zorder=3)
    if low is not None and high is not None:
        lo, hi = np.array([_value(a) for a in low]), np.array([_value(a) for a in high])
        has = present & ~np.isnan(lo) & ~np.isnan(hi)
        if has.any():
            ax.errorbar(x[has], v[has], yerr=[v[has] - lo[has], hi[has] - v[has]], fmt="none", ecolor="black",
                        elinewidth=0.8, capsize=2, zorder=4)
    left, right = ax.get_xlim()  # room for every slot, a bar or its n/a
    ax.set_xlim(min(left, x.min() - width), max(right, x.max() + width))
    for xi, vi in zip(x, v):
        if np.isnan(vi):
            ax.annotate(NA, (xi, 0), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                        rotation=90, fontsize=8, color="dimgrey")
        elif vi == 0 or value_format:
            ax.annotate((value_format or "{:g}").format(vi), (xi, vi), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7)


def note_missing(ax: Any, names: Sequence[str]) -> None:
    """Name, as the panel's right-hand title, what it has no value for (``n/a: eda, randaug``)."""
    if names:
        ax.set_title(f"{NA}: {', '.join(names)}", loc="right", fontsize=8, color="dimgrey")


def save(fig: Any, path: Path, dpi: int = 120) -> None:
    """Save a figure where the ledger allows it (pipeline/core/ledger.py: claim_file), then close it."""
    claim_file(path)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
