"""`make demo`: the study (`make study`) on the embedded `synth` dataset, on CPU, in about 20 minutes.

Each phase runs the very command its own make target runs (``mat-pipeline <command> ...``, through the typer
app in-process), so the demo is only an ordering of targets with small budgets:

1. ``ingest`` the synth dataset;
2. ``pretrain`` the small CLIP and masked LM that stand in for pretrained models;
3. ``augment`` with the stages that run here (i2t-human, eda, randaug); the generative ones are skipped;
4. ``stats`` of the augmentations;
5. ``study``: the defences table (pretrained, FT, TeCoA, MAT, MAT+; FARE when asked) under every attack, and
   the augmentation table (MAT+ with each CPU stage alone, its own pairing, no N:N cell) under the multimodal
   attacks, with bootstrap intervals, the figure and the claims (pipeline/study/run.py).

Budgets come from :class:`DemoConfig` (env: DEMO_SIZE, DEMO_PRETRAIN_STEPS, DEMO_TRAIN_STEPS, DEMO_MODES,
DEMO_EVAL_SIZE, DEMO_ATTACKS, DEMO_STAGES, DEMO_SEEDS) so a bigger study is one command too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.core.config import check_positive, option
from pipeline.core.executor import default_workers
from pipeline.core.paths import Layout
from stages import STAGES

log = logging.getLogger(__name__)

DATASET = "synth"
CPU_STAGES = STAGES.names(without={"model"})
# The stages needing a downloaded model, and the variable that gives it (the CLI reads them: cli._stage_overrides).
GENERATIVE_STAGES = {"i2t-internvl": "I2T_MODEL", "t2i-sd": "T2I_MODEL"}


@dataclass(frozen=True)
class DemoConfig:
    # Sized for 20 minutes with set-up on 2 CPU cores without bf16 instructions (fp32: README, "The demo's results").
    size: int = field(default=3000, metadata=option("DEMO_SIZE", "Images in the embedded synth dataset, 80/10/10 split.", flag="--size"))
    pretrain_steps: int = field(default=700, metadata=option("DEMO_PRETRAIN_STEPS", "CLIP pretraining steps.", flag="--pretrain-steps"))
    # every cell of both tables (the MAT+ i2t-human and MAT cells are shared by both)
    train_steps: int = field(default=70, metadata=option("DEMO_TRAIN_STEPS", "Fine-tuning steps of every cell.", flag="--train-steps"))
    modes: tuple[str, ...] = field(default=("ft", "tecoa", "mat", "matplus"), metadata=option("DEMO_MODES", "Comma-separated training modes (add fare if wanted).", flag="--modes"))
    eval_size: int = field(default=150, metadata=option("DEMO_EVAL_SIZE", "Test images per evaluation (150: 750 captions).", flag="--eval-size"))
    attacks: tuple[str, ...] = field(default=("pgd", "bert", "coattack", "sga"), metadata=option("DEMO_ATTACKS", "Comma-separated attacks.", flag="--attacks"))
    stages: tuple[str, ...] = field(default=CPU_STAGES, metadata=option("DEMO_STAGES", "Stages of the augmentation table, one MAT+ cell each.", flag="--stages"))
    seeds: int = field(default=1, metadata=option("DEMO_SEEDS", "Seeds per cell.", flag="--seeds"))
    workers: int = field(default=2, metadata=option("WORKERS", "Augmentation processes."))
    # The study runs this many units at a time, each a one-thread process (see PHASE_THREADS).
    parallel: int = field(default_factory=default_workers, metadata=option("STUDY_PARALLEL", "Study units at a time, each a one-thread process (default one per core).", flag="--parallel"))

    def __post_init__(self) -> None:
        check_positive(self, "size", "pretrain_steps", "train_steps", "eval_size", "seeds", "workers", "parallel")
        if not self.modes:
            raise ValueError("modes is empty: give at least one training mode")


#: Torch threads of each phase, fixed rather than the machine's cores so that the demo's numbers are the same on
#: any machine of the same CPU kind (a float sum's order follows the thread count). Pretraining is one long job,
#: which two threads run 1.65x faster than one (2 cores, AVX2); the study's units run one thread each, DemoConfig.parallel
#: at a time (two one-thread units do about 1.3x the work of one two-thread unit there).
PHASE_THREADS = {"pretrain": 2}

#: Runs one CLI command (argv without the program name) and returns its exit code.
Runner = Callable[[list[str]], int]


class DemoError(RuntimeError):
    """A demo phase failed."""


def run_demo(cfg: DemoConfig, run: Runner, layout: Layout, echo: Callable[[str], None] = print) -> str:
    """Run every phase with ``run(argv)`` (one CLI command each, run with ``layout``'s folders); returns the
    report's Markdown."""
    timings: dict[str, float] = {}

    def phase(name: str, argv: list[str], optional: bool = False) -> None:
        argv = ["--threads", str(PHASE_THREADS.get(name, 1)), *argv]
        echo(f"== {name}: mat-pipeline {' '.join(argv)}")
        start = time.perf_counter()
        code = run(argv)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        if code and not optional:
            raise DemoError(f"demo phase {name!r} failed: `mat-pipeline {' '.join(argv)}` exited with {code}")
        if code:
            echo(f"(phase {name} skipped: exit {code}; the study goes on without it)")

    data = ["--dataset", DATASET]
    phase("ingest", ["ingest", *data, "--synth-size", str(cfg.size), "--workers", str(cfg.workers)])
    phase("pretrain", ["pretrain", *data, "--steps", str(cfg.pretrain_steps)])
    echo(f"generative stages skipped: {', '.join(GENERATIVE_STAGES)} (no generative models on this machine); "
         f"enable them with {' / '.join(f'{v}=<model dir or id>' for v in GENERATIVE_STAGES.values())} "
         f"and `make augment STAGES={','.join(GENERATIVE_STAGES)}` (see docs/stages.md)")
    phase("augment", ["augment", *data, "--stages", ",".join(CPU_STAGES), "--workers", str(cfg.workers)])
    phase("stats", ["stats", *data], optional=True)  # descriptive only: nothing downstream reads it
    phase("study", ["study", *data, "--modes", ",".join(cfg.modes), "--steps", str(cfg.train_steps),
                    "--eval-size", str(cfg.eval_size), "--attacks", ",".join(cfg.attacks),
                    "--stages", ",".join(cfg.stages), "--combos", "none", "--seeds", str(cfg.seeds),
                    "--parallel", str(cfg.parallel), "--unit-threads", "1"])
    echo("\n== phase times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
         + f"; total {sum(timings.values()) / 60:.1f} min")
    return (layout.study_dir(DATASET) / "report.md").read_text()
