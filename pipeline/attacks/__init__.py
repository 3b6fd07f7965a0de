"""Attacks on CLIP: one per module, pixels in [0, 1], normalisation inside the model call.

Building blocks (also used by training): :class:`PGD` (image, any loss) and :class:`BERTAttack` (text, any
goal). Evaluation-level attacks (registry :data:`ATTACKS`) take ``(clip, mlm, images01, texts_per_image)`` and
return an :class:`AttackOutput`; :func:`run_attack` builds one by name with flat options routed to its parts::

    out = run_attack("sga", clip, mlm, images01, captions_per_image, eps=4 / 255, top_k=5, seed=1)

Defaults are the reference evaluations' (see each module's docstring for the reference file and the remaining
differences). Overriding ``eps`` alone keeps each attack's published step-to-budget ratio (PGD and SGA eps / 4,
Co-Attack eps / steps * 1.25); ``step_size`` sets the step explicitly. ``seed`` (every image attack's random
start, and SGA's noise; None: the global torch RNG) is accepted for every attack and ignored by "bert".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import dataclasses

import torch

from pipeline.attacks.base import AttackOutput, MultimodalAttack
from pipeline.attacks.bert_attack import (
    BERTAttack,
    BERTTextAttack,
    TextAttackResult,
    TextGoal,
    WordChange,
    image_similarity_goal,
    text_drift_goal,
)
from pipeline.attacks.co_attack import CoAttack
from pipeline.attacks.pgd import PGD, PGDAttack
from pipeline.attacks.sga import SGA

if TYPE_CHECKING:  # type hints only: importing transformers here would slow every command's start
    from pipeline.models.hf import CLIPBundle, MLMBundle

ATTACKS: dict[str, type[MultimodalAttack]] = {
    "pgd": PGDAttack,
    "bert": BERTTextAttack,
    "coattack": CoAttack,
    "sga": SGA,
}

_PARTS = {"image": PGD, "text": BERTAttack}


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def build_attack(name: str, **options) -> MultimodalAttack:
    """An evaluation attack by name. Options name fields of the attack, of its PGD (``image``) or of its
    BERTAttack (``text``); options of a part the attack lacks (``eps`` for "bert") are ignored, so one option
    set can configure every attack; names no attack knows raise ValueError."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; valid: {sorted(ATTACKS)}")
    cls = ATTACKS[name]
    known = set().union(*map(_field_names, [*ATTACKS.values(), *_PARTS.values()]))
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    own: dict = {}
    parts: dict[str, dict] = {part: {} for part in _PARTS if part in defaults}
    for key, value in options.items():
        if key not in known:
            raise ValueError(f"no attack has an option {key!r}; options: {sorted(known)}")
        part = next((p for p in parts if key in _field_names(_PARTS[p])), None)
        if key in defaults:
            own[key] = value
        elif part is not None:
            parts[part][key] = value
    for part, values in parts.items():
        if values:
            own[part] = dataclasses.replace(own.get(part, defaults[part]), **values)
    return cls(**own)


def run_attack(name: str, clip: CLIPBundle, mlm: MLMBundle | None, images01: torch.Tensor,
               texts_per_image: list[list[str]], **options) -> AttackOutput:
    """Attack a batch: images [B, 3, H, W] in [0, 1] and the captions of each image."""
    return build_attack(name, **options)(clip, mlm, images01, texts_per_image)


__all__ = [
    "ATTACKS", "AttackOutput", "BERTAttack", "BERTTextAttack", "CoAttack", "MultimodalAttack", "PGD", "PGDAttack",
    "SGA", "TextAttackResult", "TextGoal", "WordChange", "build_attack", "image_similarity_goal", "run_attack",
    "text_drift_goal",
]
