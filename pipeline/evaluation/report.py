"""`make report`: gather the evaluations of a dataset into report.md, report.png, report.json and report.csv.

Input: every ``MANIFESTS_DIR/<dataset>/evals/*.json`` written by :func:`pipeline.evaluation.evaluate.evaluate`.
Output (same folder as the evals' parent):

- ``report.json``: a list of records, one per (evaluation, attack), with at least ``name``, ``label`` (the row's
  label in the tables and the figure), ``mode``, ``attack`` (``clean`` included), ``tr_r1``, ``tr_r5``,
  ``tr_r10``, ``ir_r1``, ``ir_r5``, ``ir_r10``, ``tr_asr``, ``ir_asr`` (ASR at R@1) and ``tr_asr_r5``,
  ``tr_asr_r10``, ``ir_asr_r5``, ``ir_asr_r10`` (SGA's ASR at R@5 / R@10; None in evaluations written before
  they existed), and ``tr_r1_low`` / ``tr_r1_high`` / ``ir_r1_low`` / ``ir_r1_high``: the 95 % bootstrap interval of
  R@1 over the test images with their captions (:mod:`pipeline.evaluation.bootstrap`; None in evaluations written
  before their per-query ranks were recorded);
- ``report.csv``: the same records, one row each, the metrics under CLIP_benchmark's column names
  (:mod:`pipeline.evaluation.columns`: ``text_retrieval_recall@1``, ``image_retrieval_recall@1``, ...);
- ``report.md``: rows = evaluations (modes / checkpoints), columns = attacks x TR/IR R@1, then the same for ASR
  at R@1, R@5 and R@10, and R@5;
- ``report.png``: grouped bars of TR and IR R@1 per attack, one bar per evaluation, with their intervals; an
  attack an evaluation did not run is marked n/a, a bar at zero is drawn as a line with its 0.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.attacks import ATTACKS
from pipeline.core.paths import Layout
from pipeline.core.fileio import atomic_write_json, atomic_write_text
from pipeline.core.figures import NA, bars, pyplot, save
from pipeline.evaluation.columns import write_csv
from pipeline.core.provenance import PROVENANCE_KEY
from pipeline.train.registry import MODES

log = logging.getLogger(__name__)

METRICS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "tr_asr", "ir_asr")
ASR_AT_K = ("tr_asr_r5", "tr_asr_r10", "ir_asr_r5", "ir_asr_r10")  # absent from evaluations written before them
INTERVALS = ("tr_r1_low", "tr_r1_high", "ir_r1_low", "ir_r1_high")  # None without per-query ranks
INTERVAL_RESAMPLES, INTERVAL_LEVEL = 1000, 0.95
#: report.csv's columns, in order (named there by pipeline.evaluation.columns).
CSV_KEYS = ("name", "label", "mode", "attack", "setting", "attack_source", "dataset", "n_images", "n_texts",
            "tr_r1", "tr_r1_low", "tr_r1_high", "tr_r5", "tr_r10", "ir_r1", "ir_r1_low", "ir_r1_high", "ir_r5", "ir_r10",
            "tr_asr", "tr_asr_r5", "tr_asr_r10", "ir_asr", "ir_asr_r5", "ir_asr_r10", "seconds", "checkpoint")
#: Row and column order: reference first, then the modes and the attacks in their registries' order.
MODE_ORDER = ("pretrained", *MODES.names())
ATTACK_ORDER = ("clean", *ATTACKS.names())
ATTACK_LABELS = {"clean": "Clean", **ATTACKS.labels()}
MODE_LABELS = {"pretrained": "pretrained", **MODES.labels()}


def _rank(order: tuple[str, ...], value: str) -> tuple[int, str]:
    return (order.index(value) if value in order else len(order), value)


def load_evals(evals_dir: Path) -> list[dict[str, Any]]:
    """Every evaluation JSON in the folder, ordered by mode (MODE_ORDER) then name."""
    evals = [json.loads(p.read_text()) for p in sorted(evals_dir.glob("*.json"))]
    return sorted(evals, key=lambda e: (_rank(MODE_ORDER, e["mode"]), e["name"]))


def r1_intervals(ev: dict[str, Any], metrics: dict[str, Any], cache: dict[int, Any]) -> dict[str, float | None]:
    """The bootstrap interval of TR and IR R@1 of one attack's results, from their per-query ranks (resampling
    the test images with their captions; :class:`pipeline.evaluation.bootstrap.Bootstrap`, one per test-set size,
    shared by every evaluation); None where the evaluation has no per-query ranks."""
    ranks, per_image = metrics.get("per_query"), ev.get("captions_per_image")
    if not ranks or not per_image:
        return dict.fromkeys(INTERVALS)
    import numpy as np

    from pipeline.evaluation.bootstrap import Bootstrap, Outcomes

    outcomes = Outcomes(np.asarray(ranks["tr_rank"]), np.asarray(ranks["ir_rank"]),
                        np.repeat(np.arange(len(per_image)), per_image))
    if outcomes.n_images not in cache:
        cache[outcomes.n_images] = Bootstrap(outcomes.n_images, INTERVAL_RESAMPLES, seed=0, level=INTERVAL_LEVEL)
    boot = cache[outcomes.n_images]
    out = {}
    for side in ("tr", "ir"):
        iv = boot.interval(metrics[f"{side}_r1"], outcomes.recall(side, 1, boot.weights))
        out[f"{side}_r1_low"], out[f"{side}_r1_high"] = iv.low, iv.high
    return out


def to_records(evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat record per (evaluation, attack): what report.json holds."""
    records, boots = [], {}
    for ev, label in zip(evals, row_labels(evals)):
        for attack in sorted(ev["metrics"], key=lambda a: _rank(ATTACK_ORDER, a)):
            m = ev["metrics"][attack]
            records.append({"name": ev["name"], "label": label, "mode": ev["mode"], "attack": attack,
                            "checkpoint": ev["checkpoint"], "dataset": ev["dataset"], "n_images": ev["n_images"],
                            "n_texts": ev["n_texts"], **{k: m[k] for k in METRICS}, **{k: m.get(k) for k in ASR_AT_K},
                            **r1_intervals(ev, m, boots), "seconds": m.get("seconds"),
                            "setting": "clean" if attack == "clean" else ev.get("attack_setting", "white-box"),
                            "attack_source": ev.get("attack_source"), PROVENANCE_KEY: ev.get(PROVENANCE_KEY)})
    return records


def row_labels(evals: list[dict[str, Any]]) -> list[str]:
    """The mode's display label (MODES' labels), followed by the evaluation's name where several evaluations
    share a mode: "MAT", "MAT+ (study-matplus-eda-s0)", "MAT+ (study-matplus-randaug-s0)"."""
    counts = Counter(e["mode"] for e in evals)
    labels = [MODE_LABELS.get(e["mode"], e["mode"]) + (f" ({e['name']})" if counts[e["mode"]] > 1 else "")
              for e in evals]
    if any(e.get("attack_setting") == "transfer" for e in evals):  # mark every row once transfer rows exist
        labels = [f"{label} (transfer from {e.get('attack_source')})" if e.get("attack_setting") == "transfer"
                  else f"{label} (white-box)" for label, e in zip(labels, evals)]
    return labels


def attacks_of(records: list[dict[str, Any]]) -> list[str]:
    return sorted({r["attack"] for r in records}, key=lambda a: _rank(ATTACK_ORDER, a))


def markdown_table(records: list[dict[str, Any]], labels: dict[str, str], metric: str = "r1") -> str:
    """Rows = evaluations, columns = attacks x (TR, IR) of ``metric`` (r1, r5, r10, asr, asr_r5 or asr_r10)."""
    attacks = [a for a in attacks_of(records) if not metric.startswith("asr") or a != "clean"]
    cell = {(r["name"], r["attack"]): r for r in records}
    names = list(dict.fromkeys(r["name"] for r in records))
    head = ["model"] + [f"{ATTACK_LABELS.get(a, a)} {side}" for a in attacks for side in ("TR", "IR")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        values = []
        for attack in attacks:
            r = cell.get((name, attack))
            values += [f"{r[f'{side}_{metric}']:.1f}" if r and r.get(f"{side}_{metric}") is not None else "–"
                       for side in ("tr", "ir")]
        lines.append("| " + " | ".join([labels[name]] + values) + " |")
    return "\n".join(lines)


def transfer_note(evals: list[dict[str, Any]]) -> str:
    """What the report says about rows whose attacks were crafted on another model."""
    transfer = [e for e in evals if e.get("attack_setting") == "transfer"]
    if not transfer:
        return ""
    resized = sorted({e["transfer_resize"] for e in transfer if e.get("transfer_resize")})
    return ("; rows marked transfer were attacked on the named source model and evaluated on theirs"
            + (f" ({'; '.join(resized)})" if resized else ""))


def render_markdown(evals: list[dict[str, Any]], records: list[dict[str, Any]]) -> str:
    labels = dict(zip((e["name"] for e in evals), row_labels(evals)))
    first = evals[0]
    settings = ", ".join(f"{k}={v}" for k, v in sorted(first.get("attack_options", {}).items())) or "published defaults"
    return "\n\n".join([
        f"# Robust retrieval on {first['dataset']} ({first['split']} split, {first['n_images']} images, "
        f"{first['n_texts']} captions)",
        "Recall@1 (%) of text retrieval (TR, image → captions) and image retrieval (IR, caption → image) on the full "
        "similarity matrix, clean and under white-box attacks against each model (adversarial images vs adversarial "
        f"captions){transfer_note(evals)}. Attack settings: {settings}.",
        markdown_table(records, labels, "r1"),
        "Attack success rate (%): share of the R@1-correct queries that the attack breaks.",
        markdown_table(records, labels, "asr"),
        "Attack success rate at R@5 and at R@10 (%), as SGA reports them: share of the queries right at R@K on clean "
        "data that the attack pushes out of the top K.",
        markdown_table(records, labels, "asr_r5"),
        markdown_table(records, labels, "asr_r10"),
        "R@5 (%):",
        markdown_table(records, labels, "r5"),
    ]) + "\n"


def report_figure(records: list[dict[str, Any]]) -> Any:
    """Grouped bars: for TR and IR, R@1 per attack, one bar per evaluation (named by its record's label), with
    its bootstrap interval where the evaluation has per-query ranks; an attack it did not run marked n/a."""
    import numpy as np
    from matplotlib.patches import Patch

    plt = pyplot()
    attacks = attacks_of(records)
    names = list(dict.fromkeys(r["name"] for r in records))
    labels = {r["name"]: r["label"] for r in records}
    cell = {(r["name"], r["attack"]): r for r in records}
    colors = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
    fig, axes = plt.subplots(1, 2, figsize=(min(24, max(12, 0.5 * len(attacks) * len(names) + 4)), 4.5), sharey=True)
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(attacks))
    for ax, side, title in zip(axes, ("tr", "ir"), ("Text retrieval (image → caption)", "Image retrieval (caption → image)")):
        for i, name in enumerate(names):
            found = [cell.get((name, a)) for a in attacks]
            bars(ax, x + (i - (len(names) - 1) / 2) * width, [r[f"{side}_r1"] if r else None for r in found], width,
                 colors[i % len(colors)], low=[r.get(f"{side}_r1_low") if r else None for r in found],
                 high=[r.get(f"{side}_r1_high") if r else None for r in found])
        ax.set_xticks(x, [ATTACK_LABELS.get(a, a) for a in attacks])
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("R@1 (%)")
    intervals = any(r.get("tr_r1_low") is not None for r in records)
    fig.suptitle("Recall@1 clean and under attack" + (f"; error bars: {INTERVAL_LEVEL:.0%} bootstrap interval over "
                                                      "test images" if intervals else "")
                 + f"; {NA}: attack not run on that model", fontsize=10)
    fig.legend(handles=[Patch(color=colors[i % len(colors)], label=labels[name]) for i, name in enumerate(names)],
               loc="lower center", ncol=min(len(names), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * ((len(names) + 3) // 4), 1, 1))
    return fig


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """report.png: :func:`report_figure`, saved through the ledger."""
    save(report_figure(records), path)


def build_report(dataset: str, layout: Layout | None = None) -> dict[str, Any]:
    """Write report.md / report.png / report.json / report.csv for a dataset; returns their paths and the Markdown."""
    layout = layout or Layout.from_env()
    root, evals_dir = layout.dataset_manifests(dataset), layout.evals_dir(dataset)
    evals = load_evals(evals_dir)
    if not evals:
        raise FileNotFoundError(f"no evaluations in {evals_dir}: run `make eval CKPT=...` first")
    records = to_records(evals)
    markdown = render_markdown(evals, records)
    paths = {"json": root / "report.json", "md": root / "report.md", "png": root / "report.png",
             "csv": root / "report.csv"}
    atomic_write_json(paths["json"], records)
    write_csv(paths["csv"], records, list(CSV_KEYS))
    atomic_write_text(paths["md"], markdown)
    plot(records, paths["png"])
    log.info("report: %s", ", ".join(str(p) for p in paths.values()))
    return {"paths": paths, "markdown": markdown, "records": records}
