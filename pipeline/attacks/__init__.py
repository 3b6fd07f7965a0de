"""Attacks on CLIP: one per module, pixels in [0, 1], normalisation inside the model call.

Building blocks (also used by training): :class:`PGD` (image, any loss) and :class:`BERTAttack` (text, any
goal). Evaluation-level attacks (registry :data:`ATTACKS`) take ``(clip, mlm, images01, texts_per_image)`` and
return an :class:`AttackOutput`; :func:`run_attack` builds one by name with flat options routed to its parts::

    out = run_attack("sga", clip, mlm, images01, captions_per_image, eps=4 / 255, top_k=5, seed=1)

Defaults are the reference evaluations' (see each module's docstring for the reference file and the remaining
differences). Overriding ``eps`` alone keeps each attack's published step-to-budget ratio (PGD and SGA eps / 4,
Co-Attack eps / steps * 1.25); ``step_size`` sets the step explicitly. ``seed`` (every image attack's random
start, and SGA's noise; None: the global torch RNG) is accepted for every attack and ignored by "bert".

The registry :data:`ATTACKS` names each attack lazily (listing names, labels and needs imports no torch); the
classes and building blocks below load on first use. Needs: "mlm" (a masked LM for the text part). Tags: the
modalities an attack perturbs ("image", "text"; both = multimodal).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Any

from pipeline.core.registry import Registry

if TYPE_CHECKING:
    import torch

    from pipeline.attacks.base import AttackOutput, MultimodalAttack
    from pipeline.models.hf import CLIPBundle, MLMBundle

ATTACKS = Registry("attack")
ATTACKS.register("pgd", "pipeline.attacks.pgd:PGDAttack", label="PGD", tags={"image"},
                 description="PGD on the images against the clean captions")
ATTACKS.register("bert", "pipeline.attacks.bert_attack:BERTTextAttack", needs={"mlm"}, label="BERT-Attack",
                 tags={"text"}, description="BERT-Attack word substitutions on the captions")
ATTACKS.register("coattack", "pipeline.attacks.co_attack:CoAttack", needs={"mlm"}, label="Co-Attack",
                 tags={"image", "text"}, description="Co-Attack: the text first, then the image (Zhang et al. 2022)")
ATTACKS.register("sga", "pipeline.attacks.sga:SGA", needs={"mlm"}, label="SGA", tags={"image", "text"},
                 description="set-level guidance attack (Lu et al. 2023)")

# Public names of the submodules, imported on first access (PEP 562) so that the registry stays light.
_EXPORTS = {
    "AttackOutput": "base", "MultimodalAttack": "base",
    "BERTAttack": "bert_attack", "BERTTextAttack": "bert_attack", "TextAttackResult": "bert_attack",
    "TextGoal": "bert_attack", "WordChange": "bert_attack", "image_similarity_goal": "bert_attack",
    "text_drift_goal": "bert_attack",
    "CoAttack": "co_attack", "PGD": "pgd", "PGDAttack": "pgd", "SGA": "sga",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipeline.attacks.{_EXPORTS[name]}"), name)


def _parts() -> dict[str, type]:
    from pipeline.attacks.bert_attack import BERTAttack
    from pipeline.attacks.pgd import PGD

    return {"image": PGD, "text": BERTAttack}


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def build_attack(name: str, **options) -> MultimodalAttack:
    """An evaluation attack by name. Options name fields of the attack, of its PGD (``image``) or of its
    BERTAttack (``text``); options of a part the attack lacks (``eps`` for "bert") are ignored, so one option
    set can configure every attack; names no attack knows raise ValueError."""
    cls = ATTACKS.load(name)
    parts_of = _parts()
    known = set().union(*map(_field_names, [*(ATTACKS.load(n) for n in ATTACKS), *parts_of.values()]))
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    own: dict = {}
    parts: dict[str, dict] = {part: {} for part in parts_of if part in defaults}
    for key, value in options.items():
        if key not in known:
            raise ValueError(f"no attack has an option {key!r}; options: {sorted(known)}")
        part = next((p for p in parts if key in _field_names(parts_of[p])), None)
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
