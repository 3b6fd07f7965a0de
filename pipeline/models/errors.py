"""The one "model not found" error: a model directory or hub id that cannot be loaded here.

Raised by the CLIP / masked-LM loaders (pipeline/models/hf.py), the scorer (pipeline/augment/scoring.py) and the
generative stages' checkpoint checks (pipeline/augment/captioning.py); the CLI catches it and prints the message,
which says how to provide the model. A FileNotFoundError, so callers catching that keep working.
"""

from __future__ import annotations


class ModelNotFoundError(FileNotFoundError):
    """A model id or directory could not be loaded (not on disk, and the hub offline, unreachable or refusing)."""
