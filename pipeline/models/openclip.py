"""open_clip models behind :class:`~pipeline.models.base.ImageTextModel` (needs the ``families`` extra).

Specs (see :func:`pipeline.models.loading.load_model`):

* ``open_clip:<model_name>``: the architecture of open_clip's config registry, random init (tests, stand-ins);
* ``open_clip:<model_name>:<file>``: with a weights file, e.g. the released robust checkpoints
  (TeCoA / FARE: ``open_clip:ViT-L-14:/models/fare2.pt``);
* ``open_clip:<model_name>:<tag>``: one of open_clip's pretrained tags (``openai``, ``laion2b_s34b_b79k``; cached);
* ``open_clip:hf-hub:<org/repo>`` or ``open_clip:<model_name>:hf-hub:<org/repo>``: a hub repository in open_clip's
  layout (``chs20/FARE2-ViT-B-32``), taken from the Hugging Face cache when offline;
* a directory holding ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``) and its weights: what
  :meth:`OpenCLIPBundle.save` writes (weights in ``model.safetensors``, the name training checkpoints read).

Tokens: open_clip's bundled tokenizer (``SimpleTokenizer``: CLIP's BPE, 77 positions padded with 0, the pooled
token is the end-of-text one); it has no character offsets, so BERT-Attack's fast path re-tokenises the edited
strings (``edit_frame`` is None). The text tower always reads ``context_length`` positions: shorter id batches
are padded with 0 to it (what the tokenizer itself does).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.models.base import ImageTextModel
from pipeline.core.ledger import own_tree

log = logging.getLogger(__name__)

PREFIX = "open_clip:"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "model.safetensors"
MISSING = ("open_clip is not installed: `pip install open_clip_torch` (or `make setup`, which installs the "
           "'families' extra: pip install -e '.[families]')")


def import_open_clip():
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(MISSING) from err
    return open_clip


@dataclass
class OpenCLIPBundle(ImageTextModel):
    """An open_clip CLIP / CustomTextCLIP with its tokenizer; image inputs are [0, 1] pixels."""

    model: torch.nn.Module
    tokenizer: Any
    image_size: int
    model_cfg: dict[str, Any]
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    _stats: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    family = "open_clip"
    image_prefixes = ("visual.",)

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.context_length)

    @property
    def max_length(self) -> int:
        return self.context_length

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    @property
    def pad_token_id(self) -> int:
        return 0

    def image_features(self, pixels01: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(self.normalize(pixels01.to(self.device)))

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(list(texts)).to(self.device)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        ids, mask = self.tokenize(texts).values()
        return [row[:int(n)] for row, n in zip(ids.tolist(), mask.sum(-1).tolist())]

    def text_features(self, texts: list[str] | dict[str, torch.Tensor]) -> torch.Tensor:
        ids = self._features(texts)["input_ids"].to(self.device)
        width = self.context_length
        if ids.shape[1] < width:
            ids = torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=0)
        return self.model.encode_text(ids[:, :width])

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_model

        directory = own_tree(Path(directory))  # refuses a folder of someone else's
        config = {"model_cfg": self.model_cfg,
                  "preprocess_cfg": {"size": self.image_size, "mean": list(self.mean), "std": list(self.std)}}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        save_model(self.model, str(directory / WEIGHTS_FILE))
        return directory


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``open_clip:<name>[:<pretrained>]`` -> (name, pretrained); a hub id keeps its ``hf-hub:`` schema."""
    rest = spec[len(PREFIX):]
    if rest.startswith("hf-hub:"):
        return rest, None
    name, _, pretrained = rest.partition(":")
    if not name:
        raise ValueError(f"{spec!r}: expected open_clip:<model_name>[:<pretrained file, tag or hf-hub:id>]")
    if pretrained.startswith("hf-hub:"):
        return pretrained, None
    return name, pretrained or None


def _preprocess(model: torch.nn.Module, cfg: dict[str, Any]) -> tuple[int, tuple, tuple]:
    pre = dict(getattr(model.visual, "preprocess_cfg", None) or {})
    size = pre.get("size", cfg["vision_cfg"].get("image_size", 224))
    size = size[0] if isinstance(size, (list, tuple)) else size
    mean = tuple(pre.get("mean", OpenCLIPBundle.mean))
    std = tuple(pre.get("std", OpenCLIPBundle.std))
    return int(size), mean, std


def _model_cfg(open_clip, name: str) -> dict[str, Any]:
    if name.startswith("local-dir:"):
        return json.loads((Path(name[len("local-dir:"):]) / CONFIG_FILE).read_text())["model_cfg"]
    if name.startswith("hf-hub:"):
        from open_clip.factory import _get_hf_config

        return _get_hf_config(name[len("hf-hub:"):])["model_cfg"]
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"open_clip has no model config {name!r}; known: {', '.join(open_clip.list_models())}")
    return cfg


def load_open_clip(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> OpenCLIPBundle:
    """An open_clip bundle from a spec (``open_clip:...``) or a directory with ``open_clip_config.json``."""
    open_clip = import_open_clip()
    if spec.startswith(PREFIX):
        name, pretrained = parse_spec(spec)
    else:
        name, pretrained = f"local-dir:{Path(spec).expanduser()}", None
    cfg = _model_cfg(open_clip, name)
    with torch.random.fork_rng(devices=[]):  # random init must not shift a seeded run's later draws
        model = open_clip.create_model(name, pretrained=pretrained, device="cpu")
    tokenizer = open_clip.get_tokenizer(name)
    if dtype is not None:
        model = model.to(dtype)
    size, mean, std = _preprocess(model, cfg)
    bundle = OpenCLIPBundle(model=model.eval(), tokenizer=tokenizer, image_size=size, model_cfg=cfg, mean=mean,
                            std=std)
    return bundle.to(device)


def build_open_clip(model_cfg: dict[str, Any], name: str = "pipeline-custom") -> OpenCLIPBundle:
    """A randomly initialised open_clip model from a config dict (registered under ``name`` in open_clip's model
    config registry, as a file of its own in a temporary folder), e.g. a tiny one for tests."""
    import tempfile

    open_clip = import_open_clip()
    folder = Path(tempfile.mkdtemp(prefix="open_clip_cfg_"))
    (folder / f"{name}.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(folder)
    return load_open_clip(f"{PREFIX}{name}")
