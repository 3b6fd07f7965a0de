"""The interface every image-text model family implements for attacks, training, scoring and evaluation.

An :class:`ImageTextModel` holds a torch module (``model``) and everything around it: the tokenizer, the
pixel normalisation and the image size. All images handed to it are float pixels in [0, 1], [B, 3, S, S]; the
mean/std normalisation happens inside :meth:`ImageTextModel.encode_images`, so attacks perturb and clip in pixel
space and differentiate through it. Families: Hugging Face CLIP (:class:`pipeline.models.hf.CLIPBundle`),
open_clip (:class:`pipeline.models.openclip.OpenCLIPBundle`) and BLIP's contrastive towers
(:class:`pipeline.models.blip.BLIPBundle`); :func:`pipeline.models.loading.load_model` picks the family.

What the layers above rely on:

* ``image_features`` / ``text_features``: projected embeddings before L2 normalisation (FARE's loss needs them);
  ``encode_images`` / ``encode_texts``: the same, L2-normalised;
* ``tokenize(texts)`` -> ``{"input_ids", "attention_mask"}`` that ``encode_texts`` accepts in place of strings,
  ``token_ids(texts)``: the unpadded id lists (what BERT-Attack's fast path scores), ``pad_token_id``, and
  ``edit_frame``: (first, last) special ids when the tokenizer is a fast Hugging Face one that frames every text
  with exactly those two (then :class:`pipeline.attacks.text_parts.TokenEditor` may splice ids), else None;
* ``logit_scale``: exp of the learned log scale (a live parameter), ``embed_dim``;
* ``image_prefixes``: parameter-name prefixes of the image tower (with its projection), so
  :meth:`tower_parameters` splits the trainable parameters into ``"image"``, ``"text"`` and ``"scale"``;
* ``preprocess(images)`` (PIL -> [0, 1] pixels at ``image_size``), ``save(directory)`` (a directory
  :func:`~pipeline.models.loading.load_model` reads back, weights in ``model.safetensors``);
* ``itm_scores`` (BLIP only): the image-text matching head's logit of "match" for aligned pairs; ``has_itm``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.core.images import model_pixels

TOWERS = ("image", "text", "scale")


class ImageTextModel:
    """Base of the model bundles: the shared pixel handling; families implement the rest.

    Subclasses provide the attributes ``model`` (torch module), ``tokenizer``, ``image_size``, ``mean``, ``std``
    and a ``_stats`` dict (normalisation constants cached per device and dtype).
    """

    family: str = "?"
    image_prefixes: tuple[str, ...] = ()
    model: torch.nn.Module
    tokenizer: Any
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    _stats: dict[str, torch.Tensor]

    # ----------------------------------------------------------------------------------------- shared

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> ImageTextModel:
        self.model.to(device)
        return self

    def normalize(self, pixels01: torch.Tensor) -> torch.Tensor:
        key = f"{pixels01.device}:{pixels01.dtype}"
        if key not in self._stats:
            mean = torch.tensor(self.mean, device=pixels01.device, dtype=pixels01.dtype).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=pixels01.device, dtype=pixels01.dtype).view(1, 3, 1, 1)
            self._stats[key] = torch.stack([mean, std])
        mean, std = self._stats[key]
        return (pixels01 - mean) / std

    def encode_images(self, pixels01: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] pixels in [0, 1] -> L2-normalised embeddings [B, D] (differentiable)."""
        return F.normalize(self.image_features(pixels01), dim=-1)

    def encode_texts(self, texts: list[str] | dict[str, torch.Tensor]) -> torch.Tensor:
        """Texts (or the output of :meth:`tokenize`) -> L2-normalised embeddings [N, D]."""
        return F.normalize(self.text_features(texts), dim=-1)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> [B, 3, S, S] float pixels in [0, 1] by :func:`pipeline.core.images.model_pixels` (CLIP's:
        bicubic resize of the shorter side, centre crop), the same preprocessing training uses."""
        return torch.stack([model_pixels(image, self.image_size) for image in images]).float().div_(255.0)

    def tower_parameters(self, tower: str) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of one part: "image" (the image tower and its projection), "scale" (the learned
        logit scale) or "text" (everything else: the text tower, its projection, BLIP's matching head)."""
        if tower not in TOWERS:
            raise ValueError(f"tower={tower!r}: choose one of {TOWERS}")
        out = []
        for name, param in self.model.named_parameters():
            part = ("scale" if name.split(".")[-1] == "logit_scale"
                    else "image" if name.startswith(self.image_prefixes) else "text")
            if part == tower:
                out.append((name, param))
        return out

    def _features(self, texts: list[str] | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.tokenize(texts) if isinstance(texts, (list, tuple)) else texts

    @property
    def has_itm(self) -> bool:
        return False

    def itm_scores(self, pixels01: torch.Tensor, texts: list[str]) -> torch.Tensor:
        raise ValueError(f"{self.family} models have no image-text matching head: ITM re-ranking (itm_k) needs a "
                         f"BLIP retrieval checkpoint (BlipForImageTextRetrieval with its itm_head)")

    # -------------------------------------------------------------------------------- per family

    @property
    def max_length(self) -> int:
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        raise NotImplementedError

    @property
    def logit_scale(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def edit_frame(self) -> tuple[int, int] | None:
        return None

    def image_features(self, pixels01: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def text_features(self, texts: list[str] | dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Hugging Face tokenizers; open_clip overrides."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Unpadded token ids of each text, special tokens included, truncated as :meth:`tokenize` does."""
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]

    def save(self, directory: str | Path) -> Path:
        raise NotImplementedError
