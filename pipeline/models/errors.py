"""The one "model not found" error: a model directory or hub id that cannot be loaded here.

Raised by the CLIP / masked-LM loaders (pipeline/models/hf.py), the scorer (pipeline/augment/scoring.py) and the
generative stages' checkpoint checks (pipeline/augment/captioning.py); the CLI catches it and prints the message,
which says how to provide the model. A FileNotFoundError, so callers catching that keep working.

:func:`looks_like_path` is the one rule telling a local folder from a hub id, so that a mistyped folder is an
error at once instead of a hub request (retried for half a minute online).
"""

from __future__ import annotations

import os
from pathlib import Path


class ModelNotFoundError(FileNotFoundError):
    """A model id or directory could not be loaded (not on disk, and the hub offline, unreachable or refusing)."""


def looks_like_path(spec: str) -> bool:
    """Whether a model spec means a local folder rather than a hub id (``name`` or ``org/name``): it starts with
    ``/``, ``.`` or ``~`` (hub names never do), has more than one ``/``, exists here, or its first component is a
    folder here (``runs/nope`` beside a ``runs/`` folder). ``openai/clip-vit-base-patch16`` is a hub id unless an
    ``openai/`` folder exists here."""
    spec = str(spec)
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or (os.sep != "/" and os.sep in spec):
        return True
    if Path(spec).exists():
        return True
    head, sep, _ = spec.partition("/")
    return bool(sep) and Path(head).is_dir()


def check_local(spec: str, what: str = "model") -> bool:
    """Whether ``spec`` means a local folder (:func:`looks_like_path`); when it does and no folder is there,
    ModelNotFoundError at once (:func:`missing_folder`), before any hub request."""
    local = looks_like_path(spec)
    if local and not Path(str(spec)).expanduser().is_dir():
        raise missing_folder(spec, what)
    return local


def missing_folder(spec: str, what: str = "model") -> ModelNotFoundError:
    """The error for a spec meant as a folder that is not one: it names the spec and, for a path with nothing
    there, what the nearest existing folder above it holds (the run or model folder meant is often among them)."""
    path = Path(str(spec)).expanduser()
    if path.exists():
        return ModelNotFoundError(f"{what} {str(spec)!r} is a file, not a model folder")
    return ModelNotFoundError(f"{what} {str(spec)!r} not found: no such folder{_nearby(path)}")


def _nearby(path: Path, shown: int = 6) -> str:
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return ""
    try:
        folders = [p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return ""
    where = "the current folder" if str(parent) in ("", ".") else str(parent)
    if not folders:
        return f" ({where} has no folders)"
    folders.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    names = ", ".join(p.name for p in folders[:shown])
    more = f" and {len(folders) - shown} more" if len(folders) > shown else ""
    return f" ({where} holds {names}{more}, newest first)"


def default_model(path: Path, what: str, dataset: str, option: str, also: str = "") -> str:
    """``MODELS_DIR/<dataset>/<clip|mlm>`` (the stand-in `make pretrain` saves) when it is there; otherwise
    ModelNotFoundError naming the command that makes it, the option (``option``) that names another model, and
    ``also`` (another way out)."""
    if not Path(path).is_dir():
        raise ModelNotFoundError(f"no {what} for dataset {dataset!r} at {path}, where `make pretrain DATASET={dataset}` "
                                 f"saves one: run it, or name a model with {option}=<model folder or hub id>{also}")
    return str(path)
