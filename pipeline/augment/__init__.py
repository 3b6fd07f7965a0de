"""Layer 3, augmentation: the stage contract and runner (the stages themselves live in the top-level `stages/`),
the CLIP scorer, caption generation for the generative stages, offline WordNet."""
