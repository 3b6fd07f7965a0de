"""`make eval-grounding`: weakly supervised visual grounding, clean and under attack, as ALBEF evaluates it.

Protocol (salesforce/ALBEF ``Grounding.py`` ``val`` with ``--gradcam_mode itm --block_num 8``, and
``grounding_eval`` in ``dataset/utils.py``), on a BLIP retrieval model, whose text encoder has the same ITM
cross-attention to the image patches that ALBEF grounds with:

1. the image is resized to the model's square input (bicubic, no crop: ALBEF's test transform) and the
   expression normalised as ALBEF reads it (``pre_caption``, 30 words);
2. Grad-CAM: the ITM head's match logit, its gradient with respect to the cross-attention probabilities of one
   text-encoder layer (``layer``; default two thirds deep, ALBEF's block 8 of 12); the map is attention times
   gradient clamped at 0, averaged over heads and over the expression's tokens (its attention mask), the image
   CLS column dropped, reshaped to the patch grid;
3. the map is upsampled to the original image (bicubic), each candidate box [x, y, w, h] scores the sum of the
   map inside it divided by its area ** 0.5 (ALBEF's ``alpha=0.5``), the top box is the prediction (ties: the
   first candidate in the data's order), right when its IoU with the referred object's box is >= 0.5;
4. accuracy per split (val, testA, testB) and over all, and every expression's correctness (``correct``, aligned
   with ``expressions``: what ``make study`` bootstraps).

Attacks (white-box, on the evaluated model; each expression attacks its own copy of its image, as in Co-Attack's
``GroundingEval.py``, whose dataset yields one (image, expression) pair per item): ``pgd``, PGD on the image
lowering the ITM match logit of the expression (eps 2/255, 10 steps of eps / 4 by default); ``coattack`` and
``sga`` (pipeline/attacks, the expression as the only caption of its image; their losses use the contrastive
embeddings, Co-Attack's ``run_before_fusion`` setting), with the masked LM of MODELS_DIR/<dataset>/mlm. The
Grad-CAM of step 2 then runs on the adversarial image and expression.

Differences from the references: BLIP instead of ALBEF (BLIP's text encoder cross-attends in every layer, ALBEF's
in its last six, so the same index is not the same depth; "two thirds deep" keeps ALBEF's depth); the token
average divides by the expression's own length, not the batch's padded length (a per-expression factor: the
ranking of boxes is the same); IoU on continuous coordinates (ALBEF's ``computeIoU`` counts inclusive pixels and
a one-pixel overlap as none); ALBEF keeps the first box scoring above 0 and has no prediction when none does,
ours takes the first of the highest. No resume: a run is one pass (Grad-CAM is one forward and backward per
expression).

Output: ``MANIFESTS_DIR/<dataset>/evals/grounding/<name>.json`` (a subfolder: ``make report`` reads only
retrieval evaluations).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.attacks import build_attack
from pipeline.attacks.base import eval_mode, make_generator
from pipeline.core.fileio import atomic_write_json
from pipeline.core.images import decode_rgb
from pipeline.core.paths import Layout, as_plain_name
from pipeline.core.provenance import PROVENANCE_KEY, provenance
from pipeline.core.seeding import derive_seed
from pipeline.data.grounding import SPLITS, Box, GroundingItem, first_per_split, read_refcoco_json, synth_grounding
from pipeline.evaluation.config import GroundingConfig

log = logging.getLogger(__name__)

CLEAN = "clean"
GROUNDING_DIR = "grounding"
IOU_RIGHT = 0.5  # ALBEF: IoU_det >= 0.5
AREA_POWER = 0.5  # ALBEF: grounding_eval(..., alpha=0.5): score = sum / area ** alpha
ALBEF_DEPTH = 8 / 12  # ALBEF's --block_num 8 of its 12 text-encoder layers


# ------------------------------------------------------------------------------------------ boxes and maps


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two [x, y, w, h] boxes (continuous coordinates)."""
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(width, 0.0) * max(height, 0.0)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def box_scores(heatmap: torch.Tensor, boxes: tuple[Box, ...]) -> torch.Tensor:
    """[K] scores of the candidates on a map at the image's size [H, W]: ALBEF's ``grounding_eval``,
    ``mask[int(y):int(y + h), int(x):int(x + w)].sum() / (w * h) ** 0.5``."""
    return torch.stack([heatmap[int(y):int(y + h), int(x):int(x + w)].sum() / (w * h) ** AREA_POWER
                        for x, y, w, h in boxes])


def predicted_box(heatmap: torch.Tensor, boxes: tuple[Box, ...]) -> int:
    """The index of the top-scoring candidate; ties go to the first (torch.argmax returns the first maximum)."""
    return int(torch.argmax(box_scores(heatmap.float(), boxes)))


def is_right(heatmap: torch.Tensor, item: GroundingItem) -> bool:
    """The top candidate on ``heatmap`` (at the image's size) covers the referred box with IoU >= 0.5."""
    return box_iou(item.boxes[predicted_box(heatmap, item.boxes)], item.referred_box) >= IOU_RIGHT


def upsample(cam: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A patch-grid map [g, g] at the image's size [height, width] (bicubic, as ALBEF)."""
    return F.interpolate(cam[None, None].float(), size=(height, width), mode="bicubic").squeeze(0).squeeze(0)


# --------------------------------------------------------------------------------------------------- Grad-CAM


def check_groundable(model: Any, checkpoint: str) -> None:
    """ValueError unless the model is a BLIP with its ITM head (what Grad-CAM differentiates)."""
    family = getattr(model, "family", type(model).__name__)
    if family != "blip":
        raise ValueError(f"CKPT={checkpoint}: grounding needs a BLIP model with an ITM head (Grad-CAM of its "
                         f"cross-attention); this is a {family} model")
    if not model.has_itm:
        raise ValueError(f"CKPT={checkpoint}: this BLIP checkpoint has no itm_head weights, which grounding needs")


def cam_layer(model: Any, layer: int | None) -> int:
    """The text-encoder layer Grad-CAM reads: ``layer``, or the one two thirds deep (8 of 12, ALBEF's)."""
    count = model.model.config.text_config.num_hidden_layers
    chosen = min(round(count * ALBEF_DEPTH), count - 1) if layer is None else layer
    if not 0 <= chosen < count:
        raise ValueError(f"layer={layer}: the text encoder has layers 0 to {count - 1}")
    return chosen


def gradcam(model: Any, pixels01: torch.Tensor, texts: list[str], layer: int) -> torch.Tensor:
    """[B, g, g] Grad-CAM maps of aligned (image, expression) pairs on the patch grid.

    The cross-attention probabilities come from transformers' own ``output_attentions=True`` (its
    ``cross_attentions``, one per layer, are the very tensors the layer multiplies with the values), and the
    gradient from ``torch.autograd.grad`` with respect to that tensor: no hooks on private modules, no
    ``.grad`` left on the parameters."""
    net = model.model
    tokens = model.tokenize(texts)
    with torch.enable_grad():
        image_tokens = model.image_tokens(pixels01)
        image_mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=image_tokens.device)
        out = net.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                               encoder_hidden_states=image_tokens, encoder_attention_mask=image_mask,
                               output_attentions=True)
        attention = out.cross_attentions[layer]  # [B, heads, text tokens, 1 + patches]
        match = net.itm_head(out.last_hidden_state[:, 0, :])[:, 1]
        # Each pair's logit depends on its own row only: the sum's gradient is every pair's own (ALBEF's loss).
        (grad,) = torch.autograd.grad(match.sum(), attention)
    cam = (attention.detach() * grad.clamp(min=0))[..., 1:].mean(1)  # [B, text tokens, patches]
    mask = tokens["attention_mask"].to(cam.dtype).unsqueeze(-1)
    cam = (cam * mask).sum(1) / mask.sum(1)
    grid = int(round(cam.shape[-1] ** 0.5))
    if grid * grid != cam.shape[-1]:
        raise ValueError(f"{cam.shape[-1]} image patches do not form a square grid")
    return cam.view(len(cam), grid, grid)


# ---------------------------------------------------------------------------------------------------- attacks


def itm_pgd(model: Any, pixels01: torch.Tensor, texts: list[str], options: dict[str, Any],
            seed: int) -> torch.Tensor:
    """PGD lowering each expression's ITM match logit; budget and steps as the retrieval PGD's (``options``)."""
    pgd = build_attack("pgd", **options).image
    tokens = model.tokenize(texts)
    with eval_mode(model.model):
        return pgd(pixels01, lambda x: -model.itm_logits(model.image_tokens(x), tokens)[:, 1].sum(),
                   make_generator(pixels01.device, seed))


def attacked(name: str, model: Any, mlm: Any, pixels01: torch.Tensor, texts: list[str], cfg: GroundingConfig,
             seed: int) -> tuple[torch.Tensor, list[str]]:
    """(adversarial images, adversarial expressions) of one batch under attack ``name``."""
    if name == CLEAN:
        return pixels01, texts
    if name == "pgd":
        return itm_pgd(model, pixels01, texts, cfg.attack_options(), seed), texts
    out = build_attack(name, **cfg.attack_options(), seed=seed)(model, mlm, pixels01, [[t] for t in texts])
    return out.images, [group[0] for group in out.texts]


# -------------------------------------------------------------------------------------------------------- run


def load_batch(items: list[GroundingItem], size: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """[B, 3, size, size] pixels in [0, 1] (whole image, bicubic resize, no crop) and each image's (H, W)."""
    pixels, shapes = [], []
    for item in items:
        image = decode_rgb(item.image.read())
        shapes.append((image.height, image.width))
        resized = np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        pixels.append(torch.from_numpy(resized).permute(2, 0, 1))
    return torch.stack(pixels), shapes


def grounding_rows(model: Any, mlm: Any, items: list[GroundingItem], cfg: GroundingConfig) -> dict[str, Any]:
    """{attack: {accuracy per split and "all", correct (per expression), seconds}} for clean and each attack."""
    from pipeline.evaluation.evaluate import normalise_caption

    model.model.eval()
    layer = cam_layer(model, cfg.layer)
    texts = [normalise_caption(item.expression) for item in items]
    rows: dict[str, Any] = {}
    for name in (CLEAN, *cfg.attacks):
        start, correct = time.perf_counter(), []
        for index, first in enumerate(range(0, len(items), cfg.batch_size)):
            batch = items[first:first + cfg.batch_size]
            pixels, shapes = load_batch(batch, model.image_size)
            pixels, batch_texts = attacked(name, model, mlm, pixels.to(model.device), texts[first:first + len(batch)],
                                           cfg, derive_seed("grounding-batch", cfg.seed, index))
            cams = gradcam(model, pixels, batch_texts, layer).cpu()
            correct += [is_right(upsample(cam, *shape), item) for cam, shape, item in zip(cams, shapes, batch)]
        rows[name] = {"accuracy": split_accuracy(items, correct), "correct": [int(c) for c in correct],
                      "seconds": round(time.perf_counter() - start, 2)}
        if name != CLEAN:
            rows[name]["setting"] = "white-box"
        log.info("grounding %s: %s", name, ", ".join(f"{k} {v:.1f}%" for k, v in rows[name]["accuracy"].items()))
    return rows


def split_accuracy(items: list[GroundingItem], correct: list[bool]) -> dict[str, float]:
    """Percent right per split present (val, testA, testB order) and over all expressions."""
    out = {}
    for split in [s for s in SPLITS if any(i.split == s for i in items)]:
        hits = [c for c, item in zip(correct, items) if item.split == split]
        out[split] = 100.0 * sum(hits) / len(hits)
    out["all"] = 100.0 * sum(correct) / len(correct)
    return out


def grounding_path(layout: Layout, dataset: str, name: str) -> Path:
    evals = layout.named_output(dataset, "evals", name)  # checks the name
    return evals.parent / GROUNDING_DIR / evals.name


def load_items(cfg: GroundingConfig) -> tuple[list[GroundingItem], str]:
    """The expressions (first ``size`` of each split) and where they came from."""
    if cfg.data is None:
        items, source = synth_grounding(cfg.synth_images, cfg.synth_seed), "synth"
    else:
        items, source = read_refcoco_json(cfg.data), str(cfg.data)
    items = first_per_split(items, cfg.size)
    if not items:
        raise ValueError(f"{source}: no val / testA / testB expressions to ground")
    return items, source


def evaluate_grounding(cfg: GroundingConfig, layout: Layout | None = None) -> dict[str, Any]:
    """Clean and attacked grounding accuracy; writes and returns the JSON record."""
    from pipeline.evaluation.evaluate import resolve_checkpoint
    from pipeline.models.device import resolve_device
    from pipeline.models.errors import default_model
    from pipeline.models.hf import load_mlm
    from pipeline.models.loading import load_model

    cfg.check_runnable()
    layout = layout or Layout.from_env()
    device = str(resolve_device(cfg.device))
    model_dir, model_name, default_mode = resolve_checkpoint(cfg.checkpoint)
    name = cfg.name or (model_name if cfg.data is None else as_plain_name(f"{model_name}-{Path(cfg.data).name}"))
    out = grounding_path(layout, cfg.dataset, name)  # refuses a name that is not plain before any work
    items, source = load_items(cfg)
    mlm_dir = None
    if any(a != "pgd" for a in cfg.attacks):
        mlm_dir = cfg.mlm or default_model(layout.model_dir(cfg.dataset, "mlm"), "masked LM", cfg.dataset, "MLM",
                                           ", or evaluate with ATTACKS=pgd")
    torch.manual_seed(cfg.seed)
    model = load_model(model_dir, device=device)
    check_groundable(model, cfg.checkpoint)
    mlm = load_mlm(mlm_dir, device=device) if mlm_dir else None
    return run_grounding(model, mlm, items, cfg, out, extra={
        "name": name, "mode": cfg.mode or default_mode, "checkpoint": cfg.checkpoint, "model_dir": model_dir,
        "mlm_dir": mlm_dir, "dataset": cfg.dataset, "data": source})


def run_grounding(model: Any, mlm: Any, items: list[GroundingItem], cfg: GroundingConfig, out: Path | None = None,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The measurements on ``items`` with a loaded BLIP; writes the record to ``out`` when given."""
    start = time.perf_counter()
    metrics = grounding_rows(model, mlm, items, cfg)
    record = {**(extra or {}), "family": model.family, "layer": cam_layer(model, cfg.layer),
              "n_expressions": len(items), "n_images": len({i.image_id for i in items}),
              "splits": {s: sum(i.split == s for i in items) for s in SPLITS if any(i.split == s for i in items)},
              "settings": dataclasses.asdict(cfg), "attack_options": cfg.attack_options(), "metrics": metrics,
              "expressions": [{"id": i.item_id, "image_id": i.image_id, "split": i.split} for i in items],
              "seconds": round(time.perf_counter() - start, 2), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              PROVENANCE_KEY: provenance(model.device, "fp32")}
    if out is not None:
        atomic_write_json(out, json.loads(json.dumps(record)))
        log.info("wrote %s", out)
    return record
