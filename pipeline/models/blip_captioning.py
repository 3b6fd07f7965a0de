"""BLIP's captioning model (Li et al., ICML 2022) via transformers' ``BlipForConditionalGeneration``
(``Salesforce/blip-image-captioning-base`` or a local copy): a ViT and a BERT decoder cross-attending to its tokens.

As BLIP evaluates captioning (its ``blip_decoder`` and ``configs/caption_coco.yaml``): the decoder starts from the
prompt "a picture of " (its first token replaced by the decoder's bos token, ``[DEC]`` in BLIP), beam search with
3 beams, at most 20 and at least 5 tokens counting the prompt, no repetition penalty; the prompt is removed from
the output. BLIP removes it by characters (``caption[len(prompt):]``); we drop the prompt's tokens, the same text
with bert-base's tokenizer and exact with any tokenizer. Training (pipeline/train/captioner.py): the LM loss on
"a picture of " + caption, the prompt's tokens not in the loss, BLIP's label smoothing 0.1.

Pixels: [0, 1], normalised inside :meth:`BLIPCaptioner.normalize` (BLIP's mean / std), so attacks work in pixel
space as with the retrieval bundles. :func:`with_vision_from` puts a BLIP retrieval model's vision encoder (any
training mode's) into a captioner.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AddedToken, AutoTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor

from pipeline.core.images import model_pixels
from pipeline.core.ledger import own_tree
from pipeline.models.blip import BLIP_MEAN, BLIP_STD, blip_image_processor
from pipeline.models.errors import check_local
from pipeline.models.hf import _loading

log = logging.getLogger(__name__)

PROMPT = "a picture of "  # BLIP's configs/caption_coco.yaml
DECODER_BOS = "[DEC]"  # BLIP's init_tokenizer: the decoder's start token
MAX_TEXT_TOKENS = 40  # BLIP's blip_decoder truncates training captions at 40 tokens
# The fields that make two BLIP vision encoders interchangeable (same weights' shapes, same computation).
VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                 "patch_size", "hidden_act", "layer_norm_eps")
TINY_LAYERS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


@dataclass(frozen=True)
class Generation:
    """BLIP's captioning evaluation: beam search (``sample=False``), 3 beams, 20 / 5 tokens with the prompt."""

    num_beams: int = 3
    max_length: int = 20
    min_length: int = 5
    repetition_penalty: float = 1.0


@dataclass
class BLIPCaptioner:
    model: BlipForConditionalGeneration
    tokenizer: object
    image_size: int
    mean: tuple[float, float, float] = BLIP_MEAN
    std: tuple[float, float, float] = BLIP_STD
    prompt: str = PROMPT

    family = "blip-captioning"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> BLIPCaptioner:
        self.model.to(device)
        return self

    def normalize(self, pixels01: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=pixels01.device, dtype=pixels01.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels01.device, dtype=pixels01.dtype).view(1, 3, 1, 1)
        return (pixels01 - mean) / std

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> [B, 3, S, S] pixels in [0, 1], as the retrieval bundles preprocess them."""
        return torch.stack([model_pixels(image, self.image_size) for image in images]).float().div_(255.0)

    @property
    def prompt_length(self) -> int:
        """Tokens of the prompt with the bos token, without the final [SEP] (BLIP's ``prompt_length``)."""
        return len(self.tokenizer(self.prompt).input_ids) - 1

    def caption_tokens(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` (bos first), ``attention_mask`` and ``labels`` (-100 on the prompt and the padding) of
        prompt + caption, as BLIP's ``blip_decoder.forward`` builds them."""
        tok = self.tokenizer([self.prompt + c for c in captions], padding="longest", truncation=True,
                             max_length=MAX_TEXT_TOKENS, return_tensors="pt").to(self.device)
        input_ids = tok.input_ids.clone()
        input_ids[:, 0] = self.model.config.text_config.bos_token_id
        labels = input_ids.masked_fill(tok.attention_mask == 0, -100)
        labels[:, :self.prompt_length] = -100
        return {"input_ids": input_ids, "attention_mask": tok.attention_mask, "labels": labels}

    def image_tokens(self, pixels01: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model(pixel_values=self.normalize(pixels01.to(self.device))).last_hidden_state

    def lm_loss(self, pixels01: torch.Tensor, captions: list[str], owners: torch.Tensor | None = None,
                label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean next-token cross-entropy over the caption tokens (and [SEP]) of each caption given its image:
        ``owners[j]`` is caption j's image (default: caption j belongs to image j). Differentiable in the pixels."""
        image_tokens = self.image_tokens(pixels01)
        if owners is not None:
            image_tokens = image_tokens[owners.to(image_tokens.device)]
        if len(image_tokens) != len(captions):
            raise ValueError(f"{len(image_tokens)} images for {len(captions)} captions: give owners")
        batch = self.caption_tokens(captions)
        logits = self.model.text_decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         encoder_hidden_states=image_tokens, return_dict=True).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), batch["labels"][:, 1:], ignore_index=-100,
                               label_smoothing=label_smoothing)

    @torch.no_grad()
    def generate(self, pixels01: torch.Tensor, settings: Generation = Generation()) -> list[str]:
        """One caption per image, without the prompt."""
        pixels = self.normalize(pixels01.to(self.device))
        prompt = self.tokenizer([self.prompt] * len(pixels), return_tensors="pt").input_ids.to(self.device)
        out = self.model.generate(pixel_values=pixels, input_ids=prompt, num_beams=settings.num_beams,
                                  max_length=settings.max_length, min_length=settings.min_length,
                                  repetition_penalty=settings.repetition_penalty, do_sample=False)
        start = self.prompt_length  # generate drops the prompt's [SEP] and keeps its other tokens
        return [self.tokenizer.decode(ids[start:], skip_special_tokens=True).strip() for ids in out]

    def image_processor(self) -> BlipImageProcessor:
        return blip_image_processor(self.image_size, self.mean, self.std)

    def save(self, directory: str | Path) -> Path:
        directory = own_tree(Path(directory))  # refuses a folder of someone else's
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        self.image_processor().save_pretrained(directory)
        return directory


def decoder_tokenizer(tokenizer, prompt: str = PROMPT):
    """A copy of a BERT tokenizer with a bos token for the decoder (``[DEC]`` added when it has none, as BLIP's
    ``init_tokenizer`` adds it to bert-base-uncased), and each prompt word it would split added as one token (a
    stand-in's vocabulary learned from captions lacks "picture"): the prompt takes 4 tokens as with bert-base, so
    the generation lengths leave the caption BLIP's 16 tokens."""
    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.bos_token is None:
        tokenizer.add_special_tokens({"bos_token": DECODER_BOS})
    split = [word for word in prompt.split() if len(tokenizer.tokenize(word)) > 1]
    if split:
        tokenizer.add_tokens([AddedToken(word, single_word=True) for word in split])  # "often" stays whole
    if tokenizer.sep_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("the captioner's tokenizer needs [SEP] and [PAD] tokens (a BERT WordPiece tokenizer)")
    return tokenizer


def text_config_for(tokenizer, **sizes) -> dict:
    """The decoder's text config: the tokenizer's vocabulary and special ids, and ``sizes``."""
    return dict(sizes, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id,
                eos_token_id=tokenizer.sep_token_id)


def build_captioner(config: BlipConfig | str, tokenizer, image_size: int | None = None) -> BLIPCaptioner:
    """A randomly initialised captioner from a BlipConfig, or the preset "tiny" (2 layers of width 32, 32 px)
    over ``tokenizer`` (a bos token added when it has none)."""
    tokenizer = decoder_tokenizer(tokenizer)
    if config == "tiny":
        config = BlipConfig(text_config=text_config_for(tokenizer, **TINY_LAYERS, max_position_embeddings=64),
                            vision_config=dict(TINY_LAYERS, image_size=32, patch_size=8))
    elif isinstance(config, str):
        raise ValueError(f"captioner preset {config!r}: the only preset is 'tiny' (or give a BlipConfig)")
    with torch.random.fork_rng(devices=[]):
        model = BlipForConditionalGeneration(config)
    limit = model.config.text_config.max_position_embeddings
    if tokenizer.model_max_length is None or tokenizer.model_max_length > limit:
        tokenizer.model_max_length = limit
    return BLIPCaptioner(model=model.eval(), tokenizer=tokenizer,
                         image_size=image_size or config.vision_config.image_size)


def load_captioner(spec: str | Path, device: str | torch.device = "cpu") -> BLIPCaptioner:
    """A BlipForConditionalGeneration from a local folder or a cached hub id. ModelNotFoundError when it is not
    there; ValueError when it is no BLIP model or has no text decoder weights (a retrieval checkpoint)."""
    spec = str(spec)
    check_local(spec, "captioning model")
    with _loading(spec) as kw:
        model_type = _model_type(spec, kw)
        if model_type != "blip":
            raise ValueError(f"{spec}: not a BLIP model (config.json model_type {model_type!r}); "
                             "the captioner is BLIP's BlipForConditionalGeneration")
        model, info = BlipForConditionalGeneration.from_pretrained(spec, output_loading_info=True, **kw)
        missing = [k for k in info.get("missing_keys", ()) if k.startswith("text_decoder.")]
        if missing:
            raise ValueError(f"{spec}: no text decoder weights ({len(missing)} text_decoder.* missing): not a BLIP "
                             "captioning checkpoint (BlipForConditionalGeneration); a retrieval model cannot "
                             "caption (give it as CKPT, whose vision encoder the captioner takes)")
        tokenizer = AutoTokenizer.from_pretrained(spec, **kw)
        try:
            proc = BlipImageProcessor.from_pretrained(spec, **kw)
            image_size, mean, std = int(proc.size["height"]), tuple(proc.image_mean), tuple(proc.image_std)
        except OSError:
            image_size, mean, std = model.config.vision_config.image_size, BLIP_MEAN, BLIP_STD
    if model.config.text_config.bos_token_id is None:
        raise ValueError(f"{spec}: its text config has no bos_token_id (the decoder's start token)")
    return BLIPCaptioner(model=model.eval(), tokenizer=tokenizer, image_size=image_size, mean=mean,
                         std=std).to(device)


def _model_type(spec: str, kw: dict) -> str | None:
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(spec, **kw), "model_type", None)


def vision_differences(a: BlipConfig, b: BlipConfig) -> list[str]:
    """``field: a vs b`` for each :data:`VISION_FIELDS` entry where two vision configs differ."""
    va, vb = a.vision_config, b.vision_config
    return [f"{name} {getattr(va, name, None)} vs {getattr(vb, name, None)}" for name in VISION_FIELDS
            if getattr(va, name, None) != getattr(vb, name, None)]


def with_vision_from(captioner: BLIPCaptioner, retrieval) -> BLIPCaptioner:
    """``captioner`` with the vision encoder (``vision_model`` weights, image size and normalisation) of a BLIP
    retrieval bundle (:class:`pipeline.models.blip.BLIPBundle`); ValueError when the vision configs differ."""
    if getattr(retrieval, "family", None) != "blip":
        raise ValueError(f"the vision encoder must come from a BLIP model, not a {getattr(retrieval, 'family', '?')} "
                         "one (the captioner's decoder reads BLIP ViT tokens)")
    differences = vision_differences(captioner.model.config, retrieval.model.config)
    if differences:
        raise ValueError(f"the BLIP model's vision encoder does not fit the captioner's (captioner vs model: "
                         f"{'; '.join(differences)})")
    state = {k: v.detach().clone() for k, v in retrieval.model.vision_model.state_dict().items()}
    captioner.model.vision_model.load_state_dict(state)
    captioner.image_size, captioner.mean, captioner.std = retrieval.image_size, retrieval.mean, retrieval.std
    return captioner
