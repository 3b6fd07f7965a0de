"""Compare two result JSONs (two runs' study report.json, evaluation JSONs, ...) ignoring provenance and timing:

    python -m pipeline.study.compare A/report.json B/report.json

prints each path where they differ (``records[3].metrics.sga.tr_r1: 12.0 != 13.0``) and exits 1 when there is
one, 0 when the two are the same apart from the ignored keys, 2 when a file cannot be read. A key is ignored at
any depth: :data:`PROVENANCE_KEY` and the timing keys :data:`TIMING_KEYS` (wall-clock stamps and durations of
the evaluation JSON, `make report`'s records, zero-shot rows, manifests, filters and the study's unit records;
the study's report.json itself holds none).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pipeline.core.provenance import PROVENANCE_KEY

TIMING_KEYS = frozenset({"time", "created", "finished", "seconds", "seconds_per_image", "pgd_seconds", "apgd_seconds"})
IGNORED_KEYS = TIMING_KEYS | {PROVENANCE_KEY}


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Every path where ``a`` and ``b`` differ, keys in :data:`IGNORED_KEYS` left out at any depth."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            if key in IGNORED_KEYS:
                continue
            where = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                out.append(f"{where}: only in {'second' if key not in a else 'first'}")
            else:
                out += differences(a[key], b[key], where)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items != {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    # 1 == 1.0 and True == 1 in Python, but not in a file that should be byte-identical: compare types too
    return [] if type(a) is type(b) and a == b else [f"{path or '<root>'}: {a!r} != {b!r}"]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m pipeline.study.compare A.json B.json", file=sys.stderr)
        return 2
    try:
        first, second = (json.loads(Path(path).read_text(encoding="utf-8")) for path in args)
    except (OSError, ValueError) as error:
        print(f"cannot read: {error}", file=sys.stderr)
        return 2
    found = differences(first, second)
    for line in found:
        print(line)
    print(f"{len(found)} difference(s) apart from {', '.join(sorted(IGNORED_KEYS))}" if found else
          f"same apart from {', '.join(sorted(IGNORED_KEYS))}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
