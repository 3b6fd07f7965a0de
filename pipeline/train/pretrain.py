"""`make pretrain`: the demo's stand-ins for pretrained CLIP (or BLIP) and bert-base, trained from scratch on one
dataset.

1. tokenizers (CLIP BPE, BERT WordPiece) trained offline on the train split's captions;
2. a small BERT masked LM on those captions (the candidate generator of BERT-Attack);
3. a small CLIP from `CLIP_PRESETS[clip_preset]`, trained with the `ft` mode of the training loop on the base
   shards (so it streams, logs and checkpoints like any run: RUNS_DIR/pretrain-<dataset>-<time>/, whose
   config.json is that `ft` run's and pretrain.json this PretrainConfig: `pretrain --config <it>` replays it);
   with `family=blip` instead a small BLIP retrieval model from `BLIP_PRESETS[clip_preset]` with the masked LM's
   WordPiece tokenizer (BLIP's own is BERT's), trained the same way on BLIP's losses: contrastive and ITM;
4. both saved with save_pretrained to MODELS_DIR/<dataset>/{clip or blip} and MODELS_DIR/<dataset>/mlm.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DataCollatorForLanguageModeling

from pipeline.core.config import save_config
from pipeline.models.blip import blip_config, build_blip
from pipeline.models.device import autocast, resolve_device, resolve_precision
from pipeline.models.hf import MLMBundle, build_clip, build_mlm, train_tokenizers
from pipeline.core.paths import Layout
from pipeline.core.schema import read_captions
from pipeline.core.tracking import Tracker
from pipeline.train.config import DataConfig, OptimConfig, PretrainConfig, TrainConfig
from pipeline.train.loop import cosine_with_warmup
from pipeline.train.main import train
from pipeline.core.ledger import own_tree, remove_own

log = logging.getLogger(__name__)
PRETRAIN_CONFIG = "pretrain.json"  # beside the `ft` run's config.json in the run folder


def train_mlm(mlm: MLMBundle, captions: list[str], cfg: PretrainConfig, device: torch.device) -> list[float]:
    """Masked-LM training on the captions (transformers' 80/10/10 masking); returns the loss per step."""
    mlm.to(device).model.train()
    collator = DataCollatorForLanguageModeling(mlm.tokenizer, mlm_probability=cfg.mask_prob)
    optimizer = torch.optim.AdamW(mlm.model.parameters(), lr=cfg.mlm_lr, weight_decay=0.01)
    scheduler = cosine_with_warmup(optimizer, min(cfg.warmup, cfg.mlm_steps // 10), cfg.mlm_steps)
    rng, losses = random.Random(cfg.seed), []
    for _ in tqdm(range(cfg.mlm_steps), desc="mlm"):
        texts = rng.sample(captions, min(cfg.mlm_batch_size, len(captions)))
        encoded = mlm.tokenizer(texts, truncation=True, max_length=mlm.tokenizer.model_max_length)
        batch = {k: v.to(device) for k, v in collator([{"input_ids": ids} for ids in encoded["input_ids"]]).items()}
        with autocast(device, cfg.precision):
            loss = mlm.model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    mlm.model.eval()
    return losses


def pretrain(cfg: PretrainConfig, layout: Layout | None = None) -> dict[str, str]:
    layout = layout or Layout.from_env()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device, local_rank=0)
    # 1. Tokenizers.
    captions = read_captions(layout.base_dir(cfg.dataset))
    clip_tok, bert_tok = train_tokenizers(captions, cfg.vocab_size)
    # 2. Masked LM.
    mlm = build_mlm(cfg.mlm_preset, bert_tok)
    losses = train_mlm(mlm, captions, cfg, device)
    if losses:
        log.info("mlm loss %.3f -> %.3f", losses[0], sum(losses[-10:]) / len(losses[-10:]))
    mlm_dir = mlm.save(layout.model_dir(cfg.dataset, "mlm"))
    run_dir = layout.runs_dir / f"pretrain-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    save_config(cfg, run_dir / PRETRAIN_CONFIG,
                resolved={"device": str(device), "precision_resolved": resolve_precision(cfg.precision, device)})
    tracker = Tracker(run_dir / "mlm", cfg.report_to, dataclasses.asdict(cfg), name=f"{run_dir.name}-mlm",
                      wandb_mode=cfg.wandb_mode)
    for step, loss in enumerate(losses):
        tracker.log(step, {"loss": loss}, prefix="mlm")
    tracker.close()
    # 3. CLIP or BLIP: the `ft` loop from a random init saved where `train` can load it.
    if cfg.family == "blip":
        init_dir = build_blip(blip_config(cfg.clip_preset, bert_tok), bert_tok).save(run_dir / "init")
        pair_losses = ("contrastive", "itm")  # BLIP's recipe: the ITM head learns with the encoders
    else:
        init_dir = build_clip(cfg.clip_preset, clip_tok).save(run_dir / "init")
        pair_losses = ("contrastive",)
    result = train(
        TrainConfig(
            mode="ft", dataset=cfg.dataset, clip=str(init_dir), steps=cfg.train_steps, batch_size=cfg.batch_size,
            precision=cfg.precision, seed=cfg.seed, save_every=max(1, cfg.train_steps // 4), run_dir=str(run_dir),
            device=cfg.device, optim=OptimConfig(lr=cfg.lr, warmup=cfg.warmup), report_to=cfg.report_to,
            wandb_mode=cfg.wandb_mode, losses=pair_losses,
            data=DataConfig(num_workers=cfg.num_workers),
        ),
        layout,
    )
    # 4. Publish.
    model_dir = layout.model_dir(cfg.dataset, cfg.family)
    remove_own(model_dir)
    shutil.copytree(result.model_dir, own_tree(model_dir), dirs_exist_ok=True)
    remove_own(init_dir)
    out = {cfg.family: str(model_dir), "mlm": str(mlm_dir), "run_dir": str(result.run_dir)}
    if cfg.family == "blip":
        captioner = pretrain_captioner(cfg, layout, model_dir)
        if captioner is not None:
            out["captioner"] = captioner
    log.info("pretrained models: %s", ", ".join(f"{k} {v}" for k, v in out.items() if k != "run_dir"))
    return out


def pretrain_captioner(cfg: PretrainConfig, layout: Layout, retrieval_dir: Path) -> str | None:
    """The stand-in BLIP captioner: BLIP's captioner (:mod:`pipeline.models.blip_captioning`) whose vision encoder
    is the BLIP just saved at ``retrieval_dir``, frozen, and whose decoder learns the train split's captions
    (:func:`pipeline.train.captioner.train_captioner`); saved to MODELS_DIR/<dataset>/blip-captioning. A vision
    encoder fine-tuned from that BLIP by any mode can then be put in it (`make eval-captioning CKPT=<run>`).
    None when ``caption_steps`` is 0."""
    if not cfg.caption_steps:
        return None
    from pipeline.models.loading import load_model
    from pipeline.train.captioner import build_captioner_for, train_captioner, train_urls

    device = resolve_device(cfg.device, local_rank=0)
    torch.manual_seed(cfg.seed)
    captioner = build_captioner_for(load_model(retrieval_dir, device="cpu"))
    train_captioner(captioner, train_urls(layout.base_dir(cfg.dataset)), steps=cfg.caption_steps,
                    batch_size=cfg.caption_batch_size, lr=cfg.caption_lr, seed=cfg.seed, device=device,
                    warmup=min(cfg.warmup, cfg.caption_steps // 10), num_workers=cfg.num_workers)
    out = layout.model_dir(cfg.dataset, "blip-captioning")
    remove_own(out)
    return str(captioner.to("cpu").save(out))
