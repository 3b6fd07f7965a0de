"""The training modes, registered lazily (pipeline/train/modes.py holds the classes and imports torch).

Needs: "mlm" (a masked LM for BERT-Attack), "stages" (augmentation stages zipped with the base shards); defaults:
"stages", the stages a mode trains on when none are given.
`name in MODES`, `MODES[name]` (the class) and `tuple(MODES)` work as on a dict.
"""

from __future__ import annotations

from pipeline.core.registry import Registry

MODES = Registry("mode")
MODES.register("ft", "pipeline.train.modes:FineTune", label="FT", description="clean symmetric InfoNCE fine-tuning")
MODES.register("tecoa", "pipeline.train.modes:TeCoA", label="TeCoA",
               description="PGD on the images against the clean texts (Mao et al. 2023)")
MODES.register("fare", "pipeline.train.modes:Fare", label="FARE",
               description="unsupervised PGD against the frozen original image features (Schlarmann et al. 2024)")
MODES.register("mat", "pipeline.train.modes:MAT", needs={"mlm"}, label="MAT",
               description="multimodal adversarial training: BERT-Attack on texts, PGD on images (Waseda et al.)")
MODES.register("matplus", "pipeline.train.modes:MATPlus", needs={"mlm", "stages"}, label="MAT+",
               defaults={"stages": ("i2t-human",)},  # MAT+ without STAGES: the other human captions
               description="MAT on one-to-many augmented pairs")
