"""BLIP (Li et al., ICML 2022) behind :class:`~pipeline.models.base.ImageTextModel`, via transformers'
``BlipForImageTextRetrieval`` (e.g. ``Salesforce/blip-itm-base-coco`` or a local copy).

Contrastive view (attacks, training, the first stage of retrieval): the image-text contrastive (ITC) embeddings,
``vision_proj`` of the vision tower's CLS token and ``text_proj`` of the unimodal text encoder's CLS token
(the ``use_itm_head=False`` path of the transformers model). The contrastive scale: transformers' model has no
temperature parameter (BLIP's ``temp``, 0.07 at release), so the bundle adds ``logit_scale`` to the module,
initialised from ``BlipConfig.logit_scale_init_value`` (ln(1 / 0.07) = 2.6592 by default) and written back there
on save, so a trained scale survives ``save`` / load.

Matching view (:meth:`BLIPBundle.itm_scores`): the ITM head on the text encoder run with cross-attention to the
image tokens; retrieval re-ranks the contrastive top k with it, as BLIP's and ALBEF's evaluations do
(:mod:`pipeline.evaluation.itm`). ``has_itm`` is False when the checkpoint carried no ``itm_head`` weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor

from pipeline.models.base import ImageTextModel
from pipeline.models.hf import _preset, _set_max_length
from pipeline.core.ledger import own_tree

log = logging.getLogger(__name__)

BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # BLIP normalises with OpenAI CLIP's constants
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# initializer_range (every weight's std): transformers' BLIP init (BERT's 0.02; the vision tower's class and
# position embeddings at 1e-10) suits loading released weights, not training from scratch: the CLS token starts at
# ~0 and the small weights average the patches uniformly, so a random BLIP's CLS embeddings are the same for every
# image (mean cosine 1.0 between random images at the small preset) and every text, and the losses have nothing to
# tell pairs apart by. About 1 / sqrt(width) works. Measured on synth (small preset, 150 steps, 150 test images):
# 0.1 reaches TR / IR R@1 47 / 49 % with no gap to the train images, 0.05 45 / 48 %, while 0.2 memorises the train
# images (TR R@1 45 % there, 5 % on test after 300 steps); at the tiny preset (tests) 0.1 leaves the ITM head
# near chance after 60 steps on toy shards, 0.2 does not.
#: Random-init BLIP retrieval configurations, sized like ``CLIP_PRESETS`` (``make pretrain FAMILY=blip`` trains
#: them; real runs load e.g. "Salesforce/blip-itm-base-coco"). ``layers`` serve both towers; the text tower
#: cross-attends to the image tokens for the ITM head.
BLIP_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"layers": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            initializer_range=0.2),
             "image_size": 32, "patch_size": 8, "max_position_embeddings": 64, "image_text_hidden_size": 32},
    "small": {"layers": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                             initializer_range=0.1),
              "image_size": 64, "patch_size": 8, "max_position_embeddings": 64, "image_text_hidden_size": 128},
}


def blip_image_processor(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> BlipImageProcessor:
    """The processor saved beside a BLIP (retrieval or captioning): square resize to ``size``, its normalisation."""
    return BlipImageProcessor(size={"height": size, "width": size}, image_mean=list(mean), image_std=list(std))


def _ensure_scale(model: BlipForImageTextRetrieval) -> None:
    if not isinstance(getattr(model, "logit_scale", None), torch.nn.Parameter):
        value = float(model.config.logit_scale_init_value)
        model.logit_scale = torch.nn.Parameter(torch.tensor(value, device=model.vision_proj.weight.device))


@dataclass
class BLIPBundle(ImageTextModel):
    model: BlipForImageTextRetrieval
    tokenizer: object
    image_size: int
    mean: tuple[float, float, float] = BLIP_MEAN
    std: tuple[float, float, float] = BLIP_STD
    itm_loaded: bool = True
    _stats: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    family = "blip"
    image_prefixes = ("vision_model.", "vision_proj.")

    def __post_init__(self) -> None:
        _ensure_scale(self.model)

    @property
    def max_length(self) -> int:
        return min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.image_text_hidden_size)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    @property
    def edit_frame(self) -> tuple[int, int] | None:
        tok = self.tokenizer
        if not tok.is_fast or tok.cls_token_id is None or tok.sep_token_id is None:
            return None
        return tok.cls_token_id, tok.sep_token_id

    @property
    def has_itm(self) -> bool:
        return self.itm_loaded

    def image_tokens(self, pixels01: torch.Tensor) -> torch.Tensor:
        pixels = self.normalize(pixels01.to(self.device))
        return self.model.vision_model(pixel_values=pixels).last_hidden_state

    def image_features(self, pixels01: torch.Tensor) -> torch.Tensor:
        return self.project_image_tokens(self.image_tokens(pixels01))

    def project_image_tokens(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """The contrastive image features of :meth:`image_tokens`' output: ``vision_proj`` of the CLS token."""
        return self.model.vision_proj(image_tokens[:, 0, :])

    def text_features(self, texts: list[str] | dict[str, torch.Tensor]) -> torch.Tensor:
        batch = self._features(texts)
        out = self.model.text_encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return self.model.text_proj(out.last_hidden_state[:, 0, :])

    def itm_scores(self, pixels01: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """The ITM head's "match" logit for each aligned (image i, text i) pair, [N].

        BLIP's evaluation adds it to the contrastive similarity of the pair (``score + topk_sim``)."""
        if not self.has_itm:
            super().itm_scores(pixels01, texts)
        if len(pixels01) != len(texts):
            raise ValueError(f"{len(pixels01)} images for {len(texts)} texts: itm_scores takes aligned pairs")
        return self.itm_logits(self.image_tokens(pixels01), self.tokenize(texts))[:, 1]

    def itm_logits(self, image_tokens: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ITM head's (no match, match) logits [N, 2] of aligned rows: image tokens [N, P, H] (from
        :meth:`image_tokens`) and tokenized texts; differentiable (training's ITM loss)."""
        mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=image_tokens.device)
        out = self.model.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                      encoder_hidden_states=image_tokens, encoder_attention_mask=mask)
        return self.model.itm_head(out.last_hidden_state[:, 0, :])

    def image_processor(self) -> BlipImageProcessor:
        return blip_image_processor(self.image_size, self.mean, self.std)

    def save(self, directory: str | Path) -> Path:
        directory = own_tree(Path(directory))  # refuses a folder of someone else's
        self.model.config.logit_scale_init_value = float(self.model.logit_scale.detach())
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        self.image_processor().save_pretrained(directory)
        return directory


def load_blip(name: str, kwargs: dict, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> BLIPBundle:
    """Load inside :func:`pipeline.models.hf._loading` (``kwargs``: its from_pretrained options)."""
    model, info = BlipForImageTextRetrieval.from_pretrained(name, output_loading_info=True, **kwargs)
    missing = set(info.get("missing_keys", ()))
    itm = not any(key.startswith("itm_head.") for key in missing)
    if not itm:
        log.warning("%s has no itm_head weights: contrastive use only, ITM re-ranking refused", name)
    if dtype is not None:
        model = model.to(dtype)
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    try:
        proc = BlipImageProcessor.from_pretrained(name, **kwargs)
        image_size, mean, std = int(proc.size["height"]), tuple(proc.image_mean), tuple(proc.image_std)
    except OSError:
        image_size, mean, std = model.config.vision_config.image_size, BLIP_MEAN, BLIP_STD
    limit = model.config.text_config.max_position_embeddings
    if tokenizer.model_max_length is None or tokenizer.model_max_length > limit:
        tokenizer.model_max_length = limit
    # BLIP's released ITM evaluation keeps the state dict's own keys: ours adds logit_scale (saved in the config).
    bundle = BLIPBundle(model=model.eval(), tokenizer=tokenizer, image_size=image_size, mean=mean, std=std,
                        itm_loaded=itm)
    return bundle.to(device)


def blip_config(preset: str, tokenizer) -> BlipConfig:
    """The BlipConfig of ``BLIP_PRESETS[preset]`` sized to ``tokenizer`` (a BERT WordPiece one: its [CLS] starts
    a text, its [SEP] ends it), every weight initialised with the preset's std."""
    spec = _preset(BLIP_PRESETS, preset)
    layers = spec["layers"]
    text = dict(layers, vocab_size=len(tokenizer), max_position_embeddings=spec["max_position_embeddings"],
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                sep_token_id=tokenizer.sep_token_id)
    vision = dict(layers, image_size=spec["image_size"], patch_size=spec["patch_size"])
    _set_max_length(tokenizer, text["max_position_embeddings"])
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=spec["image_text_hidden_size"],
                      initializer_range=layers["initializer_range"])


def build_blip(config: BlipConfig, tokenizer, image_size: int | None = None) -> BLIPBundle:
    """A randomly initialised BLIP retrieval model (``make pretrain FAMILY=blip``, tests)."""
    with torch.random.fork_rng(devices=[]):
        model = BlipForImageTextRetrieval(config)
    size = image_size or config.vision_config.image_size
    return BLIPBundle(model=model.eval(), tokenizer=tokenizer, image_size=size)
