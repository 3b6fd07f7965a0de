"""The study's report: the defences table, the augmentation table, the augmentation-quality figure, and the
paper's claims judged from the numbers.

Every number comes from the per-query ranks of the evaluations (:class:`pipeline.evaluation.bootstrap.Outcomes`),
so the points equal the evaluation JSONs' metrics and the intervals come from the same data. Scores:

- *robust score* of a cell: the mean over the multimodal attacks (Co-Attack, SGA; every attack run when none
  of them is) of (TR R@1 + IR R@1) / 2, in percent;
- *gain* of an augmentation cell: its robust score minus MAT's (the MAT cell trained with the same steps).

A difference is *significant* when its paired-bootstrap interval (same resampled test images for both sides,
seeds resampled too when there are several) excludes zero. Claims (Waseda et al. 2024):

1. multimodal AT beats unimodal defences under multimodal attacks: MAT against each of TeCoA and FARE;
2. one-to-many augmentation helps: MAT+ (its default stages) against MAT;
3. cross-modal augmentations beat intra-modal ones: mean gain of the cross-modal stages (i2t-human, i2t-internvl,
   t2i-sd) against the intra-modal ones (eda, randaug), single-stage cells;
4. text augmentations beat image augmentations: text stages against image stages, the same way;
5. good augmentations are aligned, diverse and shift little: the Spearman correlation over single-stage cells of
   the gain with alignment (+), diversity (+) and Frechet distance (-); at least 4 stages are needed.

A claim is *supported* when every comparison it rests on is significant in its direction, *contradicted* when
one is significant against it, and *undecided* otherwise. When clean retrieval is near chance (the median
cell's clean R@1 below ``CHANCE_FACTOR`` x chance, chance = 100 / n_images % at R@1), the robustness comparison
is declared meaningless and no claim is decided: a model that does not retrieve cannot lose to an attack.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.evaluation.bootstrap import Bootstrap, Interval, Outcomes, Statistic, spearman
from pipeline.evaluation.report import ATTACK_LABELS, ATTACK_ORDER, MODE_LABELS
from pipeline.core.fileio import atomic_write_json, atomic_write_text
from pipeline.core.provenance import PROVENANCE_KEY, provenance
from pipeline.core.figures import note_missing, pyplot, save
from pipeline.evaluation.columns import write_csv
from pipeline.study.plan import MULTIMODAL_ATTACKS, STAGE_KINDS, STAGE_LABELS, Cell, StudyConfig

log = logging.getLogger(__name__)

CHANCE_FACTOR = 3.0
MIN_STAGES_FOR_CORRELATION = 4
SUPPORTS, CONTRADICTS, UNDECIDED = "supports", "contradicts", "cannot decide"


@dataclass
class CellResult:
    cell: Cell
    seeds: dict[int, dict[str, Outcomes]]  # seed -> attack ("clean" included) -> outcomes


def recall(attack: str, side: str, k: int) -> Statistic:
    return lambda outcomes, w: outcomes[attack].recall(side, k, w)


def asr(attack: str, side: str, k: int = 1) -> Statistic:
    """Attack success rate at R@K: the share of clean R@K hits that the attack turns into misses at K (SGA
    reports K = 1, 5, 10)."""
    def stat(outcomes: dict[str, Outcomes], w: np.ndarray) -> np.ndarray:
        clean, adv = outcomes["clean"], outcomes[attack]
        rank_c, rank_a = (clean.tr_rank, adv.tr_rank) if side == "tr" else (clean.ir_rank, adv.ir_rank)
        owner = np.arange(clean.n_images) if side == "tr" else clean.owner
        hit = np.bincount(owner, weights=rank_c < k, minlength=clean.n_images)
        broken = np.bincount(owner, weights=(rank_c < k) & (rank_a >= k), minlength=clean.n_images)
        return 100.0 * (w @ broken) / np.maximum(w @ hit, 1e-12)
    return stat


def mean_r1(attacks: tuple[str, ...]) -> Statistic:
    """Mean over ``attacks`` of (TR R@1 + IR R@1) / 2."""
    return lambda o, w: np.mean([(o[a].recall("tr", 1, w) + o[a].recall("ir", 1, w)) / 2 for a in attacks], axis=0)


class Study:
    """The cells' results with one shared bootstrap; every comparison the report makes."""

    def __init__(self, results: list[CellResult], resamples: int = 1000, level: float = 0.95) -> None:
        self.results = {r.cell.id: r for r in results}
        n_images = {o.n_images for r in results for seed in r.seeds.values() for o in seed.values()}
        if len(n_images) != 1:
            raise ValueError(f"cells were evaluated on different test sets: {sorted(n_images)} images")
        self.n_images = n_images.pop()
        self.boot = Bootstrap(self.n_images, resamples, seed=0, level=level)
        self.chance_r1 = 100.0 / self.n_images
        self._reps: dict[tuple[str, str], np.ndarray] = {}

    def seeds(self, cell: str) -> list[dict[str, Outcomes]]:
        return [self.results[cell].seeds[s] for s in sorted(self.results[cell].seeds)]

    def reps(self, cell: str, name: str, stat: Statistic) -> np.ndarray:
        if (cell, name) not in self._reps:
            self._reps[(cell, name)] = self.boot.replicates(self.seeds(cell), stat, cell)
        return self._reps[(cell, name)]

    def value(self, cell: str, name: str, stat: Statistic) -> Interval:
        return self.boot.interval(self.boot.point(self.seeds(cell), stat), self.reps(cell, name, stat))

    def spread(self, cell: str, stat: Statistic) -> float | None:
        """Standard deviation across seeds (None for one seed)."""
        values = [stat(o, self.boot.ones)[0] for o in self.seeds(cell)]
        return float(np.std(values, ddof=1)) if len(values) > 1 else None

    def difference(self, a: list[str], b: list[str], name: str, stat: Statistic) -> Interval:
        """Mean of the cells ``a`` minus mean of the cells ``b``, paired over the same resamples."""
        point = (np.mean([self.boot.point(self.seeds(c), stat) for c in a])
                 - np.mean([self.boot.point(self.seeds(c), stat) for c in b]))
        reps = np.mean([self.reps(c, name, stat) for c in a], axis=0) - np.mean([self.reps(c, name, stat) for c in b], axis=0)
        return self.boot.interval(point, reps)

    def clean_r1(self, cell: str) -> float:
        return self.boot.point(self.seeds(cell), mean_r1(("clean",)))


def robust_attacks(cells: list[Cell]) -> tuple[str, ...]:
    common = set.intersection(*(set(c.attacks) for c in cells)) if cells else set()
    return (tuple(a for a in MULTIMODAL_ATTACKS if a in common) or tuple(a for a in ATTACK_ORDER if a in common)
            or ("clean",))


def verdict(intervals: list[Interval], expected: int = 1) -> str:
    signs = [iv.sign for iv in intervals]
    if any(s == -expected for s in signs):
        return CONTRADICTS
    return SUPPORTS if signs and all(s == expected for s in signs) else UNDECIDED


def claim_entry(claim: str, comparisons: dict[str, Interval], expected: int = 1, missing: str = "",
                meaningless: bool = False) -> dict[str, Any]:
    """One claim of a report: its verdict from the comparisons' intervals, and why; undecided with ``missing``
    (what the study lacks to judge it) or when the comparison is ``meaningless`` (clean retrieval near chance)."""
    if missing:
        return {"claim": claim, "verdict": UNDECIDED, "why": missing, "comparisons": {}}
    found = verdict(list(comparisons.values()), expected)
    why = "; ".join(f"{k}: {_iv(v)}" + (" (significant)" if v.excludes_zero else " (within noise)")
                    for k, v in comparisons.items())
    if meaningless:
        found, why = UNDECIDED, "clean retrieval is near chance, so the robustness comparison is meaningless; " + why
    return {"claim": claim, "verdict": found, "why": why, "comparisons": {k: v.as_dict() for k, v in comparisons.items()}}


def _iv(iv: Interval, digits: int = 1) -> str:
    return f"{iv.point:+.{digits}f} [{iv.low:+.{digits}f}, {iv.high:+.{digits}f}]"


def _label(cell: Cell) -> str:
    base = MODE_LABELS.get(cell.mode, cell.mode)
    stages = "+".join(STAGE_LABELS.get(s, s) for s in cell.stages)
    return base + (f" ({stages})" if stages else "") + (f" @{cell.steps}" if "steps" in cell.id else "")


def judge_claims(study: Study, cells: list[Cell], stage_stats: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """The five claims with their verdicts and evidence; and whether clean retrieval is near chance."""
    defences = {c.mode: c.id for c in cells if "defences" in c.tables}
    aug = [c for c in cells if "augmentation" in c.tables]
    attacks = robust_attacks([c for c in cells if c.mode != "pretrained"])
    score = mean_r1(attacks)
    clean = sorted(study.clean_r1(c.id) for c in cells)
    meaningless = bool(clean) and float(np.median(clean)) < CHANCE_FACTOR * study.chance_r1
    claims: list[dict[str, Any]] = []

    def add(claim: str, comparisons: dict[str, Interval], expected: int = 1, missing: str = "") -> None:
        claims.append(claim_entry(claim, comparisons, expected, missing, meaningless))

    unimodal = [m for m in ("tecoa", "fare") if m in defences]
    add("multimodal adversarial training (MAT) beats unimodal defences under multimodal attacks",
        {f"MAT - {MODE_LABELS[m]}": study.difference([defences["mat"]], [defences[m]], "robust", score) for m in unimodal}
        if "mat" in defences and unimodal else {},
        missing="" if "mat" in defences and unimodal else "needs MAT and TeCoA or FARE in the defences table")
    has_plus = "mat" in defences and "matplus" in defences
    add("one-to-many augmentation (MAT+) helps over MAT",
        {"MAT+ - MAT": study.difference([defences["matplus"]], [defences["mat"]], "robust", score)} if has_plus else {},
        missing="" if has_plus else "needs MAT and MAT+ in the defences table")
    single = [c for c in aug if len(c.stages) == 1]
    for claim, axis, first, second in (("cross-modal augmentations beat intra-modal ones", 1, "cross", "intra"),
                                       ("text augmentations beat image augmentations", 0, "text", "image")):
        a = [c.id for c in single if STAGE_KINDS[c.stages[0]][axis] == first]
        b = [c.id for c in single if STAGE_KINDS[c.stages[0]][axis] == second]
        add(claim, {f"mean {first} - mean {second}": study.difference(a, b, "robust", score)} if a and b else {},
            missing="" if a and b else f"needs single-stage MAT+ cells of both kinds ({first}: {len(a)}, {second}: {len(b)})")
    claims.append(quality_claim(study, aug, stage_stats, score, meaningless))
    return claims, meaningless


def stage_quality(stage: str, stats: dict[str, Any]) -> dict[str, float | None]:
    modality = STAGE_KINDS.get(stage, ("", ""))[0]
    return {"alignment": stats.get("alignment_mean"), "diversity": stats.get("diversity_mean"),
            "shift": stats.get("shift_mean"), "frechet": stats.get(f"fd_{modality}")}


def quality_claim(study: Study, aug: list[Cell], stage_stats: dict[str, dict[str, Any]], score: Statistic,
                  meaningless: bool) -> dict[str, Any]:
    claim = "good augmentations are well aligned, diverse, and shift the distribution little"
    base = next((c for c in aug if c.mode == "mat"), None)
    single = [c for c in aug if len(c.stages) == 1]
    comparisons, expected_signs, missing = {}, [], ""
    for quality, expected in (("alignment", 1), ("diversity", 1), ("frechet", -1)):
        cells = [c for c in single if stage_quality(c.stages[0], stage_stats.get(c.stages[0], {}))[quality] is not None]
        if base is None or len(cells) < MIN_STAGES_FOR_CORRELATION:
            missing = (f"needs MAT and at least {MIN_STAGES_FOR_CORRELATION} scored single-stage cells "
                       f"(has {len(cells)}): with fewer points a rank correlation cannot be told from chance")
            break
        x = np.array([stage_quality(c.stages[0], stage_stats[c.stages[0]])[quality] for c in cells])
        gains = np.stack([study.reps(c.id, "robust", score) - study.reps(base.id, "robust", score) for c in cells], 1)
        points = np.array([study.boot.point(study.seeds(c.id), score) - study.boot.point(study.seeds(base.id), score)
                           for c in cells])
        rho = study.boot.interval(float(spearman(x, points[None])[0]), spearman(x, gains))
        comparisons[f"Spearman(gain, {quality})"] = rho
        expected_signs.append(expected)
    if missing:
        return {"claim": claim, "verdict": UNDECIDED, "why": missing, "comparisons": {}}
    signs = [iv.sign * expected for iv, expected in zip(comparisons.values(), expected_signs)]
    found = CONTRADICTS if -1 in signs else SUPPORTS if all(s == 1 for s in signs) else UNDECIDED
    why = "; ".join(f"{k}: {_iv(v, 2)}" for k, v in comparisons.items()) + " (expected +, +, -)"
    if meaningless:
        found, why = UNDECIDED, "clean retrieval is near chance, so the robustness comparison is meaningless; " + why
    return {"claim": claim, "verdict": found, "why": why, "comparisons": {k: v.as_dict() for k, v in comparisons.items()}}


def defences_rows(study: Study, cells: list[Cell]) -> list[dict[str, Any]]:
    """The defences table's rows, one per cell and attack (clean first): R@1 / R@5 / R@10 (mean over seeds), R@1's
    interval (``tr_r1_low`` / ``tr_r1_high``, resampling images and seeds) and spread across seeds (``tr_r1_sd``,
    None for one seed), the ASR at R@1 / R@5 / R@10 (None for clean); what report.json's ``defences`` and
    defences.csv hold and report.md shows."""
    rows = []
    for cell in (c for c in cells if "defences" in c.tables):
        seeds = study.seeds(cell.id)
        for attack in ("clean", *[a for a in ATTACK_ORDER if a in cell.attacks]):
            row: dict[str, Any] = {"cell": cell.id, "label": _label(cell), "mode": cell.mode, "stages": list(cell.stages),
                                   "steps": cell.steps, "seeds": len(seeds), "n_images": study.n_images, "attack": attack}
            for side in ("tr", "ir"):
                stat = recall(attack, side, 1)
                iv = study.value(cell.id, f"{attack}-{side}1", stat)
                row |= {f"{side}_r1": iv.point, f"{side}_r1_low": iv.low, f"{side}_r1_high": iv.high,
                        f"{side}_r1_sd": study.spread(cell.id, stat)}
                row |= {f"{side}_r{k}": study.boot.point(seeds, recall(attack, side, k)) for k in (5, 10)}
            for side in ("tr", "ir"):
                for k, key in ((1, f"{side}_asr"), (5, f"{side}_asr_r5"), (10, f"{side}_asr_r10")):
                    row[key] = study.boot.point(seeds, asr(attack, side, k)) if attack != "clean" else None
            rows.append(row)
    return rows


DEFENCES_CSV = ("cell", "label", "mode", "stages", "steps", "seeds", "n_images", "attack",
                *(f"{side}_{m}" for side in ("tr", "ir") for m in ("r1", "r1_low", "r1_high", "r1_sd", "r5", "r10")),
                *(f"{side}_{m}" for side in ("tr", "ir") for m in ("asr", "asr_r5", "asr_r10")))


def _r1(row: dict[str, Any], side: str) -> str:
    sd = row[f"{side}_r1_sd"]
    return (f"{row[f'{side}_r1']:.1f}" + (f" ± {sd:.1f}" if sd is not None else "")
            + f" [{row[f'{side}_r1_low']:.1f}, {row[f'{side}_r1_high']:.1f}]")


def defences_table(rows: list[dict[str, Any]], level: float = 0.95) -> str:
    ci = f"[{level:.0%} CI]"
    head = ["model", "attack", f"TR R@1 {ci}", "TR R@5", "TR R@10", f"IR R@1 {ci}", "IR R@5", "IR R@10",
            "TR ASR @1 / @5 / @10", "IR ASR @1 / @5 / @10"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for row in rows:
        at = [f"{row[f'{s}_r{k}']:.1f}" for s in ("tr", "ir") for k in (5, 10)]
        rates = [" / ".join(f"{row[key]:.1f}" for key in (f"{s}_asr", f"{s}_asr_r5", f"{s}_asr_r10"))
                 if row["attack"] != "clean" else "–" for s in ("tr", "ir")]
        lines.append("| " + " | ".join([row["label"], ATTACK_LABELS.get(row["attack"], row["attack"]), _r1(row, "tr"),
                                        *at[:2], _r1(row, "ir"), *at[2:], *rates]) + " |")
    return "\n".join(lines)


def augmentation_rows(study: Study, cells: list[Cell], stage_stats: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    aug = [c for c in cells if "augmentation" in c.tables]
    base = next((c for c in aug if c.mode == "mat"), None)
    score = mean_r1(robust_attacks(aug))
    rows = []
    for cell in aug:
        quality = [stage_quality(s, stage_stats.get(s, {})) for s in cell.stages]
        row = {"cell": cell.id, "label": _label(cell), "stages": list(cell.stages), "modality": cell.modality,
               "pairing": cell.pairing, "kind": "+".join(dict.fromkeys(STAGE_KINDS[s][1] for s in cell.stages)) or "–",
               **{q: quality[0][q] if len(quality) == 1 else None for q in ("alignment", "diversity", "shift", "frechet")},
               "clean_r1": study.clean_r1(cell.id), "robust": study.value(cell.id, "robust", score).as_dict(),
               "gain": None}
        if base is not None and cell.id != base.id:
            row["gain"] = study.difference([cell.id], [base.id], "robust", score).as_dict()
        rows.append(row)
    return rows


AUGMENTATION_CSV = ("cell", "label", "stages", "modality", "pairing", "kind", "alignment", "diversity", "shift",
                    "frechet", "clean_r1", "robust", "robust_low", "robust_high", "gain", "gain_low", "gain_high",
                    "robust_attacks")


def augmentation_csv_rows(rows: list[dict[str, Any]], attacks: tuple[str, ...]) -> list[dict[str, Any]]:
    """The augmentation table's rows with their intervals flattened (``robust``, ``robust_low``, ...)."""
    flat = []
    for r in rows:
        row = {k: v for k, v in r.items() if k not in ("robust", "gain")} | {"robust_attacks": list(attacks)}
        for name in ("robust", "gain"):
            iv = r[name] or {}
            row |= {name: iv.get("point"), f"{name}_low": iv.get("low"), f"{name}_high": iv.get("high")}
        flat.append(row)
    return flat


def augmentation_table(rows: list[dict[str, Any]], attacks: tuple[str, ...]) -> str:
    robust = " / ".join(ATTACK_LABELS.get(a, a) for a in attacks)
    head = ["cell", "pairing", "kind", "alignment", "diversity", "shift", "Frechet", "clean R@1",
            f"robust R@1 ({robust}) [95% CI]", "gain over MAT [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    fmt = lambda v, d: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    for r in rows:
        rb, g = r["robust"], r["gain"]
        gain = "–" if g is None else _iv(Interval(**g)) + (" *" if Interval(**g).excludes_zero else "")
        lines.append("| " + " | ".join([r["label"], r["pairing"], r["kind"], fmt(r["alignment"], 3), fmt(r["diversity"], 3),
                                        fmt(r["shift"], 2), fmt(r["frechet"], 4), f"{r['clean_r1']:.1f}",
                                        f"{rb['point']:.1f} [{rb['low']:.1f}, {rb['high']:.1f}]", gain]) + " |")
    return "\n".join(lines)


#: The figure's panels: (quality, modality of the stages it shows or "" for all, x label).
QUALITY_PANELS = (("alignment", "", "alignment (cosine image-text)"),
                  ("diversity", "", "diversity (1 - cosine to the original)"),
                  ("frechet", "image", "Frechet distance of image features"),
                  ("frechet", "text", "Frechet distance of text features"))
MODALITY_MARKERS = {"text": "o", "image": "s"}


def quality_figure(rows: list[dict[str, Any]], attacks: tuple[str, ...] = (), level: float = 0.95) -> Any:
    """Gain over MAT against each quality, one point per single-stage cell with its interval, in one colour per
    stage across the panels (a circle for a text stage, a square for an image stage); the Frechet distances of
    image and text stages in panels of their own (different features, different scales); a panel names the
    stages it has no value for (n/a)."""
    from matplotlib.lines import Line2D

    plt = pyplot()
    points = [r for r in rows if len(r["stages"]) == 1 and r["gain"] is not None]
    colors = plt.get_cmap("tab10").colors
    style = {r["cell"]: (colors[i % len(colors)], MODALITY_MARKERS.get(STAGE_KINDS.get(r["stages"][0], ("",))[0], "D"))
             for i, r in enumerate(points)}
    fig, axes = plt.subplots(1, len(QUALITY_PANELS), figsize=(4 * len(QUALITY_PANELS), 4.3), sharey=True)
    for ax, (quality, modality, label) in zip(axes, QUALITY_PANELS):
        shown = [r for r in points if not modality or STAGE_KINDS.get(r["stages"][0], ("",))[0] == modality]
        for r in (p for p in shown if p[quality] is not None):
            g = r["gain"]
            color, marker = style[r["cell"]]
            ax.errorbar(r[quality], g["point"], yerr=[[g["point"] - g["low"]], [g["high"] - g["point"]]], fmt=marker,
                        color=color, capsize=3)
            ax.annotate(STAGE_LABELS.get(r["stages"][0], r["stages"][0]), (r[quality], g["point"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        note_missing(ax, [STAGE_LABELS.get(r["stages"][0], r["stages"][0]) for r in shown if r[quality] is None])
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set(xlabel=label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"robust R@1 gain over MAT (points, {level:.0%} CI)")
    robust = " / ".join(ATTACK_LABELS.get(a, a) for a in attacks)
    fig.suptitle("Augmentation quality and robustness: one point per MAT+ stage; 0 = MAT"
                 + (f"; robust R@1 = mean over {robust} of (TR R@1 + IR R@1) / 2" if robust else ""), fontsize=10)
    handles = [Line2D([], [], color=style[r["cell"]][0], marker=style[r["cell"]][1], linestyle="none",
                      label=f"{STAGE_LABELS.get(r['stages'][0], r['stages'][0])} ({r['pairing']})") for r in points]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def plot_quality(rows: list[dict[str, Any]], path: Path, attacks: tuple[str, ...] = (), level: float = 0.95) -> bool:
    """augmentation_quality.png (:func:`quality_figure`); False, and nothing written, without a single-stage cell
    that has a gain."""
    if not any(len(r["stages"]) == 1 and r["gain"] is not None for r in rows):
        return False
    save(quality_figure(rows, attacks, level), path)
    return True


def records(study: Study, cells: list[Cell]) -> list[dict[str, Any]]:
    """report.json: one record per cell and seed, every metric per attack (points of that seed alone)."""
    out = []
    for cell in cells:
        for seed, outcomes in sorted(study.results[cell.id].seeds.items()):
            ones = study.boot.ones
            metrics = {a: {f"{s}_r{k}": float(o.recall(s, k, ones)[0]) for s in ("tr", "ir") for k in (1, 5, 10)}
                       | ({f"{s}_asr": float(asr(a, s)(outcomes, ones)[0]) for s in ("tr", "ir")} if a != "clean" else {})
                       | ({f"{s}_asr_r{k}": float(asr(a, s, k)(outcomes, ones)[0]) for s in ("tr", "ir") for k in (5, 10)}
                          if a != "clean" else {})
                       for a, o in outcomes.items()}
            out.append({"cell": cell.id, "mode": cell.mode, "stages": list(cell.stages), "pairing": cell.pairing,
                        "steps": cell.steps, "tables": list(cell.tables), "seed": seed, "n_images": study.n_images,
                        "metrics": metrics})
    return out


def build_study_report(results: list[CellResult], stage_stats: dict[str, dict[str, Any]], cfg: StudyConfig,
                       out_dir: Path, tasks: list[tuple[str, str, dict[str, Any]]] = ()) -> dict[str, Any]:
    """Write report.md, report.json, defences.csv, augmentation.csv (when the study has that table) and
    augmentation_quality.png to ``out_dir``; return what was written. ``tasks``: the other tasks' sections
    (task, Markdown, report.json part; :mod:`pipeline.study.tasks`), after the retrieval tables."""
    study = Study(results, cfg.resamples, cfg.level)
    cells = [r.cell for r in results]
    claims, meaningless = judge_claims(study, cells, stage_stats)
    defences = defences_rows(study, cells)
    aug_rows = augmentation_rows(study, cells, stage_stats)
    aug_attacks = robust_attacks([c for c in cells if "augmentation" in c.tables])
    out_dir.mkdir(parents=True, exist_ok=True)
    figure = out_dir / "augmentation_quality.png"
    has_figure = plot_quality(aug_rows, figure, aug_attacks, cfg.level)
    seeds = f"{cfg.seeds} seeds (mean ± sd across seeds; intervals resample seeds and images)" if cfg.seeds > 1 else \
        "1 seed (intervals: bootstrap over test images with their captions)"
    parts = [f"# Study on {cfg.dataset}",
             f"{study.n_images} test images; {seeds}; {cfg.resamples} resamples, {cfg.level:.0%} percentile intervals; "
             f"chance R@1 = {study.chance_r1:.2f} % (1 / n_images). Training steps: "
             + ", ".join(f"{_label(c)} {c.steps}" for c in cells if c.mode != "pretrained") + "."]
    if meaningless:
        parts.append(f"**The robustness comparison is meaningless here.** The median model's clean R@1 is "
                     f"{np.median([study.clean_r1(c.id) for c in cells]):.1f} %, below {CHANCE_FACTOR:.0f}x chance "
                     f"({CHANCE_FACTOR * study.chance_r1:.1f} %): the models barely retrieve on clean data, so an attack "
                     "has almost nothing to break and differences between defences are differences of noise. Use a "
                     "pretrained CLIP (CLIP=...) or train the stand-in longer before reading the tables.")
    parts.append("## The paper's claims\n\n" + "\n".join(
        f"- **{c['verdict']}**: {c['claim']}. {c['why']}." for c in claims))
    parts.append("## Defences\n\nR@K (%) clean and under each attack; ASR (%) at R@1 / R@5 / R@10: the share of "
                 "clean hits at K the attack pushes out of the top K (SGA's three).\n\n" + defences_table(defences, cfg.level))
    if aug_rows:
        parts.append("## Augmentations\n\nMAT+ with one stage (its pairing: text variants 1:N, image variants N:1, "
                     "both N:N) next to MAT; stage statistics from the stage manifests (diversity = 1 - src_sim; "
                     "Frechet distance on the stage's modality). `*`: the gain's interval excludes zero.\n\n"
                     + augmentation_table(aug_rows, aug_attacks)
                     + (f"\n\n![augmentation quality]({figure.name})" if has_figure else ""))
    parts.extend(section for _, section, _ in tasks)
    markdown = "\n\n".join(parts) + "\n"
    atomic_write_text(out_dir / "report.md", markdown)
    payload = {"dataset": cfg.dataset, "n_images": study.n_images, "chance_r1": study.chance_r1,
               "meaningless": meaningless, "claims": claims, "defences": defences, "augmentation": aug_rows,
               "records": records(study, cells), **({"tasks": {task: part for task, _, part in tasks}} if tasks else {}),
               PROVENANCE_KEY: provenance()}
    atomic_write_json(out_dir / "report.json", payload)
    if defences:
        write_csv(out_dir / "defences.csv", defences, list(DEFENCES_CSV))
    if aug_rows:
        write_csv(out_dir / "augmentation.csv", augmentation_csv_rows(aug_rows, aug_attacks), list(AUGMENTATION_CSV))
    log.info("study report: %s", out_dir / "report.md")
    return {"markdown": markdown, "claims": claims, "meaningless": meaningless, "figure": figure if has_figure else None,
            **payload}
