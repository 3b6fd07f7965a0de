"""MAT / MAT+ pipeline: one-to-many augmentation shards and multimodal adversarial training of CLIP."""

__version__ = "0.1.0"
