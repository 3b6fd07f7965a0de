"""Augmentation stages, one module each. Names map to classes lazily so heavy libraries load only when used."""

from __future__ import annotations

import importlib

STAGES: dict[str, str] = {
    "i2t-human": "stages.i2t_human:I2THumanStage",
    "eda": "stages.eda:EDAStage",
    "randaug": "stages.randaug:RandAugmentStage",
    "i2t-internvl": "stages.i2t_internvl:InternVLCaptionStage",
    "t2i-sd": "stages.t2i_sd:StableDiffusionStage",
}

# What `make augment` runs when STAGES is not given: the stages that need no downloaded model.
DEFAULT_STAGES = ("i2t-human", "eda", "randaug")


def get_stage_class(name: str) -> type:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose from {', '.join(STAGES)}")
    module_name, class_name = STAGES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)
