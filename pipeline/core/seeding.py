"""Deterministic seeds: the same (dataset, stage, key, variant) always gives the same seed."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across runs, machines and Python versions."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def stable_fraction(*parts: object) -> float:
    """A number in [0, 1) from the parts, used for deterministic splits."""
    return derive_seed(*parts) / float(1 << 63)
