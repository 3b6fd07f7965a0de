"""`make study`: the paper's comparisons on any ingested dataset, as a resumable plan of units.

A *cell* is one model of a table (a training mode with its augmentation stages and step budget, or the
pretrained CLIP); per seed it needs up to two *units*: one training run and one evaluation. The plan:

1. prepare units, only when missing: ``pretrain`` (the stand-in CLIP and masked LM, when no CLIP= is given) and
   ``augment`` for the CPU stages (i2t-human, eda, randaug) whose shards are missing; existing outputs are taken
   as they are;
2. the defences table: pretrained, FT, TeCoA, FARE, MAT, MAT+ (its default stages), every attack;
3. the augmentation table: MAT without augmentation and MAT+ with each available stage alone (its own pairing:
   a text stage gives 1:N, an image stage N:1) and the N:N combinations (a text stage with an image stage),
   evaluated under the multimodal attacks (Co-Attack, SGA). Cells the tables share are trained once.

Resume: each finished unit writes ``study/units/<unit>.json`` with its *fingerprint*, a hash of its settings and
of the stamps of its inputs (model files, stage manifests' shard digests, the training run it evaluates),
computed when the unit comes up. A unit whose record holds the same fingerprint and whose output exists is
skipped; a training run interrupted mid-way continues from its checkpoint (``train``'s resume), and an
interrupted evaluation from its finished batches. A training folder made under another fingerprint is moved
aside (``<dir>.stale-<time>``), never resumed with other settings and never deleted.

Executors (``StudyConfig.executor``): ``local`` runs the units in order in this process (:func:`run_plan`);
``ray`` runs the trainings, then the evaluations, as Ray tasks (:mod:`pipeline.study.ray_units`). Both decide
and record through :class:`PlanRunner`, so a study started with one resumes with the other.

Outputs in ``MANIFESTS_DIR/<dataset>/study/``: ``plan.json`` (every unit, resolved), ``units/``, and the report
(:mod:`pipeline.study.report`): ``report.md``, ``report.json``, ``augmentation_quality.png``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.attacks import ATTACKS
from pipeline.evaluation.bootstrap import Outcomes
from pipeline.study.plan import (ATTACK_COST, CPU_STAGES, EVAL_COST_SCALE, MODE_COST, STAGE_KINDS, TRAIN_MODES, Cell,
                                 StudyConfig, eval_name, plan_cells, require_blip)
from pipeline.evaluation.resume import fingerprint, model_stamp
from pipeline.study.tasks import (check_tasks, extra_tasks, load_task_scores, task_output, task_section,
                                  task_unit_specs)
from pipeline.core.paths import Layout
from pipeline.core.shards import list_shards, require_shards
from pipeline.core.fileio import atomic_write_json, atomic_write_text
from pipeline.core.ledger import make_dirs

log = logging.getLogger(__name__)


@dataclass
class Unit:
    name: str
    kind: str  # pretrain | augment | train | eval
    settings: dict[str, Any]
    output: Path
    inputs: dict[str, str] = field(default_factory=dict)  # what the fingerprint stamps: name -> model dir / stage
    cost: float = 1.0
    run: Callable[[], None] = field(default=lambda: None, repr=False)
    prepare: bool = False  # done when its output exists (made by the study or by the user)


def available_stages(layout: Layout, dataset: str) -> list[str]:
    """Known stages whose shards and manifest exist, plus the CPU stages (the study augments them)."""
    made = [s for s in STAGE_KINDS if layout.manifest_path(dataset, s).is_file() and layout.stage_dir(dataset, s).is_dir()]
    return [s for s in STAGE_KINDS if s in made or s in CPU_STAGES]


def build_plan(cfg: StudyConfig, layout: Layout) -> tuple[list[Cell], list[Unit]]:
    """Cells and units, in running order (prepare units first, then per seed: train, then eval)."""
    from pipeline.evaluation.evaluate import EvalConfig, evaluate
    from pipeline.core.config import to_dict
    from pipeline.core.config import apply_overrides
    from pipeline.train.config import DataConfig, OptimConfig, TrainConfig
    from pipeline.train.main import train

    require_shards(layout.base_dir(cfg.dataset))
    units: list[Unit] = []
    clip = cfg.clip or str(layout.model_dir(cfg.dataset, "clip"))
    mlm = cfg.mlm or str(layout.model_dir(cfg.dataset, "mlm"))
    if cfg.clip is None and not Path(clip).is_dir():
        from pipeline.train.config import PretrainConfig
        from pipeline.train.pretrain import pretrain

        pcfg = PretrainConfig(dataset=cfg.dataset, steps=cfg.pretrain_steps, device=cfg.device, report_to=())
        units.append(Unit("pretrain", "pretrain", to_dict(pcfg), Path(clip), cost=cfg.pretrain_steps * 1.5,
                          run=lambda: pretrain(pcfg, layout), prepare=True))
    check_tasks(cfg, clip, layout)
    if "itm" in cfg.losses:
        require_blip(cfg, clip, "losses=contrastive,itm (the ITM loss needs BLIP's matching head)")
    stages = available_stages(layout, cfg.dataset)
    cells = plan_cells(cfg, stages)
    needed = sorted({s for c in cells for s in c.stages})
    for stage in needed:
        if not layout.manifest_path(cfg.dataset, stage).is_file():
            units.append(Unit(f"augment-{stage}", "augment", {"stage": stage}, layout.manifest_path(cfg.dataset, stage),
                              cost=300.0, run=_augmenter(cfg, layout, stage), prepare=True))
    split = cfg.eval_split or ("test" if list_shards(layout.base_dir(cfg.dataset), "test") else "val")
    if cfg.eval_split is None and split != "test":
        log.warning("%s has no test split: the study evaluates on %r", cfg.dataset, split)
    runs_root = layout.runs_dir / f"study-{cfg.dataset}"
    optim = OptimConfig() if cfg.lr is None else OptimConfig(lr=cfg.lr)
    for seed in range(cfg.seeds):
        for cell in cells:
            checkpoint, inputs = clip, {"clip": clip}
            if cell.mode != "pretrained":
                run_dir = runs_root / f"{cell.id}-s{seed}"
                tcfg = TrainConfig(mode=cell.mode, dataset=cfg.dataset, clip=clip, mlm=mlm, steps=cell.steps,
                                   losses=("contrastive",) if cell.mode == "fare" else cfg.losses,
                                   batch_size=cfg.batch_size, precision=cfg.precision, seed=seed, device=cfg.device,
                                   run_dir=str(run_dir), report_to=cfg.report_to, wandb_mode=cfg.wandb_mode, optim=optim,
                                   data=DataConfig(stages=cell.stages, num_workers=cfg.data_workers))
                tcfg = apply_overrides(tcfg, cfg.train_set)
                settings = train_settings(tcfg)
                units.append(Unit(f"train-{cell.id}-s{seed}", "train", settings, run_dir / "clip",
                                  inputs={"clip": clip, "mlm": mlm, **{f"stage:{s}": s for s in cell.stages}},
                                  cost=cell.steps * MODE_COST.get(cell.mode, 1.0), run=functools.partial(train, tcfg, layout)))
                checkpoint, inputs = str(run_dir), {"clip": str(run_dir / "clip")}
            ecfg = EvalConfig(checkpoint=checkpoint, dataset=cfg.dataset, mlm=mlm, name=eval_name(cell, seed),
                              mode=cell.mode, split=split, size=cfg.eval_size, batch_size=cfg.eval_batch, attacks=cell.attacks,
                              steps=cfg.eval_steps, top_k=cfg.eval_top_k, device=cfg.device, seed=seed)
            n_images = cfg.eval_size or 1000
            if any("mlm" in ATTACKS.get(a).needs for a in cell.attacks):
                inputs = {**inputs, "mlm": mlm}
            units.append(Unit(f"eval-{cell.id}-s{seed}", "eval", dataclasses.asdict(ecfg) | {"checkpoint": None},
                              layout.eval_path(cfg.dataset, ecfg.name),
                              inputs=inputs,
                              cost=EVAL_COST_SCALE * n_images * (1 + sum(ATTACK_COST.get(a, 1.0) for a in cell.attacks)),
                              run=functools.partial(evaluate, ecfg, layout)))
            for spec in task_unit_specs(cfg, layout, cell, seed, checkpoint, inputs["clip"], mlm, split):
                units.append(Unit(f"eval-{spec['name']}", "eval", spec["settings"], spec["output"], inputs=spec["inputs"],
                                  cost=spec["cost"], run=spec["run"]))
    return cells, units


# Training's attack settings as they were fingerprinted before they became the attacks' own configs (PGD,
# BERTAttack), when training's text attack was the fast variant: units finished with those settings keep their
# fingerprints; a MAT / MAT+ unit trained with the fast attack is stale under today's reference default.
LEGACY_DEFAULT_ATTACK = {"eps": 2 / 255, "pgd_steps": 2, "step_size": None, "random_start": True, "n_words": 1,
                         "k": 10, "order": "text-first"}


#: Settings that do not change the trained weights (trackers), fingerprinted as the study always set them
#: before they became its options, so that choosing trackers retrains nothing.
UNFINGERPRINTED = {"report_to": (), "wandb_mode": "offline"}


def train_settings(tcfg: Any) -> dict[str, Any]:
    """What a training unit's fingerprint covers: the TrainConfig less its run dir and device, its trackers at
    their former values (:data:`UNFINGERPRINTED`)."""
    from pipeline.attacks.bert_attack import BERTAttack
    from pipeline.core.config import to_dict
    from pipeline.train.config import TrainAttackConfig

    settings = {k: v for k, v in to_dict(dataclasses.replace(tcfg, **UNFINGERPRINTED)).items()
                if k not in ("run_dir", "device")}
    if tuple(tcfg.losses) == ("contrastive",):  # units fingerprinted before `losses` existed trained exactly this
        settings.pop("losses")
    legacy = TrainAttackConfig(text=BERTAttack(variant="fast"))
    attacks_texts = "mlm" in TRAIN_MODES.get(tcfg.mode).needs
    if tcfg.attack == legacy or (not attacks_texts and dataclasses.replace(tcfg.attack, text=legacy.text) == legacy):
        settings["attack"] = dict(LEGACY_DEFAULT_ATTACK)
    return settings


def _augmenter(cfg: StudyConfig, layout: Layout, stage: str) -> Callable[[], None]:
    def run() -> None:
        from pipeline.augment.runner import AugmentConfig, run_augment
        from pipeline.data.ingest import IngestConfig

        run_augment(AugmentConfig(ingest=IngestConfig(dataset=cfg.dataset), stages=(stage,), workers=cfg.workers,
                                  executor=cfg.executor), layout)
    return run


class Stamps:
    """Stamps of a unit's inputs, computed when it comes up (after the units that make them), cached by mtime."""

    def __init__(self, layout: Layout, dataset: str) -> None:
        self.layout, self.dataset, self._cache = layout, dataset, {}

    def of(self, name: str, value: str) -> str:
        if name.startswith("stage:"):
            manifest = json.loads(self.layout.manifest_path(self.dataset, value).read_text())
            return fingerprint({"shards": manifest.get("shards"), "counts": manifest.get("counts")})
        path = Path(value)
        key = (value, max((p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()), default=0)) if path.is_dir() else (value, 0)
        if key not in self._cache:
            self._cache[key] = model_stamp(value)
        return self._cache[key]

    def fingerprint(self, unit: Unit) -> str:
        base = self.layout.manifest_path(self.dataset, "base")
        data = json.loads(base.read_text()).get("shards") if base.is_file() else None
        return fingerprint({"kind": unit.kind, "settings": unit.settings, "base": data,
                            "inputs": {k: self.of(k, v) for k, v in sorted(unit.inputs.items())}})


def _set_aside_stale_run(unit: Unit, fp: str) -> None:
    """A training folder made under another fingerprint is moved aside, so `train` does not resume it."""
    run_dir = unit.output.parent
    marker = run_dir / "study-fingerprint"
    if run_dir.exists() and (not marker.is_file() or marker.read_text().strip() != fp):
        aside = run_dir.with_name(f"{run_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning("%s: made with other settings; moved to %s", run_dir, aside)
        run_dir.rename(aside)
    make_dirs(run_dir)
    if not marker.is_file():  # a marker left in place holds this fingerprint already
        atomic_write_text(marker, fp + "\n")


def write_plan(cfg: StudyConfig, cells: list[Cell], units: list[Unit], path: Path) -> None:
    atomic_write_json(path, {
        "config": dataclasses.asdict(cfg), "train_steps": cfg.train_steps, "train_steps_from": cfg.steps_source,
        "cells": [dataclasses.asdict(c) | {"pairing": c.pairing, "modality": c.modality} for c in cells],
        "units": [{"name": u.name, "kind": u.kind, "output": str(u.output), "inputs": u.inputs, "cost": round(u.cost, 1),
                   "settings": u.settings} for u in units],
    })


class PlanRunner:
    """What every executor shares: which units are done (records and fingerprints), the records of the units
    run, and a progress line per unit with the time left. An executor runs the units it is told to run."""

    def __init__(self, units: list[Unit], layout: Layout, dataset: str, echo: Callable[[str], None] = log.info) -> None:
        self.units, self.echo = units, echo
        self.records = layout.study_dir(dataset) / "units"
        make_dirs(self.records)
        self.stamps, self.status = Stamps(layout, dataset), {}
        self.start, self.spent = time.perf_counter(), {}  # kind -> [cost, seconds] of the units run by this call
        self.reported = 0

    def todo(self, unit: Unit) -> tuple[bool, str | None]:
        """(True, fingerprint) when the unit must run (the fingerprint None for a prepare unit); (False, None)
        when it is skipped, its status then set: taken (a prepare unit's output exists) or done (its record
        holds this fingerprint and its output exists). A unit's fingerprint covers its inputs' stamps, so ask
        once the units that make its inputs have run."""
        if unit.prepare and unit.output.exists():
            self.status[unit.name] = "taken"
            return False, None
        fp = None if unit.prepare else self.stamps.fingerprint(unit)
        record_path = self.records / f"{unit.name}.json"
        old = json.loads(record_path.read_text()) if record_path.is_file() else {}
        if fp is not None and old.get("fingerprint") == fp and unit.output.exists():
            self.status[unit.name] = "done"
            return False, None
        return True, fp

    def before(self, unit: Unit, fp: str | None) -> None:
        """What the driver does before a unit runs, wherever it runs: a training folder made under another
        fingerprint is moved aside."""
        if unit.kind == "train":
            _set_aside_stale_run(unit, fp)

    def finished(self, unit: Unit, fp: str | None, seconds: float) -> None:
        """Record a unit that ran to its end (its record makes a rerun skip it)."""
        totals = self.spent.setdefault(unit.kind, [0.0, 0.0])
        totals[0] += unit.cost
        totals[1] += seconds
        atomic_write_json(self.records / f"{unit.name}.json", {
            "name": unit.name, "kind": unit.kind, "fingerprint": fp, "output": str(unit.output),
            "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        self.status[unit.name] = "ran"

    def report(self, unit: Unit, seconds: float, left: list[Unit], parallel: int = 1, where: str = "") -> None:
        """The progress line of a unit whose status is set; `left`: the units still to come."""
        self.reported += 1
        self.echo(f"[{self.reported}/{len(self.units)}] {unit.kind} {unit.name}: {self.status[unit.name]}{where} in "
                  f"{seconds:.0f} s; elapsed {(time.perf_counter() - self.start) / 60:.1f} min, "
                  f"{_time_left(left, self.spent, parallel)}")

    def run_here(self, unit: Unit, left: list[Unit]) -> None:
        """Run a unit in this process unless it is skipped, then report it."""
        t0 = time.perf_counter()
        must, fp = self.todo(unit)
        if must:
            self.before(unit, fp)
            unit.run()
            self.finished(unit, fp, time.perf_counter() - t0)
        self.report(unit, time.perf_counter() - t0, left)


def run_plan(units: list[Unit], layout: Layout, dataset: str, echo: Callable[[str], None] = log.info) -> dict[str, str]:
    """Run the units in order in this process, skipping the done ones; a progress line per unit. Returns {unit:
    done|ran|taken}."""
    runner = PlanRunner(units, layout, dataset, echo)
    for i, unit in enumerate(units, 1):
        runner.run_here(unit, units[i:])
    return runner.status


def _time_left(units: list[Unit], spent: dict[str, list[float]], parallel: int = 1) -> str:
    """Seconds per cost unit measured on each kind run so far; a training or evaluation kind not yet run takes
    the other's rate (their costs share a scale: FT-step equivalents), prepare units count only once measured.
    `parallel` units at a time divide it (the Ray executor)."""
    if not units:
        return "nothing left"
    measured = {kind: s / c for kind, (c, s) in spent.items() if c}
    shared = [measured[k] for k in ("train", "eval") if k in measured]
    if not shared:
        return "time left: known after the first training or evaluation"
    left = sum(u.cost * measured.get(u.kind, shared[0]) for u in units if u.kind in measured or not u.prepare)
    return f"about {left / max(parallel, 1) / 60:.1f} min left"


def _run_units(units: list[Unit], layout: Layout, cfg: StudyConfig, echo: Callable[[str], None]) -> dict[str, str]:
    """Run the units with the study's executor: `local` in this process (or in `parallel` worker processes),
    `ray` as Ray tasks."""
    if cfg.executor == "local" and cfg.parallel > 1:
        from pipeline.core.executor import default_workers
        from pipeline.study.process_units import run_plan_processes

        threads = cfg.unit_threads or max(1, default_workers() // cfg.parallel)
        return run_plan_processes(PlanRunner(units, layout, cfg.dataset, echo), cfg.parallel, threads)
    if cfg.executor == "local":
        if cfg.unit_threads:
            import torch

            torch.set_num_threads(cfg.unit_threads)
        return run_plan(units, layout, cfg.dataset, echo)
    try:
        from pipeline.study.ray_units import run_plan_ray
    except ImportError as error:
        raise ValueError(f"executor {cfg.executor!r} needs the optional extra: pip install 'mat-pipeline[ray]' ({error})") from error
    return run_plan_ray(PlanRunner(units, layout, cfg.dataset, echo), cfg)


def load_outcomes(path: Path) -> dict[str, Outcomes]:
    """Per-attack Outcomes of an evaluation JSON (its ``per_query`` ranks and ``captions_per_image``)."""
    record = json.loads(path.read_text())
    if "captions_per_image" not in record:
        raise ValueError(f"{path}: no per-query results (made before they were recorded); delete it and rerun")
    owner = np.repeat(np.arange(len(record["captions_per_image"])), record["captions_per_image"])
    return {attack: Outcomes(np.asarray(m["per_query"]["tr_rank"]), np.asarray(m["per_query"]["ir_rank"]), owner)
            for attack, m in record["metrics"].items()}


def run_study(cfg: StudyConfig, layout: Layout | None = None, echo: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Plan, run (resuming), and write the report; returns the report builder's result."""
    from pipeline.curate.stats import read_stage_scores, stage_row
    from pipeline.models.device import resolve_device
    from pipeline.study.report import CellResult, build_study_report

    resolve_device(cfg.device)  # DEVICE=cuda without a GPU: refused before the plan, not at the first unit
    layout = layout or Layout.from_env()
    out = layout.study_dir(cfg.dataset)
    cells, units = build_plan(cfg, layout)
    write_plan(cfg, cells, units, out / "plan.json")
    echo(f"study {cfg.dataset}: {len(cells)} cells x {cfg.seeds} seed(s), {len(units)} units; {cfg.train_steps} training "
         f"steps per mode ({cfg.steps_source}); plan: {out / 'plan.json'}")
    _run_units(units, layout, cfg, echo)
    results = [CellResult(cell, {seed: load_outcomes(layout.eval_path(cfg.dataset, eval_name(cell, seed)))
                                 for seed in range(cfg.seeds)}) for cell in cells]
    stage_stats = {}
    for stage in sorted({s for c in cells for s in c.stages}):
        manifest = json.loads(layout.manifest_path(cfg.dataset, stage).read_text())
        stage_stats[stage] = stage_row(manifest, read_stage_scores(stage, layout.stage_dir(cfg.dataset, stage)))
    sections = []
    for task in extra_tasks(cfg):
        scores = {cell.id: {seed: load_task_scores(task, task_output(task, layout, cfg.dataset, eval_name(cell, seed)))
                            for seed in range(cfg.seeds)}
                  for cell in cells if "defences" in cell.tables}
        sections.append((task, *task_section(task, cells, scores, cfg.resamples, cfg.level)))
    return build_study_report(results, stage_stats, cfg, out, tasks=sections)
