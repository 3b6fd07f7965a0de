"""Augmentation stages, one module each, registered lazily so heavy libraries load only when a stage is used.

Needs: "model" = a downloaded model (given by `--set <stage>.model=...` or I2T_MODEL / T2I_MODEL). Tags: the
modality of the variants ("text" / "image") and the paper's axis ("cross"-modal or "intra"-modal).
"""

from __future__ import annotations

from pipeline.core.registry import Registry

STAGES = Registry("stage")
STAGES.register("i2t-human", "stages.i2t_human:I2THumanStage", tags={"text", "cross"},
                description="the image's other human captions as its text variants")
STAGES.register("eda", "stages.eda:EDAStage", tags={"text", "intra"},
                description="EDA word edits of the captions (WordNet synonyms, swaps, deletions)")
STAGES.register("randaug", "stages.randaug:RandAugmentStage", tags={"image", "intra"},
                description="RandAugment image variants")
STAGES.register("i2t-internvl", "stages.i2t_internvl:InternVLCaptionStage", needs={"model"}, tags={"text", "cross"},
                description="new captions written by an InternVL vision-language model")
STAGES.register("t2i-sd", "stages.t2i_sd:StableDiffusionStage", needs={"model"}, tags={"image", "cross"},
                description="new images drawn by Stable Diffusion from the captions")

# What `make augment` runs when STAGES is not given: the stages that need no downloaded model.
DEFAULT_STAGES = STAGES.names(without={"model"})


def get_stage_class(name: str) -> type:
    return STAGES.load(name)
