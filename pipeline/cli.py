"""The command line: `mat-pipeline <command>` (or `python -m pipeline`). Every Makefile target is a command here.

Options also read environment variables (shown in --help), which is how `make VAR=value target` passes them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.paths import Layout

app = typer.Typer(
    help="MAT / MAT+ pipeline: one-to-many augmentation shards, adversarial training of CLIP, robust evaluation.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
log = logging.getLogger("pipeline")

# Options shared by several commands (each reads the environment variable of the same name as `make`).
Dataset = Annotated[str, typer.Option("--dataset", envvar="DATASET", help="Dataset name; `synth` is the embedded one.")]
DataRoot = Annotated[Optional[Path], typer.Option("--data-root", envvar="DATA_ROOT", help="Dataset folder or annotation file.")]
Format = Annotated[Optional[str], typer.Option("--format", envvar="FORMAT", help="coco | karpathy | albef | csv | imagefolder | synth (detected when empty).")]
Workers = Annotated[int, typer.Option("--workers", envvar="WORKERS", help="Processes, one shard each at a time.")]
Executor = Annotated[str, typer.Option("--executor", envvar="EXECUTOR", help="local (process pool) or ray.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Redo every shard instead of resuming.")]


def _env_or_none(value: Optional[str]) -> Optional[str]:
    return value if value not in (None, "") else None


@app.callback()
def main_options(
    shards_dir: Annotated[Path, typer.Option(envvar="SHARDS_DIR", help="Where shards are written.")] = Path("shards"),
    manifests_dir: Annotated[Path, typer.Option(envvar="MANIFESTS_DIR", help="Where manifests, stats, filters and reports go.")] = Path("manifests"),
    runs_dir: Annotated[Path, typer.Option(envvar="RUNS_DIR", help="Where training runs (checkpoints, logs) go.")] = Path("runs"),
    models_dir: Annotated[Path, typer.Option(envvar="MODELS_DIR", help="Where `pretrain` saves the dataset's CLIP and masked LM.")] = Path("models"),
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.update(SHARDS_DIR=str(shards_dir), MANIFESTS_DIR=str(manifests_dir), RUNS_DIR=str(runs_dir), MODELS_DIR=str(models_dir))


def layout() -> Layout:
    return Layout.from_env()


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


# ------------------------------------------------------------------ ingest


@app.command()
def ingest(
    dataset: Dataset = "synth",
    data_root: DataRoot = None,
    fmt: Format = None,
    shard_size: Annotated[int, typer.Option(envvar="SHARD_SIZE", help="Images per shard.")] = 500,
    max_side: Annotated[Optional[int], typer.Option(envvar="MAX_SIDE", help="Resize images whose longer side exceeds this (default: keep as is).")] = None,
    synth_size: Annotated[int, typer.Option(envvar="SYNTH_SIZE", help="Images in the embedded synth dataset.")] = 4000,
    synth_seed: Annotated[int, typer.Option(envvar="SYNTH_SEED", help="Seed of the synth dataset.")] = 0,
    split_fractions: Annotated[str, typer.Option(envvar="SPLIT_FRACTIONS", help="train,val,test fractions for sources without splits.")] = "0.8,0.1,0.1",
    image_column: Annotated[str, typer.Option(envvar="IMAGE_COLUMN", help="CSV/TSV: the image column.")] = "image",
    caption_column: Annotated[str, typer.Option(envvar="CAPTION_COLUMN", help="CSV/TSV/imagefolder: the caption column.")] = "caption",
    workers: Workers = 2,
    executor: Executor = "local",
    overwrite: Overwrite = False,
) -> None:
    """Read a dataset and write its base shards: SHARDS_DIR/<dataset>/base/<split>-NNNNNN.tar.

    Output: the tars (each with a .stats.json written last), sizes.json, and MANIFESTS_DIR/<dataset>/base.json
    with counts (input = written + skipped), every skipped record with its reason, and per-shard sha256.
    A rerun skips shards already done and redoes incomplete or damaged ones.
    """
    from pipeline.ingest import IngestConfig, run_ingest
    from pipeline.manifests import summary_lines
    from pipeline.sources import SourceError, SplitFractions
    from pipeline.stage import RunOptions

    try:
        fractions = SplitFractions(*(float(x) for x in split_fractions.split(",")))
        config = IngestConfig(
            dataset=dataset, fmt=_env_or_none(fmt), data_root=data_root, shard_size=shard_size, max_side=max_side,
            fractions=fractions, synth_size=synth_size, synth_seed=synth_seed, image_column=image_column,
            caption_column=caption_column,
        )
        manifest = run_ingest(config, layout(), RunOptions(workers=workers, executor=executor, mode="overwrite" if overwrite else "incremental"))
    except (ValueError, SourceError, FileNotFoundError) as error:
        _fail(str(error))
    for line in summary_lines(manifest):
        typer.echo(line)


# ------------------------------------------------------------------ augment


def _stage_overrides(settings: list[str]) -> dict[str, dict[str, str]]:
    """`--set eda.variants_per_caption=2` → {"eda": {"variants_per_caption": "2"}}; model env vars too."""
    overrides: dict[str, dict[str, str]] = {}
    for env_name, stage in (("I2T_MODEL", "i2t-internvl"), ("T2I_MODEL", "t2i-sd")):
        if os.environ.get(env_name):
            overrides.setdefault(stage, {})["model"] = os.environ[env_name]
    for setting in settings:
        name, sep, value = setting.partition("=")
        stage, dot, option = name.partition(".")
        if not sep or not dot:
            raise ValueError(f"--set wants stage.option=value, got {setting!r}")
        overrides.setdefault(stage, {})[option] = value
    return overrides


@app.command()
def augment(
    dataset: Dataset = "synth",
    data_root: DataRoot = None,
    fmt: Format = None,
    stages: Annotated[Optional[str], typer.Option(envvar="STAGES", help="Comma-separated stages; default: every stage that can run here.")] = None,
    settings: Annotated[Optional[list[str]], typer.Option("--set", help="Stage option, e.g. --set eda.variants_per_caption=2 (repeatable; env STAGE_OPTS, space-separated).")] = None,
    scorer: Annotated[Optional[str], typer.Option(envvar="SCORER", help="CLIP (HF id or local dir) that scores alignment/shift; default: MODELS_DIR/<dataset>/clip when `make pretrain` made it.")] = None,
    seed: Annotated[int, typer.Option(envvar="SEED", help="Global seed mixed into every per-sample seed.")] = 0,
    device: Annotated[str, typer.Option(envvar="DEVICE", help="cpu or cuda for model-based stages.")] = "cpu",
    workers: Workers = 2,
    executor: Executor = "local",
    retries: Annotated[int, typer.Option(envvar="RETRIES", help="Times a failed shard is retried before it is recorded.")] = 1,
    overwrite: Overwrite = False,
) -> None:
    """Run augmentation stages; each writes SHARDS_DIR/<dataset>/<stage>/, aligned with the base shards.

    Ingests first when the base shards are missing. Output per stage: the tars (same names, keys and order as
    the base), stats files, and MANIFESTS_DIR/<dataset>/<stage>.json (counts, variants, skip reasons, scorer,
    Frechet distances). Interrupted runs resume.
    """
    from pipeline.augment import run_augment

    extra = os.environ.get("STAGE_OPTS", "").split()
    try:
        run_augment(
            dataset=dataset, data_root=data_root, fmt=_env_or_none(fmt), stage_names=_env_or_none(stages),
            overrides=_stage_overrides(extra + list(settings or [])), scorer_spec=_env_or_none(scorer), seed=seed,
            device=device, workers=workers, executor=executor, retries=retries, overwrite=overwrite, layout=layout(),
        )
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))


# ------------------------------------------------------------------ stats and filters (pipeline/stats.py, pipeline/filters.py)


@app.command()
def stats(dataset: Dataset = "synth") -> None:
    """Per-stage table (counts, variants, alignment, diversity, Frechet distances) and plots. Not yet built."""
    _fail("`stats` is not built yet", 3)


@app.command(name="filter")
def filter_command(dataset: Dataset = "synth") -> None:
    """Write a filter manifest (thresholds on alignment / shift, or top fraction). Not yet built."""
    _fail("`filter` is not built yet", 3)


# ------------------------------------------------------------------ training (pipeline/train/)


@app.command()
def pretrain(dataset: Dataset = "synth") -> None:
    """Train the small CLIP and masked LM that stand in for pretrained models on the demo. Not yet built."""
    _fail("`pretrain` is not built yet", 3)


@app.command()
def train(dataset: Dataset = "synth") -> None:
    """Adversarial fine-tuning of CLIP: MODE=ft|tecoa|fare|mat|matplus. Not yet built."""
    _fail("`train` is not built yet", 3)


# ------------------------------------------------------------------ evaluation (pipeline/evaluate.py, pipeline/report.py)


@app.command(name="eval")
def eval_command(dataset: Dataset = "synth") -> None:
    """Retrieval R@1/5/10 clean and under PGD, BERT-Attack, Co-Attack, SGA. Not yet built."""
    _fail("`eval` is not built yet", 3)


@app.command()
def report(dataset: Dataset = "synth") -> None:
    """Gather evaluations into report.md / report.png / report.json. Not yet built."""
    _fail("`report` is not built yet", 3)


# ------------------------------------------------------------------ demo, bench, clean


@app.command()
def demo(
    synth_size: Annotated[int, typer.Option(envvar="SYNTH_SIZE", help="Images in the embedded dataset.")] = 4000,
    workers: Workers = 2,
) -> None:
    """The whole study on the embedded `synth` dataset (grows as stages land): ingest, then a summary."""
    from pipeline.ingest import IngestConfig, run_ingest
    from pipeline.manifests import summary_lines
    from pipeline.stage import RunOptions

    manifest = run_ingest(IngestConfig(dataset="synth", synth_size=synth_size), layout(), RunOptions(workers=workers))
    for line in summary_lines(manifest):
        typer.echo(line)


@app.command()
def bench(
    only: Annotated[Optional[str], typer.Option(envvar="BENCH", help="Comma-separated benchmark module names (e.g. ingest,train); default all.")] = None,
) -> None:
    """Run benchmarks/bench_*.py and write MANIFESTS_DIR/bench.json (one flat object of named figures)."""
    from pipeline.bench import run_benchmarks

    figures = run_benchmarks(Path("benchmarks"), layout().manifests_dir / "bench.json", _env_or_none(only))
    typer.echo(json.dumps(figures, indent=1, sort_keys=True))


@app.command()
def clean(
    dataset: Annotated[Optional[str], typer.Option("--dataset", envvar="DATASET", help="Only this dataset (default: all outputs).")] = None,
) -> None:
    """Remove generated shards, manifests, runs and models (of one dataset, or all)."""
    import shutil

    paths = layout()
    targets = [paths.shards_dir, paths.manifests_dir, paths.runs_dir, paths.models_dir]
    if dataset:
        targets = [paths.shards_dir / dataset, paths.manifests_dir / dataset, paths.models_dir / dataset]
    for target in targets:
        if target.is_dir():
            keep_readme = target in (Path("shards"), Path("manifests"))
            for child in target.iterdir():
                if keep_readme and child.name == "README.md":
                    continue
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            typer.echo(f"removed the contents of {target}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
