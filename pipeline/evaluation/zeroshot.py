"""`make eval-zeroshot`: zero-shot classification, clean and under L-inf image attacks (TeCoA's / FARE's metric).

Protocol: each class name is put into every prompt template (``TEMPLATES`` in pipeline/evaluation/config.py), the
prompts are embedded, their L2-normalised embeddings averaged per class and normalised again (CLIP's prompt
ensembling, Radford et al. 2021); an image's logits are ``logit_scale * cos(image, class)``; accuracy = share of
images whose top logit is their class. Robust accuracy: the same on adversarial images, crafted against this
classifier (white-box):

* PGD on the cross-entropy, eps 1/255, 2/255 and 4/255 (L-inf on [0, 1] pixels), random start, signed steps of
  eps / 4, ``pgd_steps`` steps (default 100). The papers' settings: TeCoA (Mao et al., "Understanding Zero-Shot
  Adversarial Robustness for Large-Scale Models", ICLR 2023) report zero-shot robustness at eps 1/255 under
  100-step PGD (our reading of the paper); FARE (Schlarmann et al., "Robust CLIP: Unsupervised Adversarial
  Fine-Tuning of Vision Embeddings for Robust Large Vision-Language Models", ICML 2024) report eps 2/255 and
  4/255 under AutoAttack's APGD-CE and APGD-T with 100 iterations (their evaluation script,
  chs20/RobustVLM CLIP_benchmark/clip_benchmark/cli.py: ``--attack aa``, ``--iterations_adv`` default 100);
* APGD-CE and APGD-T (torchattacks' ``APGD`` / ``APGDT``, ``apgd_steps`` iterations, default 100), when
  torchattacks is installed (``make setup``; by hand: the ``zeroshot`` extra, then torchattacks with
  ``--no-deps``, see pyproject.toml); otherwise skipped and the JSON says why. Their robust
  accuracy counts an image correct only if it survives both (AutoAttack's worst case).

Data: an ImageFolder layout (one folder per class; class name = folder name with ``_`` as space, sorted), a
``datasets`` dataset saved with ``save_to_disk`` (an image column and a label column, ClassLabel names when it
has them), or synth: :func:`write_synth_imagefolder` draws single-shape test images from the synth generator and
files them by shape or by colour.

Output: ``MANIFESTS_DIR/<dataset>/evals/zeroshot/<name>.json`` (a subfolder: ``make report`` reads only retrieval
evaluations).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from pipeline.core.config import check_choice, check_positive
from pipeline.core.fileio import atomic_write_bytes, atomic_write_json
from pipeline.core.paths import Layout, as_plain_name
from pipeline.core.provenance import PROVENANCE_KEY, provenance
from pipeline.evaluation.config import SYNTH_LABELS, ZeroShotConfig

log = logging.getLogger(__name__)

#: A short prompt ensemble (from the CLIP ImageNet templates); ``templates`` replaces it.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
ZEROSHOT_DIR = "zeroshot"


@dataclass
class LabelledImages:
    images: list[Image.Image]
    labels: torch.Tensor  # [N] long
    classes: list[str]


# ---------------------------------------------------------------------------------------------------- data


def class_name(folder: str) -> str:
    return folder.replace("_", " ").strip()


def load_imagefolder(root: str | Path, size: int | None = None) -> LabelledImages:
    """Class folders under ``root`` (sorted); ValueError for a class folder without images or no folders."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise ValueError(f"{root}: an ImageFolder needs at least two class folders, found {len(folders)}")
    files: list[tuple[Path, int]] = []
    for label, folder in enumerate(folders):
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise ValueError(f"class folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
        files += [(p, label) for p in found]
    if size is not None:  # classes interleaved, so the first N images cover them all
        per_class = [[f for f in files if f[1] == label] for label in range(len(folders))]
        files = [f for row in itertools.zip_longest(*per_class) for f in row if f is not None][:size]
    images = [Image.open(p).convert("RGB") for p, _ in files]
    return LabelledImages(images, torch.tensor([label for _, label in files]), [class_name(f.name) for f in folders])


def load_saved_dataset(path: str | Path, split: str, image_column: str, label_column: str,
                       size: int | None = None) -> LabelledImages:
    """A ``datasets`` dataset written by ``save_to_disk`` (a Dataset or a DatasetDict, then ``split``)."""
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise ValueError(f"{path}: no split {split!r}; splits: {sorted(ds)}")
        ds = ds[split]
    for column in (image_column, label_column):
        if column not in ds.column_names:
            raise ValueError(f"{path}: no column {column!r}; columns: {ds.column_names}")
    if size is not None:
        ds = ds.select(range(min(size, len(ds))))
    feature = ds.features[label_column]
    labels = [int(v) for v in ds[label_column]]
    names = getattr(feature, "names", None) or [str(v) for v in range(max(labels) + 1)]
    images = [img.convert("RGB") if isinstance(img, Image.Image) else Image.open(img["path"]).convert("RGB")
              for img in ds[image_column]]
    return LabelledImages(images, torch.tensor(labels), [class_name(n) for n in names])


def write_synth_imagefolder(root: str | Path, labels: str, n_images: int = 200, seed: int = 0) -> Path:
    """An ImageFolder of synth test-split images holding exactly one shape, filed by ``labels``: "shape"
    (circle, cross, square, triangle) or "colour" (folders ``<colour>_shape``). Deterministic by ``seed``."""
    from pipeline.data.sources import SourceOptions
    from pipeline.data.sources.synth import read_synth, render

    if labels not in SYNTH_LABELS:
        raise ValueError(f"labels={labels!r}: choose one of {SYNTH_LABELS}")
    root = Path(root)
    written = 0
    for record in read_synth(SourceOptions(synth_size=100 * n_images, synth_seed=seed)):
        if written >= n_images:
            break
        shapes = getattr(record.image, "params", (None,) * 4)[3]
        if getattr(record, "split", None) != "test" or len(shapes) != 1:
            continue
        kind, colour = shapes[0][0], shapes[0][1]
        folder = root / (kind if labels == "shape" else f"{colour}_shape")
        atomic_write_bytes(folder / f"{record.image_id}.jpg", render(record.image))
        written += 1
    return root


def load_labelled(cfg: ZeroShotConfig, layout: Layout) -> tuple[LabelledImages, str]:
    if cfg.data is None:
        root = layout.synth_labelled_dir(cfg.synth_labels, cfg.synth_images, cfg.seed)
        if not root.is_dir():
            write_synth_imagefolder(root, cfg.synth_labels, cfg.synth_images, cfg.seed)
        return load_imagefolder(root, cfg.size), str(root)
    path = Path(cfg.data)
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() \
            or (path / "state.json").is_file():
        return load_saved_dataset(path, cfg.split, cfg.image_column, cfg.label_column, cfg.size), str(path)
    return load_imagefolder(path, cfg.size), str(path)


# -------------------------------------------------------------------------------------------- classifier


@torch.no_grad()
def class_embeddings(model: Any, classes: list[str], templates: tuple[str, ...]) -> torch.Tensor:
    """[C, D] L2-normalised mean of the normalised prompt embeddings of each class."""
    rows = []
    for name in classes:
        emb = model.encode_texts([t.format(name) for t in templates]).float()
        rows.append(F.normalize(F.normalize(emb, dim=-1).mean(0), dim=-1))
    return torch.stack(rows)


class ZeroShotClassifier(nn.Module):
    """[0, 1] pixels -> class logits (``logit_scale * cos``): the module the attacks differentiate."""

    def __init__(self, model: Any, weights: torch.Tensor):
        super().__init__()
        self.bundle = model
        self.net = model.model  # registered so .eval() / .training reach the towers
        self.register_buffer("weights", weights)

    def forward(self, pixels01: torch.Tensor) -> torch.Tensor:
        scale = self.bundle.logit_scale.detach().float()
        return scale * self.bundle.encode_images(pixels01).float() @ self.weights.T.to(pixels01.device)


@torch.no_grad()
def predict(classifier: nn.Module, images01: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = classifier.weights.device
    return torch.cat([classifier(images01[s:s + batch_size].to(device)).argmax(-1).cpu()
                      for s in range(0, len(images01), batch_size)])


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of predictions equal to their label."""
    if len(labels) == 0:
        raise ValueError("no images to classify")
    return 100.0 * (predictions.cpu() == labels.cpu()).float().mean().item()


def pgd_images(classifier: nn.Module, images01: torch.Tensor, labels: torch.Tensor, eps: float, steps: int,
               batch_size: int, seed: int) -> torch.Tensor:
    """Untargeted L-inf PGD on the cross-entropy, step eps / 4, random start (pipeline.attacks.PGD)."""
    from pipeline.attacks import PGD

    attack = PGD(eps=eps, steps=steps, step_ratio=0.25)
    device = classifier.weights.device
    out = []
    for index, s in enumerate(range(0, len(images01), batch_size)):
        x, y = images01[s:s + batch_size].to(device), labels[s:s + batch_size].to(device)
        generator = torch.Generator(device=device).manual_seed(seed + index)
        out.append(attack(x, lambda adv: F.cross_entropy(classifier(adv), y), generator).cpu())
    return torch.cat(out)


def apgd_correct(classifier: nn.Module, images01: torch.Tensor, labels: torch.Tensor, eps: float, steps: int,
                 n_classes: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-image correctness under torchattacks' APGD-CE and APGD-T (ImportError without torchattacks); APGD-T's
    targeted DLR loss needs 4 classes or more (None below that). Targets: the 9 classes ranked next, as
    AutoAttack runs it."""
    import torchattacks

    device = classifier.weights.device
    ce = torchattacks.APGD(classifier, norm="Linf", eps=eps, steps=steps, loss="ce", n_restarts=1, seed=seed)
    targeted = torchattacks.APGDT(classifier, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed,
                                  n_classes=n_classes)
    targeted.n_target_classes = min(9, n_classes - 1)  # AutoAttack's 9 target classes (torchattacks: all others)
    right_ce, right_t = [], []
    attacks = ((ce, right_ce), (targeted, right_t)) if n_classes >= 4 else ((ce, right_ce),)
    for s in range(0, len(images01), batch_size):
        x, y = images01[s:s + batch_size].to(device), labels[s:s + batch_size].to(device)
        for attack, right in attacks:
            adv = attack(x, y)
            with torch.no_grad():
                right.append((classifier(adv).argmax(-1) == y).cpu())
    return torch.cat(right_ce), torch.cat(right_t) if right_t else None


# ---------------------------------------------------------------------------------------------------- run


def zeroshot_path(layout: Layout, dataset: str, name: str) -> Path:
    evals = layout.named_output(dataset, "evals", name)  # checks the name
    return evals.parent / ZEROSHOT_DIR / evals.name


def evaluate_zeroshot(cfg: ZeroShotConfig, layout: Layout | None = None) -> dict[str, Any]:
    """Clean and robust zero-shot accuracy; writes and returns the JSON record."""
    from pipeline.evaluation.evaluate import resolve_checkpoint
    from pipeline.models.device import resolve_device
    from pipeline.models.loading import load_model

    cfg.check_runnable()
    layout = layout or Layout.from_env()
    device = str(resolve_device(cfg.device))
    model_dir, default_name, mode = resolve_checkpoint(cfg.checkpoint)
    name = cfg.name or as_plain_name(f"{default_name}-{cfg.synth_labels or Path(cfg.data).name}")
    out = zeroshot_path(layout, cfg.dataset, name)
    torch.manual_seed(cfg.seed)
    model = load_model(model_dir, device=device)
    data, source = load_labelled(cfg, layout)
    return run_zeroshot(model, data, cfg, out, extra={"name": name, "mode": mode, "checkpoint": cfg.checkpoint,
                                                       "model_dir": model_dir, "data": source})


def run_zeroshot(model: Any, data: LabelledImages, cfg: ZeroShotConfig, out: Path | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The measurements on ``data`` with any model of the interface (also a test's fake one)."""
    model.model.eval()
    images01 = model.preprocess(data.images)
    classifier = ZeroShotClassifier(model, class_embeddings(model, data.classes, cfg.templates).to(model.device))
    classifier.eval()
    start = time.perf_counter()
    clean = accuracy(predict(classifier, images01, cfg.batch_size), data.labels)
    results: dict[str, Any] = {"clean": {"accuracy": clean, "seconds": round(time.perf_counter() - start, 2)}}
    log.info("zero-shot clean: %.1f%% (%d images, %d classes); attacking at eps %s", clean, len(data.labels),
             len(data.classes), ", ".join(f"{e * 255:g}/255" for e in cfg.eps))
    notes = []
    try:
        import torchattacks  # noqa: F401

        apgd = cfg.apgd
    except ImportError:
        apgd = False
        if cfg.apgd:
            notes.append("APGD-CE / APGD-T skipped: torchattacks is not installed (pip install --no-deps -c "
                         "constraints.txt torchattacks, after the 'zeroshot' extra)")
    for eps in cfg.eps:
        key = f"eps{round(eps * 255, 3):g}/255"
        start = time.perf_counter()
        adv = pgd_images(classifier, images01, data.labels, eps, cfg.pgd_steps, cfg.batch_size, cfg.seed)
        row = {"eps": eps, "pgd_steps": cfg.pgd_steps,
               "pgd_accuracy": accuracy(predict(classifier, adv, cfg.batch_size), data.labels),
               "pgd_seconds": round(time.perf_counter() - start, 2)}
        if apgd:
            start = time.perf_counter()
            right_ce, right_t = apgd_correct(classifier, images01, data.labels, eps, cfg.apgd_steps,
                                             len(data.classes), cfg.batch_size, cfg.seed)
            both = right_ce if right_t is None else right_ce & right_t
            row.update(apgd_steps=cfg.apgd_steps, apgd_ce_accuracy=100.0 * right_ce.float().mean().item(),
                       apgd_t_accuracy=None if right_t is None else 100.0 * right_t.float().mean().item(),
                       apgd_accuracy=100.0 * both.float().mean().item(),
                       apgd_seconds=round(time.perf_counter() - start, 2))
            if right_t is None and not any("APGD-T" in n for n in notes):
                notes.append("APGD-T skipped: its targeted DLR loss needs at least 4 classes")
        results[key] = row
        log.info("zero-shot %s: PGD %.1f%%%s", key, row["pgd_accuracy"],
                 f", APGD-CE+T {row['apgd_accuracy']:.1f}%" if apgd else "")
    counts = torch.bincount(data.labels, minlength=len(data.classes)).tolist()
    record = {**(extra or {}), "family": getattr(model, "family", None), "classes": data.classes,
              "images_per_class": counts, "n_images": len(data.labels), "chance": 100.0 / len(data.classes),
              "templates": list(cfg.templates), "settings": dataclasses.asdict(cfg), "metrics": results,
              "notes": notes, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              PROVENANCE_KEY: provenance(model.device, "fp32")}  # no autocast here
    if out is not None:
        atomic_write_json(out, json.loads(json.dumps(record)))
        log.info("wrote %s", out)
    return record
