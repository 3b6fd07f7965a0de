"""`make eval`: image-text retrieval on the test split, clean and under the attacks, one JSON per evaluation.

Protocol (the one of the Co-Attack and SGA evaluation code on CLIP):

1. the test split is read whole (or its first ``size`` images): every image with *all* its captions;
2. clean: embed every image and caption, one similarity matrix images x captions; text retrieval (TR, image ->
   captions; a hit when any of the image's captions is in the top K) and image retrieval (IR, caption -> image),
   R@1/5/10 over the full matrix;
3. each attack runs white-box against the evaluated model, batch by batch: a batch of images is attacked together
   with its own captions (``run_attack`` from :mod:`pipeline.attacks`), and every adversarial image and caption
   replaces its clean one. TR and IR are then computed on the matrix *adversarial images x adversarial captions*
   (an image-only attack leaves the captions clean, a text-only one the images), as the reference code does;
4. attack success rate (ASR): the share of queries right at R@1 on clean data that the attack makes wrong
   (TR over images, IR over captions).

Output: ``MANIFESTS_DIR/<dataset>/evals/<name>.json`` with mode, checkpoint, settings and metrics per attack
(each row with ``per_query``: every image's TR rank and every caption's IR rank, capped at 10 = a miss at every
K), and ``captions_per_image``: what ``make study`` bootstraps.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from pipeline.models import PRECISIONS, CLIPBundle, MLMBundle, autocast, load_clip, load_mlm, resolve_device
from pipeline.paths import Layout
from pipeline.retrieval import attack_success_rate, recall_at_k
from pipeline.shards import atomic_write_json, list_shards, read_tar

log = logging.getLogger(__name__)

CLEAN = "clean"
DEFAULT_ATTACKS = ("pgd", "bert", "coattack", "sga")
KS = (1, 5, 10)


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation. ``checkpoint``: a training run dir (its ``clip/``), or any CLIP dir / hub id."""

    checkpoint: str
    dataset: str = "synth"
    mlm: str | None = None  # masked LM of the text attacks; default MODELS_DIR/<dataset>/mlm
    name: str | None = None  # output file name; default the run dir / model dir name
    mode: str | None = None  # row label; default the run's training mode, "pretrained" for a bare CLIP dir
    split: str = "test"
    size: int | None = None  # first N test images (None: all)
    batch_size: int = 64  # images attacked together (with all their captions)
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    # Overrides of every attack's defaults (None keeps the published defaults of each attack):
    eps: float | None = None
    steps: int | None = None
    step_size: float | None = None
    top_k: int | None = None
    n_words: int | None = None
    mlm_threshold: float | None = None
    precision: str = "fp32"  # the reference evaluations run fp32; "auto" / "bf16" trade fidelity for speed
    device: str = "auto"
    seed: int = 0

    def attack_options(self) -> dict[str, Any]:
        options = {"eps": self.eps, "steps": self.steps, "step_size": self.step_size, "top_k": self.top_k,
                   "n_words": self.n_words, "mlm_threshold": self.mlm_threshold}
        return {k: v for k, v in options.items() if v is not None}


def check_eval(cfg: EvalConfig) -> None:
    """Raise ValueError naming the first bad value."""
    from pipeline.attacks import ATTACKS

    unknown = [a for a in cfg.attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"attacks={unknown}: unknown; valid: {sorted(ATTACKS)}")
    if cfg.size is not None and cfg.size < 2:
        raise ValueError(f"size={cfg.size}: need at least 2 test images")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size={cfg.batch_size}: must be >= 1")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision={cfg.precision!r}: choose one of {PRECISIONS}")
    if cfg.eps is not None and not 0 <= cfg.eps <= 1:
        raise ValueError(f"eps={cfg.eps}: must be in [0, 1] (pixels in [0, 1]; 2/255 = {2 / 255:.5f})")


@dataclass
class TestSet:
    """Test images (uint8 [N, 3, S, S], exact: preprocessing yields k/255 values) and their captions per image."""

    keys: list[str]
    images_u8: torch.Tensor
    captions: list[list[str]]
    txt2img: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.txt2img = torch.tensor([i for i, group in enumerate(self.captions) for _ in group], dtype=torch.long)

    @property
    def images(self) -> torch.Tensor:
        """All images as float [0, 1] pixels."""
        return self.images_u8.float().div_(255.0)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, list[list[str]]]]:
        """(float [0, 1] pixels, captions per image) of consecutive images."""
        for start in range(0, len(self.keys), batch_size):
            yield self.images_u8[start:start + batch_size].float().div_(255.0), self.captions[start:start + batch_size]


def load_test_set(base_dir: Path, split: str, clip: CLIPBundle, size: int | None = None) -> TestSet:
    """The split's images (preprocessed to the model's size) with all their captions, in shard order."""
    shards = list_shards(base_dir, split)
    if not shards:
        raise FileNotFoundError(f"no {split}-*.tar shards in {base_dir}: run `make ingest` first")
    keys, images, captions = [], [], []
    for shard in shards:
        for sample in read_tar(shard):
            meta = json.loads(sample["json"])
            if not meta.get("captions"):
                continue
            keys.append(sample["__key__"])
            images.append(Image.open(io.BytesIO(sample["jpg"])))
            captions.append(list(meta["captions"]))
            if size is not None and len(keys) >= size:
                break
        if size is not None and len(keys) >= size:
            break
    return TestSet(keys, clip.preprocess(images).mul_(255.0).round_().to(torch.uint8), captions)


def resolve_checkpoint(checkpoint: str) -> tuple[str, str, str]:
    """(CLIP dir or id, default name, default mode) of a run dir, a CLIP dir or a hub id."""
    path = Path(checkpoint)
    if (path / "clip").is_dir():  # a training run
        config = path / "config.json"
        mode = json.loads(config.read_text()).get("mode", path.name) if config.is_file() else path.name
        return str(path / "clip"), path.name, mode
    name = path.parent.name if path.name == "clip" else path.name
    return str(checkpoint), name or "model", "pretrained"


@torch.no_grad()
def embed(clip: CLIPBundle, images: torch.Tensor, texts: list[str], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised float embeddings of images [N, D] and texts [M, D], in chunks."""
    dim = clip.model.config.projection_dim
    img = [clip.encode_images(images[s:s + batch_size].to(clip.device)).float().cpu()
           for s in range(0, len(images), batch_size)]
    step = 4 * batch_size
    txt = [clip.encode_texts(texts[s:s + step]).float().cpu() for s in range(0, len(texts), step)]
    return torch.cat(img) if img else torch.empty(0, dim), torch.cat(txt) if txt else torch.empty(0, dim)


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, txt2img: torch.Tensor) -> dict[str, Any]:
    """TR / IR R@K (percent) and the per-query R@1 hits (kept to compute ASR) on the full similarity matrix."""
    sim = image_emb @ text_emb.T
    return recall_at_k(sim, txt2img, KS)


def attacked_embeddings(clip: CLIPBundle, mlm: MLMBundle | None, data: TestSet, attack: str,
                        cfg: EvalConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of every adversarial image and caption, each batch attacked with its own captions."""
    from pipeline.attacks import build_attack

    attacker = build_attack(attack, **cfg.attack_options())
    image_emb, text_emb = [], []
    batches = data.batches(cfg.batch_size)
    total = -(-len(data.keys) // cfg.batch_size)
    for images, captions in tqdm(batches, total=total, desc=f"eval {attack}", unit="batch", leave=False):
        with autocast(clip.device, cfg.precision):
            out = attacker(clip, mlm, images, captions)
            img, txt = embed(clip, out.images, [t for group in out.texts for t in group], cfg.batch_size)
        image_emb.append(img)
        text_emb.append(txt)
    return torch.cat(image_emb), torch.cat(text_emb)


def _row(metrics: dict[str, Any], clean: dict[str, Any] | None, seconds: float, n_images: int) -> dict[str, Any]:
    row = {k: v for k, v in metrics.items() if not k.startswith("_")}
    if clean is not None:
        row["tr_asr"] = attack_success_rate(clean["_tr_hits"], metrics["_tr_hits"])
        row["ir_asr"] = attack_success_rate(clean["_ir_hits"], metrics["_ir_hits"])
    else:
        row["tr_asr"] = row["ir_asr"] = 0.0
    row["seconds"] = round(seconds, 2)
    row["seconds_per_image"] = round(seconds / max(n_images, 1), 4)
    # Per-query ranks, capped at max(KS) (= a miss at every K): the bootstrap of `make study` resamples them.
    row["per_query"] = {side: metrics[f"_{side}"].clamp(max=max(KS)).tolist() for side in ("tr_rank", "ir_rank")}
    return row


def evaluate(cfg: EvalConfig, layout: Layout | None = None) -> dict[str, Any]:
    """Run one evaluation and write its JSON; returns the record written."""
    # 1. Validate and resolve.
    check_eval(cfg)
    layout = layout or Layout.from_env()
    device = str(resolve_device(cfg.device))
    clip_dir, default_name, default_mode = resolve_checkpoint(cfg.checkpoint)
    name, mode = cfg.name or default_name, cfg.mode or default_mode
    out = eval_path(layout, cfg.dataset, name)  # refuses a name that is not plain before any work
    torch.manual_seed(cfg.seed)
    # 2. Models and data.
    clip = load_clip(clip_dir, device=device)
    needs_mlm = any(a in {"bert", "coattack", "sga"} for a in cfg.attacks)
    mlm = load_mlm(cfg.mlm or layout.model_dir(cfg.dataset, "mlm"), device=device) if needs_mlm else None
    data = load_test_set(layout.base_dir(cfg.dataset), cfg.split, clip, cfg.size)
    texts = [t for group in data.captions for t in group]
    log.info("eval %s (%s): %d images, %d captions, attacks %s", name, mode, len(data.keys), len(texts), cfg.attacks)
    # 3. Clean retrieval.
    start = time.perf_counter()
    with autocast(device, cfg.precision):
        image_emb = torch.cat([embed(clip, images, [], cfg.batch_size)[0] for images, _ in data.batches(cfg.batch_size)])
        _, text_emb = embed(clip, torch.empty(0, 3, clip.image_size, clip.image_size), texts, cfg.batch_size)
        clean = retrieval_metrics(image_emb, text_emb, data.txt2img)
    results = {CLEAN: _row(clean, None, time.perf_counter() - start, len(data.keys))}
    # 4. Each attack.
    for attack in cfg.attacks:
        start = time.perf_counter()
        metrics = retrieval_metrics(*attacked_embeddings(clip, mlm, data, attack, cfg), data.txt2img)
        results[attack] = _row(metrics, clean, time.perf_counter() - start, len(data.keys))
        log.info("%s %s: TR@1 %.1f IR@1 %.1f (ASR %.1f / %.1f) in %.0f s", name, attack, results[attack]["tr_r1"],
                 results[attack]["ir_r1"], results[attack]["tr_asr"], results[attack]["ir_asr"],
                 results[attack]["seconds"])
    # 5. Write.
    record = {"name": name, "mode": mode, "checkpoint": str(cfg.checkpoint), "model_dir": clip_dir,
              "dataset": cfg.dataset, "split": cfg.split, "n_images": len(data.keys), "n_texts": len(texts),
              "captions_per_image": [len(group) for group in data.captions],
              "settings": dataclasses.asdict(cfg), "attack_options": cfg.attack_options(), "metrics": results,
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_json(out, record)
    log.info("wrote %s", out)
    return record


def eval_path(layout: Layout, dataset: str, name: str) -> Path:
    return layout.named_output(dataset, "evals", name)
