"""The study's task axis (`STUDY_TASKS=retrieval,captioning,grounding`): every cell of the defences table, once
trained, is also evaluated on image captioning and visual grounding, as Waseda et al. report MAT on all three.

Retrieval stays the study's own task (its tables, the augmentation table and the claims above); the other two
need a BLIP (CLIP=<a BLIP model>): captioning puts the cell's vision encoder in BLIP's captioner (CAPTION_MODEL,
default MODELS_DIR/<dataset>/blip-captioning, made by `make pretrain FAMILY=blip` on synth) and transfers the
image attacks crafted on the cell's own retrieval model (SGA's cross-task protocol,
:mod:`pipeline.evaluation.captioning`); grounding runs Grad-CAM of the cell's ITM head, clean, under PGD on the
match score and under the multimodal attacks with the expression as the text (:mod:`pipeline.evaluation.grounding`).

Each task gets a table (one row per cell: the score clean and under every attack, with its bootstrap interval
over test images for captioning and over expressions for grounding, seeds resampled as for retrieval) and the
paper's two claims on it, judged as the retrieval ones are (paired intervals; :func:`pipeline.study.report.verdict`):
MAT beats the unimodal defences (TeCoA, FARE) under the multimodal attacks (Co-Attack, SGA), and MAT+ helps over
MAT. The score: CIDEr for captioning (the mean of the per-image CIDEr, which is the corpus CIDEr), accuracy
(IoU >= 0.5) for grounding.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.paths import Layout
from pipeline.evaluation.bootstrap import Bootstrap, Interval
from pipeline.evaluation.report import ATTACK_LABELS, MODE_LABELS
from pipeline.study.plan import MULTIMODAL_ATTACKS, Cell, StudyConfig, eval_name, require_blip
from pipeline.study.report import SUPPORTS, _label, claim_entry

RETRIEVAL = "retrieval"
#: task -> (score, its unit) of the tables
SCORES = {"captioning": ("CIDEr", ""), "grounding": ("accuracy", "%")}
ROW_LABELS = {"pgd-lm": "PGD on the captioner's loss (white-box)"}


def extra_tasks(cfg: StudyConfig) -> tuple[str, ...]:
    return tuple(t for t in cfg.tasks if t != RETRIEVAL)


def check_tasks(cfg: StudyConfig, clip: str, layout: Layout) -> None:
    """What the other tasks need, before any unit runs: a BLIP to fine-tune, and the captioner."""
    tasks = extra_tasks(cfg)
    if not tasks:
        return
    require_blip(cfg, clip, f"STUDY_TASKS={','.join(tasks)}")
    if "captioning" in tasks and cfg.caption_model is None:
        from pipeline.models.errors import default_model

        default_model(caption_model(cfg, layout), "BLIP captioner", cfg.dataset, "CAPTION_MODEL")


def caption_model(cfg: StudyConfig, layout: Layout) -> str:
    return cfg.caption_model or str(layout.model_dir(cfg.dataset, "blip-captioning"))


def task_unit_specs(cfg: StudyConfig, layout: Layout, cell: Cell, seed: int, checkpoint: str, model_dir: str,
                    mlm: str, split: str) -> list[dict[str, Any]]:
    """The units of the other tasks for one trained (or pretrained) cell of the defences table: name, settings
    (what the fingerprint covers), output, inputs, cost and the callable; run.py makes them Units."""
    if "defences" not in cell.tables:
        return []
    specs = []
    name = eval_name(cell, seed)
    common = dict(dataset=cfg.dataset, name=name, mlm=mlm, device=cfg.device, seed=seed, steps=cfg.eval_steps,
                  top_k=cfg.eval_top_k)
    if "captioning" in cfg.tasks:
        from pipeline.evaluation.captioning import evaluate_captioning
        from pipeline.evaluation.config import CaptioningConfig

        captioner = caption_model(cfg, layout)
        ccfg = CaptioningConfig(checkpoint=checkpoint, caption_model=captioner, split=split, size=cfg.eval_size,
                                attack_source=checkpoint, **common)
        specs.append({"name": f"captioning-{cell.id}-s{seed}", "settings": _settings(ccfg),
                      "output": task_output("captioning", layout, cfg.dataset, name),
                      "inputs": {"clip": model_dir, "caption_model": captioner, "mlm": mlm},
                      "cost": 0.02 * (cfg.eval_size or 1000) * (2 + len(ccfg.attacks)),
                      "run": functools.partial(evaluate_captioning, ccfg, layout)})
    if "grounding" in cfg.tasks:
        from pipeline.evaluation.config import GroundingConfig
        from pipeline.evaluation.grounding import evaluate_grounding

        gcfg = GroundingConfig(checkpoint=checkpoint, data=cfg.grounding_data, mode=cell.mode, size=cfg.eval_size, **common)
        specs.append({"name": f"grounding-{cell.id}-s{seed}", "settings": _settings(gcfg),
                      "output": task_output("grounding", layout, cfg.dataset, name),
                      "inputs": {"clip": model_dir, "mlm": mlm}, "cost": 0.02 * 450 * (1 + len(gcfg.attacks)),
                      "run": functools.partial(evaluate_grounding, gcfg, layout)})
    return specs


def task_output(task: str, layout: Layout, dataset: str, name: str) -> Path:
    """Where the evaluation ``name`` of ``task`` writes its JSON."""
    if task == "captioning":
        from pipeline.evaluation.captioning import captioning_path

        return captioning_path(layout, dataset, name)
    from pipeline.evaluation.grounding import grounding_path

    return grounding_path(layout, dataset, name)


def _settings(config: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(config) | {"checkpoint": None, "attack_source": None}  # the model is an input, stamped


# ------------------------------------------------------------------ the report


@dataclass(frozen=True)
class ItemScores:
    """Per-item scores of one evaluation under one attack (an image's CIDEr, an expression's 0/1 hit), in the
    shape the study's bootstrap resamples (it counts items as images)."""

    values: np.ndarray

    @property
    def n_images(self) -> int:
        return len(self.values)


def load_task_scores(task: str, path: Path) -> dict[str, ItemScores]:
    """attack -> per-item scores of a captioning (per-image CIDEr) or grounding (per-expression hit, %) JSON."""
    record = json.loads(path.read_text())
    if task == "captioning":
        return {row: ItemScores(np.asarray(m["per_image"]["cider"], dtype=np.float64)) for row, m in record["metrics"].items()}
    return {attack: ItemScores(100.0 * np.asarray(m["correct"], dtype=np.float64)) for attack, m in record["metrics"].items()}


def _mean(rows: tuple[str, ...]):
    return lambda scores, w: np.mean([(w @ scores[r].values) / w.sum(axis=1) for r in rows], axis=0)


def task_section(task: str, cells: list[Cell], scores: dict[str, dict[int, dict[str, ItemScores]]],
                 resamples: int, level: float) -> tuple[str, dict[str, Any]]:
    """One task's Markdown (table and claims) and its report.json part; ``scores``: cell -> seed -> attack ->
    ItemScores."""
    n_items = {s.n_images for seeds in scores.values() for rows in seeds.values() for s in rows.values()}
    if len(n_items) != 1:
        raise ValueError(f"{task}: cells were evaluated on different test sets: {sorted(n_items)} items")
    boot = Bootstrap(n_items.pop(), resamples, seed=0, level=level)
    seeds = {cell: [rows[s] for s in sorted(rows)] for cell, rows in scores.items()}
    reps: dict[tuple[str, str], np.ndarray] = {}

    def value(cell: str, key: str, stat) -> tuple[float, np.ndarray]:
        if (cell, key) not in reps:
            reps[(cell, key)] = boot.replicates(seeds[cell], stat, cell)
        return boot.point(seeds[cell], stat), reps[(cell, key)]

    shown = [c for c in cells if c.id in scores]
    attacks = list(dict.fromkeys(a for c in shown for rows in scores[c.id].values() for a in rows))
    metric, unit = SCORES[task]
    rows = []
    for cell in shown:
        row = {"cell": cell.id, "label": _label(cell), "mode": cell.mode, "seeds": len(seeds[cell.id])}
        for attack in attacks:
            point, rep = value(cell.id, attack, _mean((attack,)))
            row[attack] = boot.interval(point, rep).as_dict()
        rows.append(row)
    robust = tuple(a for a in MULTIMODAL_ATTACKS if a in attacks)
    claims = []
    defences = {c.mode: c.id for c in shown}

    def difference(a: str, b: str) -> Interval:
        pa, ra = value(a, "robust", _mean(robust))
        pb, rb = value(b, "robust", _mean(robust))
        return boot.interval(pa - pb, ra - rb)

    def add(claim: str, comparisons: dict[str, Interval], missing: str) -> None:
        claims.append(claim_entry(claim, comparisons, missing=missing))

    unimodal = [m for m in ("tecoa", "fare") if m in defences]
    ok = "mat" in defences and unimodal and robust
    add(f"{task}: MAT beats unimodal defences under multimodal attacks",
        {f"MAT - {MODE_LABELS[m]}": difference(defences["mat"], defences[m]) for m in unimodal} if ok else {},
        "" if ok else "needs MAT, TeCoA or FARE, and a multimodal attack")
    ok = "mat" in defences and "matplus" in defences and robust
    add(f"{task}: one-to-many augmentation (MAT+) helps over MAT",
        {"MAT+ - MAT": difference(defences["matplus"], defences["mat"])} if ok else {},
        "" if ok else "needs MAT, MAT+ and a multimodal attack")
    head = ["model", *[ROW_LABELS.get(a, ATTACK_LABELS.get(a, a)) for a in attacks]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(attacks)]
    for row in rows:
        lines.append("| " + " | ".join([row["label"], *(f"{row[a]['point']:.1f} [{row[a]['low']:.1f}, {row[a]['high']:.1f}]"
                                                          for a in attacks)]) + " |")
    over = "test images" if task == "captioning" else "referring expressions"
    markdown = (f"## {task.capitalize()}\n\n{metric}{' (' + unit + ')' if unit else ''} of each defence clean and under "
                f"each attack, {level:.0%} intervals over {over} ({boot.n_images})"
                + (": the transferred rows are crafted on the cell's own retrieval model" if task == "captioning" else "")
                + ".\n\n" + "\n".join(lines) + "\n\n"
                + "\n".join(f"- **{c['verdict']}**: {c['claim']}. {c['why']}." for c in claims))
    return markdown, {"metric": metric, "n_items": boot.n_images, "rows": rows, "claims": claims,
                      "robust_attacks": list(robust), "supported": [c["claim"] for c in claims if c["verdict"] == SUPPORTS]}
