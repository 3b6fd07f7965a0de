"""Results as CSV tables: our metric keys under the column names CLIP_benchmark users know, in one mapping.

Our keys (``tr_r1``, ``ir_r5``, ``tr_asr``, ...; pipeline/evaluation/retrieval.py, evaluate.py) name the retrieval
side first: TR is text retrieval (an image queries the captions), IR image retrieval (a caption queries the
images), as in CLIP_benchmark's ``text_retrieval_recall@K`` / ``image_retrieval_recall@K``. Every CSV the pipeline
writes (``make report``'s report.csv, the study's defences.csv and augmentation.csv) names its columns through
:func:`column`, so the mapping lives here only. The values are the JSON's beside it, unrounded and in percent
(CLIP_benchmark writes recall as a fraction in [0, 1]); an empty field is a value the JSON holds as null.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.fileio import atomic_write_csv

KS = (1, 5, 10)
SIDES = {"tr": "text_retrieval", "ir": "image_retrieval"}

#: Our metric key -> its CSV column.
METRIC_COLUMNS: dict[str, str] = {
    **{f"{side}_r{k}": f"{name}_recall@{k}" for side, name in SIDES.items() for k in KS},
    # attack success rate at R@K: the share of the queries right at K on clean data that the attack pushes out
    **{f"{side}_asr": f"{name}_asr@1" for side, name in SIDES.items()},
    **{f"{side}_asr_r{k}": f"{name}_asr@{k}" for side, name in SIDES.items() for k in KS[1:]},
    # the study's scores: (TR R@1 + IR R@1) / 2, clean and averaged over the robust attacks, and the gain over MAT
    "clean_r1": "clean_mean_recall@1",
    "robust": "robust_mean_recall@1",
    "gain": "robust_mean_recall@1_gain_over_mat",
}
#: Suffixes of a metric key (an interval's ends, the spread across seeds) -> the column's suffix.
SUFFIXES = {"_low": "_ci_low", "_high": "_ci_high", "_sd": "_seed_sd"}


def column(key: str) -> str:
    """The CSV column of a record key: a metric (with a suffix of :data:`SUFFIXES`) mapped, any other key as is."""
    if key in METRIC_COLUMNS:
        return METRIC_COLUMNS[key]
    for suffix, name in SUFFIXES.items():
        if key.endswith(suffix) and key[: -len(suffix)] in METRIC_COLUMNS:
            return METRIC_COLUMNS[key[: -len(suffix)]] + name
    return key


def _field(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value))
    if isinstance(value, dict):
        raise TypeError(f"a CSV field cannot hold a mapping: {value!r}")
    return value


def write_csv(path: Path, records: list[dict[str, Any]], keys: list[str]) -> None:
    """``records`` as a CSV: one row each, the ``keys`` as columns (named by :func:`column`); a list value joined
    with "+", a missing key an empty field. Written like the JSON beside it (atomic, recorded in the ledger)."""
    atomic_write_csv(path, [column(k) for k in keys], [[_field(r.get(k)) for k in keys] for r in records])
