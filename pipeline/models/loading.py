"""One loader for every model family: :func:`load_model` detects the family from the spec.

* ``open_clip:<model_name>[:<pretrained file, tag or hf-hub:id>]``, or a directory holding
  ``open_clip_config.json``: open_clip (:mod:`pipeline.models.openclip`);
* a directory or hub id whose ``config.json`` has ``model_type`` ``clip``: Hugging Face CLIP
  (:func:`pipeline.models.hf.load_clip`, unchanged);
* ``model_type`` ``blip``: BLIP retrieval (:mod:`pipeline.models.blip`).

Anything else raises :class:`UnsupportedModelError` naming the families.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.models.base import ImageTextModel
from pipeline.models.errors import check_local
from pipeline.models.hf import _loading, load_clip
from pipeline.models.openclip import CONFIG_FILE, PREFIX, load_open_clip

FAMILIES = ("clip", "blip", "open_clip")
FAMILY_HELP = ("Hugging Face CLIP (config.json model_type 'clip'), BLIP (config.json model_type 'blip', "
               "loaded as BlipForImageTextRetrieval) and open_clip ('open_clip:<model_name>[:<pretrained file, tag "
               "or hf-hub:id>]' or a directory holding open_clip_config.json)")


class UnsupportedModelError(ValueError):
    """The spec names a model of no supported family."""


def _model_type(spec: str) -> str | None:
    path = Path(spec).expanduser()
    if path.is_dir():
        config = path / "config.json"
        return json.loads(config.read_text()).get("model_type") if config.is_file() else None
    from transformers import AutoConfig

    with _loading(spec) as kw:
        return AutoConfig.from_pretrained(spec, **kw).model_type


def model_family(spec: str) -> str:
    """"clip", "blip" or "open_clip" for a spec; ModelNotFoundError / UnsupportedModelError otherwise."""
    spec = str(spec)
    if spec.startswith(PREFIX) or (Path(spec).expanduser() / CONFIG_FILE).is_file():
        return "open_clip"
    model_type = _model_type(spec)
    if model_type in ("clip", "blip"):
        return model_type
    what = f"model_type {model_type!r}" if model_type else "no config.json and no open_clip_config.json"
    raise UnsupportedModelError(f"{spec}: {what}; supported families: {FAMILY_HELP}")


def check_model_spec(spec: str | Path) -> str:
    """``spec``, unless it means a local folder (:func:`pipeline.models.errors.looks_like_path`) that is not there:
    then ModelNotFoundError at once, naming it, before any hub request. What runs load checks them first."""
    spec = str(spec)
    if not spec.startswith(PREFIX):
        check_local(spec)
    return spec


def load_model(spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> ImageTextModel:
    """The bundle of any supported family (see the module docstring). Raises ModelNotFoundError or
    UnsupportedModelError."""
    spec = check_model_spec(spec)
    family = model_family(spec)
    if family == "open_clip":
        return load_open_clip(spec, device=device, dtype=dtype)
    if family == "clip":
        return load_clip(spec, device=device, dtype=dtype)
    from pipeline.models.blip import load_blip

    with _loading(spec) as kw:
        return load_blip(spec, kw, device=device, dtype=dtype)
