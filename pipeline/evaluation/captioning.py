"""`make eval-captioning`: image captioning with BLIP's captioner, clean and under image attacks.

Protocol:

1. the captioner: ``CAPTION_MODEL`` (a ``BlipForConditionalGeneration``, default MODELS_DIR/<dataset>/
   blip-captioning); with ``CKPT`` (a BLIP training run or model of any mode) its vision encoder replaces the
   captioner's (:func:`pipeline.models.blip_captioning.with_vision_from`), so the row measures that encoder;
2. the test split's images (or the first ``size``), each with all its captions as references, in shard order;
3. clean: one caption per image, generated as BLIP evaluates (beam 3, 20 / 5 tokens with the prompt, prompt
   "a picture of " removed), scored with BLEU-4, METEOR, ROUGE-L, CIDEr (:mod:`pipeline.evaluation.caption_metrics`);
4. ``pgd-lm`` (white-box): PGD (:class:`pipeline.attacks.PGD`, eps 2/255, 10 steps of 0.5/255, random start)
   maximising the captioner's LM loss of the image's reference captions, then captions of the adversarial images;
5. transfer (SGA's cross-task protocol, with ``ATTACK_SOURCE``): each image attack of :data:`ATTACKS` (PGD,
   Co-Attack, SGA) crafted on the retrieval model ``ATTACK_SOURCE`` batch by batch with the images' captions, as
   `make eval` runs it (batch seeds, masked LM, captions normalised), the adversarial images resized to the
   captioner's input size when the source's differs, then captioned.

Output: ``MANIFESTS_DIR/<dataset>/evals/captioning/<name>.json`` (a subfolder: `make report` reads retrieval
evaluations only): settings, one row per attack (corpus metrics x 100, seconds, setting), each row's
``per_image`` captions and sentence-level scores (what a bootstrap over images resamples), the image ``keys``,
notes (METEOR / SPICE), provenance.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.attacks import ATTACKS, PGD, build_attack
from pipeline.attacks.base import make_generator
from pipeline.core.fileio import atomic_write_json
from pipeline.core.paths import Layout, as_plain_name
from pipeline.core.provenance import PROVENANCE_KEY, provenance
from pipeline.core.shard_urls import expand_urls
from pipeline.core.shards import require_shards
from pipeline.evaluation.caption_metrics import METRICS, CaptionScorer
from pipeline.evaluation.config import CaptioningConfig
from pipeline.evaluation.evaluate import (
    TestSet,
    batch_seed,
    default_eval_name,
    load_test_set,
    load_test_urls,
    normalise_caption,
    resolve_checkpoint,
    to_target_size,
)

log = logging.getLogger(__name__)

CAPTIONING_DIR = "captioning"
CLEAN = "clean"
WHITE_BOX = "pgd-lm"  # PGD on the captioner's language-modelling loss
CAPTION_MODEL_KIND = "blip-captioning"  # MODELS_DIR/<dataset>/blip-captioning
Perturb = Callable[[int, torch.Tensor, list[list[str]]], torch.Tensor]  # (batch index, images, captions) -> adversarial


def captioning_path(layout: Layout, dataset: str, name: str) -> Path:
    evals = layout.named_output(dataset, "evals", name)  # checks the name
    return evals.parent / CAPTIONING_DIR / evals.name


def caption_model_spec(cfg: CaptioningConfig, layout: Layout) -> str:
    """CAPTION_MODEL, or the dataset's stand-in when it is there (ModelNotFoundError naming how to make one)."""
    from pipeline.models.errors import ModelNotFoundError

    if cfg.caption_model:
        return cfg.caption_model
    path = layout.model_dir(cfg.dataset, CAPTION_MODEL_KIND)
    if not path.is_dir():
        raise ModelNotFoundError(f"no BLIP captioning model for dataset {cfg.dataset!r} at {path}, where `make pretrain "
                                 f"DATASET={cfg.dataset} FAMILY=blip` saves one: run it, or name one with "
                                 f"CAPTION_MODEL=<BlipForConditionalGeneration folder or hub id>")
    return str(path)


def default_name(cfg: CaptioningConfig, caption_spec: str, layout: Layout) -> str:
    if cfg.checkpoint:
        return default_eval_name(cfg.checkpoint, cfg.dataset, layout)
    path = Path(caption_spec)
    return as_plain_name(f"{path.parent.name}-{path.name}" if path.parent.name else path.name)


def attack_texts(captions: list[list[str]], normalise: bool) -> list[list[str]]:
    return [[normalise_caption(c) for c in group] if normalise else list(group) for group in captions]


def generated_captions(captioner: Any, data: TestSet, cfg: CaptioningConfig, perturb: Perturb | None = None,
                       desc: str = CLEAN) -> list[str]:
    """One caption per test image, batch by batch; ``perturb(index, images01, texts)`` replaces batch ``index``'s
    images by adversarial ones first (``texts``: its captions as the attacks read them)."""
    from pipeline.models.blip_captioning import Generation

    settings = Generation(num_beams=cfg.num_beams, max_length=cfg.max_length, min_length=cfg.min_length)
    texts = attack_texts(data.captions, cfg.normalise_captions)
    out: list[str] = []
    for index in tqdm(range(data.n_batches(cfg.batch_size)), desc=f"captioning {desc}", leave=False):
        images, _ = data.batch(index, cfg.batch_size)
        if perturb is not None:
            images = perturb(index, images, texts[index * cfg.batch_size:(index + 1) * cfg.batch_size])
        out += captioner.generate(images, settings)
    return out


def lm_pgd(captioner: Any, cfg: CaptioningConfig) -> Perturb:
    """White-box PGD (:class:`pipeline.attacks.PGD`) on the captioner's LM loss of each image's reference
    captions; batch i's random start seeded by :func:`batch_seed`."""
    options = {k: v for k, v in cfg.attack_options().items() if k in ("eps", "steps", "step_size")}
    attack = PGD(**options)

    def perturb(index: int, images01: torch.Tensor, texts: list[list[str]]) -> torch.Tensor:
        flat = [t for group in texts for t in group]
        owners = torch.tensor([i for i, group in enumerate(texts) for _ in group], dtype=torch.long)
        images01 = images01.to(captioner.device)
        generator = make_generator(images01.device, batch_seed(cfg.seed, index))
        return attack(images01, lambda adv: captioner.lm_loss(adv, flat, owners), generator)

    return perturb


def transfer(source: Any, mlm: Any, source_data: TestSet, attack: str, cfg: CaptioningConfig,
             target_size: int) -> Perturb:
    """``attack`` crafted on the retrieval model ``source`` as `make eval` crafts it (batch seed, masked LM, the
    batch's captions), on the same images at the source's input size, resized to ``target_size``."""
    texts = attack_texts(source_data.captions, cfg.normalise_captions)

    def perturb(index: int, images01: torch.Tensor, _texts: list[list[str]]) -> torch.Tensor:
        images, _ = source_data.batch(index, cfg.batch_size)
        attacker = build_attack(attack, **cfg.attack_options(), seed=batch_seed(cfg.seed, index))
        result = attacker(source, mlm, images, texts[index * cfg.batch_size:(index + 1) * cfg.batch_size])
        return to_target_size(result.images, target_size)

    return perturb


def scored_row(scorer: CaptionScorer, captions: list[str], seconds: float, setting: str) -> dict[str, Any]:
    scores = scorer.score(captions)
    row = {metric: scores[metric] for metric in METRICS}
    row.update(setting=setting, seconds=round(seconds, 2),
               per_image={"captions": captions, **scores["per_image"]})
    return row


def evaluate_captioning(cfg: CaptioningConfig, layout: Layout | None = None) -> dict[str, Any]:
    """Clean and attacked captioning metrics; writes and returns the JSON record."""
    from pipeline.models.blip_captioning import load_captioner, with_vision_from
    from pipeline.models.device import resolve_device
    from pipeline.models.errors import default_model
    from pipeline.models.hf import load_mlm
    from pipeline.models.loading import check_model_spec, load_model

    # 1. Resolve: names, data and every model spec before anything loads.
    layout = layout or Layout.from_env()
    device = str(resolve_device(cfg.device))
    caption_spec = caption_model_spec(cfg, layout)
    model_dir, _, mode = resolve_checkpoint(cfg.checkpoint) if cfg.checkpoint else (None, None, "pretrained")
    name = cfg.name or default_name(cfg, caption_spec, layout)
    out = captioning_path(layout, cfg.dataset, name)
    if not cfg.data:
        require_shards(layout.base_dir(cfg.dataset), cfg.split)
    transfers = list(cfg.attacks) if cfg.attack_source else []
    source_dir = resolve_checkpoint(cfg.attack_source)[0] if transfers else None
    mlm_dir = None
    if any("mlm" in ATTACKS.get(a).needs for a in transfers):
        mlm_dir = cfg.mlm or default_model(layout.model_dir(cfg.dataset, "mlm"), "masked LM", cfg.dataset, "MLM",
                                           ", or transfer image-only attacks (ATTACKS=pgd)")
    for spec in (caption_spec, model_dir, source_dir, mlm_dir):
        if spec:
            check_model_spec(spec)
    torch.manual_seed(cfg.seed)
    # 2. Models and data.
    captioner = load_captioner(caption_spec, device=device)
    captioner.prompt = cfg.prompt
    family = "blip-captioning"
    if model_dir is not None:
        with_vision_from(captioner, load_model(model_dir, device=device))
    captioner.model.eval()
    source = load_model(source_dir, device=device) if source_dir else None
    mlm = load_mlm(mlm_dir, device=device) if mlm_dir else None

    def load_data(model: Any) -> TestSet:
        if cfg.data:
            return load_test_urls(expand_urls(cfg.data), model, cfg.size, normalise=False)
        return load_test_set(layout.base_dir(cfg.dataset), cfg.split, model, cfg.size, normalise=False)

    data = load_data(captioner)
    source_data = data if source is None or source.image_size == captioner.image_size else load_data(source)
    scorer = CaptionScorer(data.captions, meteor=cfg.meteor)
    log.info("captioning %s: %d images, white-box %s, transfer %s", name, len(data.keys), cfg.white_box,
             transfers or "none")
    # 3. Clean, white-box, transfer.
    rows: dict[str, tuple[str, Perturb | None]] = {CLEAN: ("clean", None)}
    if cfg.white_box:
        rows[WHITE_BOX] = ("white-box", lm_pgd(captioner, cfg))
    for attack in transfers:
        rows[attack] = ("transfer", transfer(source, mlm, source_data, attack, cfg, captioner.image_size))
    started = time.perf_counter()
    results = {}
    for row_name, (setting, perturb) in rows.items():
        start = time.perf_counter()
        captions = generated_captions(captioner, data, cfg, perturb, row_name)
        results[row_name] = scored_row(scorer, captions, time.perf_counter() - start, setting)
    for row_name, row in results.items():
        log.info("%s %s: BLEU-4 %.1f CIDEr %.1f in %.0f s", name, row_name, row["bleu4"], row["cider"], row["seconds"])
    notes = list(scorer.notes)
    if cfg.attacks and not cfg.attack_source:
        notes.append(f"transfer attacks ({', '.join(cfg.attacks)}) not run: no ATTACK_SOURCE")
    # 4. Write.
    record = {"name": name, "mode": mode, "checkpoint": cfg.checkpoint, "vision_model_dir": model_dir,
              "caption_model": caption_spec, "family": family, "dataset": cfg.dataset, "split": cfg.split,
              "n_images": len(data.keys), "keys": data.keys,
              "references_per_image": [len(group) for group in data.captions],
              "attack_source": cfg.attack_source, "source_model_dir": source_dir,
              "source_family": getattr(source, "family", None), "mlm_dir": mlm_dir,
              "transfer_resize": None if source is None or source.image_size == captioner.image_size else
              f"adversarial images resized {source.image_size} -> {captioner.image_size} px (bicubic, antialiased)",
              "settings": dataclasses.asdict(cfg), "attack_options": cfg.attack_options(),
              "tokenizer": "PTBTokenizer (java)" if scorer.java else "pure-Python PTB equivalent",
              "metrics": results, "notes": notes, "seconds": round(time.perf_counter() - started, 2),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), PROVENANCE_KEY: provenance(device, "fp32")}
    atomic_write_json(out, record)
    log.info("wrote %s", out)
    return record
