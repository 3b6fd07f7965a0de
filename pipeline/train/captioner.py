"""Training a BLIP captioner's text decoder on a dataset's base shards (the captioning stand-in `make pretrain
FAMILY=blip` makes beside the BLIP retrieval stand-in).

As BLIP fine-tunes captioning (``train_caption.py`` with ``blip_decoder``): the LM loss on "a picture of " +
caption, the prompt's tokens not in the loss, label smoothing 0.1, every human caption its own pair (ALBEF-style
annotation files: one entry per caption). Unlike BLIP, the vision encoder stays frozen: the decoder learns to read
the retrieval model's vision encoder, so that a vision encoder fine-tuned by any training mode (same architecture)
can be put in at evaluation (:func:`pipeline.models.blip_captioning.with_vision_from`) and captioned by the
same decoder. AdamW, linear warm-up and cosine decay (BLIP: AdamW, cosine, lr 1e-5 on pretrained weights; a
stand-in trained from scratch needs a larger rate).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.core.shards import require_shards
from pipeline.models.blip_captioning import (
    BLIPCaptioner,
    build_captioner,
    decoder_tokenizer,
    text_config_for,
    with_vision_from,
)
from pipeline.train import data
from pipeline.train.loop import cosine_with_warmup

log = logging.getLogger(__name__)

LABEL_SMOOTHING = 0.1  # BLIP's BertLMHeadModel loss


def build_captioner_for(retrieval, tokenizer=None) -> BLIPCaptioner:
    """A captioner whose vision config and weights are the BLIP retrieval bundle's and whose decoder has the
    retrieval text encoder's sizes, over ``tokenizer`` (default the bundle's; a bos token added when it has none).
    The decoder is randomly initialised: train it with :func:`train_captioner`."""
    from transformers import BlipConfig

    if getattr(retrieval, "family", None) != "blip":
        raise ValueError(f"build_captioner_for takes a BLIP retrieval model, not a {getattr(retrieval, 'family', '?')} one")
    source = retrieval.model.config
    text = source.text_config
    sizes = {name: getattr(text, name) for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                    "num_attention_heads", "max_position_embeddings")}
    tok = decoder_tokenizer(tokenizer if tokenizer is not None else retrieval.tokenizer)  # its ids go in the config
    config = BlipConfig(text_config=text_config_for(tok, **sizes), vision_config=source.vision_config.to_dict())
    captioner = build_captioner(config, tok, image_size=retrieval.image_size)
    return with_vision_from(captioner, retrieval)


def train_urls(base_dir: Path, split: str = "train") -> list[str]:
    """The split's base shards (FileNotFoundError naming `make ingest` when there are none)."""
    return [str(path) for path in require_shards(base_dir, split)]


def train_captioner(captioner: BLIPCaptioner, urls: list[str], *, steps: int, batch_size: int, lr: float = 1e-3,
                    seed: int = 0, device: str | torch.device = "cpu", warmup: int = 0,
                    num_workers: int = 0) -> list[float]:
    """Train the decoder (vision encoder frozen) for ``steps`` batches of (image, caption) pairs streamed from
    the shards ``urls``; returns the loss per step. The captioner is left in eval mode on ``device``."""
    if steps < 0 or batch_size < 1:
        raise ValueError(f"steps={steps}, batch_size={batch_size}: need steps >= 0 and batch_size >= 1")
    captioner.to(device)
    model = captioner.model
    model.vision_model.requires_grad_(False)
    decoder = [p for p in model.text_decoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(decoder, lr=lr, weight_decay=0.05)  # BLIP's weight decay
    scheduler = cosine_with_warmup(optimizer, warmup, steps)
    pipeline = data.build_pipeline(urls, batch_size=batch_size, image_size=captioner.image_size, seed=seed,
                                   captions="all", shuffle_buffer=max(100, 4 * batch_size))
    batches = data.endless(data.build_loader(pipeline, num_workers))
    losses: list[float] = []
    model.train()
    model.vision_model.eval()  # frozen: no dropout there either
    try:
        for _ in tqdm(range(steps), desc="captioner", leave=False):
            batch = next(batches)
            loss = captioner.lm_loss(batch["images"].to(device), batch["texts"], label_smoothing=LABEL_SMOOTHING)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
    finally:
        model.eval()
        model.vision_model.requires_grad_(True)
    if losses:
        log.info("captioner loss %.3f -> %.3f over %d steps", losses[0], sum(losses[-10:]) / len(losses[-10:]), steps)
    return losses
