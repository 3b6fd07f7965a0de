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

from pipeline.attacks import ATTACKS
from pipeline.core.executor import EXECUTORS
from pipeline.core.paths import Layout, plain_name
from pipeline.data.sources import SOURCES
from pipeline.train.registry import MODES
from stages import STAGES

app = typer.Typer(
    help="MAT / MAT+ pipeline: one-to-many augmentation shards, adversarial training of CLIP, robust evaluation.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
log = logging.getLogger("pipeline")



def _plain(what: str):
    """An option callback refusing a name that is not plain (paths.plain_name): names become folder names."""

    def check(value: Optional[str]) -> Optional[str]:
        try:
            return value if value is None else plain_name(value, what)
        except ValueError as error:
            raise typer.BadParameter(str(error)) from error

    return check


def _plain_list(value: Optional[str], what: str) -> Optional[str]:
    """A comma-separated list of plain names (STAGES) checked as a whole."""
    for item in (value or "").split(","):
        if item.strip():
            plain_name(item.strip(), what)
    return value


# Options shared by several commands (each reads the environment variable of the same name as `make`).
Dataset = Annotated[str, typer.Option("--dataset", envvar="DATASET", callback=_plain("dataset"), help="Dataset name (a plain name: letters, digits, _ - .); `synth` is the embedded one.")]
DataRoot = Annotated[Optional[Path], typer.Option("--data-root", envvar="DATA_ROOT", help="Dataset folder or annotation file.")]
Format = Annotated[Optional[str], typer.Option("--format", envvar="FORMAT", help=f"{' | '.join(SOURCES)} (detected when empty).")]
Workers = Annotated[int, typer.Option("--workers", envvar="WORKERS", help="Processes, one shard each at a time.")]
Executor = Annotated[str, typer.Option("--executor", envvar="EXECUTOR", help=" | ".join(f"{e.name} ({e.description})" for e in EXECUTORS.entries()) + ".")]
ReportTo = Annotated[Optional[str], typer.Option("--report-to", envvar="REPORT_TO", help="Trackers: tensorboard (default), wandb, both comma-separated, or none.")]
WandbMode = Annotated[Optional[str], typer.Option("--wandb-mode", envvar="WANDB_MODE", help="W&B mode: offline (default: no network needed; `wandb sync` later), online or disabled.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Redo every shard instead of resuming.")]


def _env_or_none(value: Optional[str]) -> Optional[str]:
    return value if value not in (None, "") else None


def _reporters(spec: Optional[str]) -> Optional[tuple[str, ...]]:
    """REPORT_TO as a checked tuple (None when unset, so the config default applies)."""
    from pipeline.core.tracking import parse_report_to

    if _env_or_none(spec) is None:
        return None
    try:
        return parse_report_to(spec)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error


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
    image_column: Annotated[str, typer.Option(envvar="IMAGE_COLUMN", help="CSV/TSV/hf: the image column (hf: an Image feature, bytes or paths).")] = "image",
    caption_column: Annotated[str, typer.Option(envvar="CAPTION_COLUMN", help="CSV/TSV/imagefolder/hf: the caption column (hf: a list, or one caption per row).")] = "caption",
    id_column: Annotated[Optional[str], typer.Option(envvar="ID_COLUMN", help="hf: the column naming the image (rows sharing it are one image); default: the image path.")] = None,
    id_prefix: Annotated[Optional[str], typer.Option(envvar="ID_PREFIX", help="hf/wds: prefix of the image ids they form (default hf / wds).")] = None,
    split_column: Annotated[str, typer.Option(envvar="SPLIT_COLUMN", help="hf: a column holding each row's split, used when present.")] = "split",
    limit: Annotated[Optional[int], typer.Option(envvar="LIMIT", help="Only the first N images of the source (a quick try on a big dataset).")] = None,
    workers: Workers = 2,
    executor: Executor = "local",
    overwrite: Overwrite = False,
) -> None:
    """Read a dataset and write its base shards: SHARDS_DIR/<dataset>/base/<split>-NNNNNN.tar.

    Output: the tars (each with a .stats.json written last), sizes.json, and MANIFESTS_DIR/<dataset>/base.json
    with counts (input = written + skipped), every skipped record with its reason, and per-shard sha256.
    A rerun skips shards already done and redoes incomplete or damaged ones.
    """
    from pipeline.data.ingest import IngestConfig, run_ingest
    from pipeline.core.manifests import summary_lines
    from pipeline.data.sources import SourceError, SplitFractions
    from pipeline.core.executor import RunOptions

    try:
        fractions = SplitFractions(*(float(x) for x in split_fractions.split(",")))
        config = IngestConfig(
            dataset=dataset, fmt=_env_or_none(fmt), data_root=data_root, shard_size=shard_size, max_side=max_side,
            fractions=fractions, synth_size=synth_size, synth_seed=synth_seed, image_column=image_column,
            caption_column=caption_column, id_column=_env_or_none(id_column), id_prefix=id_prefix,
            split_column=split_column, limit=limit,
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
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", envvar="TRUST_REMOTE_CODE", help="i2t-internvl on lmdeploy: accept a checkpoint that is not a local directory (lmdeploy loads it with trust_remote_code=True, running its own Python code).")] = False,
) -> None:
    """Run augmentation stages; each writes SHARDS_DIR/<dataset>/<stage>/, aligned with the base shards.

    Ingests first when the base shards are missing. Output per stage: the tars (same names, keys and order as
    the base), stats files, and MANIFESTS_DIR/<dataset>/<stage>.json (counts, variants, skip reasons, scorer,
    Frechet distances). Interrupted runs resume; a rerun with other stage options, seed or scorer stops and names
    them (--overwrite redoes the stage with the new settings).
    """
    from pipeline.augment.runner import run_augment

    extra = os.environ.get("STAGE_OPTS", "").split()
    try:
        _plain_list(stages, "stage")
        overrides = _stage_overrides(extra + list(settings or []))
        if trust_remote_code:
            overrides.setdefault("i2t-internvl", {})["trust_remote_code"] = "true"
        run_augment(
            dataset=dataset, data_root=data_root, fmt=_env_or_none(fmt), stage_names=_env_or_none(stages),
            overrides=overrides, scorer_spec=_env_or_none(scorer), seed=seed,
            device=device, workers=workers, executor=executor, retries=retries, overwrite=overwrite, layout=layout(),
        )
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))


# ------------------------------------------------------------------ stats and filters (pipeline/curate/stats.py, pipeline/curate/filters.py)


@app.command()
def stats(dataset: Dataset = "synth") -> None:
    """Per-stage table (counts, variants, alignment, diversity, shift, Frechet distances) and plots.

    Output: MANIFESTS_DIR/<dataset>/stats.json, stats.md and plots/*.png (alignment histogram, alignment vs
    diversity, Frechet distance per stage).
    """
    from pipeline.curate.stats import run_stats

    try:
        result = run_stats(dataset, layout())
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    typer.echo(result["markdown"])
    for path in result["plots"].values():
        typer.echo(f"plot: {path}")


@app.command(name="filter")
def filter_command(
    dataset: Dataset = "synth",
    name: Annotated[str, typer.Option("--name", envvar="FILTER", callback=_plain("filter name"), help="Filter name: MANIFESTS_DIR/<dataset>/filters/<name>.json.")] = "default",
    min_alignment: Annotated[Optional[float], typer.Option(envvar="MIN_ALIGNMENT", help="Keep variants with alignment >= this cosine.")] = None,
    max_shift: Annotated[Optional[float], typer.Option(envvar="MAX_SHIFT", help="Keep variants with shift <= this (about 1 = a typical original).")] = None,
    shift_percentile: Annotated[Optional[float], typer.Option(envvar="SHIFT_PERCENTILE", help="Drop variants farther from the originals than this percentile (0-100] of the originals themselves.")] = None,
    top_fraction: Annotated[Optional[float], typer.Option(envvar="TOP_FRACTION", help="Keep this fraction of variants with the highest alignment (DataComp style).")] = None,
    scope: Annotated[str, typer.Option(envvar="FILTER_SCOPE", help="Rank TOP_FRACTION per stage or global (all stages together).")] = "stage",
    stages: Annotated[Optional[str], typer.Option("--stages", envvar="FILTER_STAGES", help="Comma-separated stages to filter; default: all.")] = None,
) -> None:
    """Write a filter manifest (thresholds on alignment / shift, top fraction by alignment); shards stay as they are.

    Training reads it with FILTER=<name> and skips the dropped variants.
    """
    from pipeline.curate.filters import FilterConfig, filter_path, run_filter

    try:
        config = FilterConfig(name=name, min_alignment=min_alignment, max_shift=max_shift,
                              shift_percentile=shift_percentile, top_fraction=top_fraction,
                              scope=scope, stages=tuple(s for s in (stages or "").split(",") if s))
        result = run_filter(dataset, config, layout())
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    for stage, info in result["stages"].items():
        typer.echo(f"{stage}: kept {info['kept']:,} of {info['variants']:,} variants ({info['dropped']:,} dropped)")
    typer.echo(f"filter: {filter_path(layout(), dataset, name)}")


# ------------------------------------------------------------------ export (pipeline/curate/export.py)


@app.command(name="export")
def export_command(
    dataset: Dataset = "synth",
    stages: Annotated[Optional[str], typer.Option(envvar="STAGES", help="Comma-separated stages whose variants are exported; default: every augmented stage of the dataset; `base`: base pairs only.")] = None,
    filter_: Annotated[Optional[str], typer.Option("--filter", envvar="FILTER", help="Filter manifest (path or name) that drops variants, as in training.")] = None,
    split: Annotated[str, typer.Option(envvar="EXPORT_SPLIT", callback=_plain("split"), help="Split to export.")] = "train",
    shard_size: Annotated[int, typer.Option(envvar="SHARD_SIZE", help="Pairs per output shard.")] = 1000,
    out: Annotated[Optional[Path], typer.Option(envvar="EXPORT_DIR", help="Output folder (default SHARDS_DIR/<dataset>/export-<split>).")] = None,
) -> None:
    """Write the filtered one-to-many pairs as a plain WebDataset: one sample per pair, jpg + txt + json.

    Output: <split>-NNNNNN.tar shards (each written atomically, with a .stats.json), sizes.json, and export.json
    last (settings, counts per source, shards). An interrupted or outdated export is written again; a complete
    one is left as it is.
    """
    from pipeline.curate.export import ExportConfig, out_dir, run_export

    try:
        names = None if stages is None else [s.strip() for s in _plain_list(stages, "stage").split(",")]
        stage_list = None if names is None else tuple(s for s in names if s and s != "base")
        config = ExportConfig(dataset=dataset, split=split, stages=stage_list, filter=_env_or_none(filter_),
                              shard_size=shard_size, out=out)
        summary = run_export(config, layout())
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    counts = summary["counts"]
    typer.echo(f"{dataset}/{split}: {counts['pairs']:,} pairs of {counts['images']:,} images in {len(summary['shards'])} shards")
    for source, n in counts["pairs_by_source"].items():
        typer.echo(f"  {source}: {n:,} pairs")
    for stage, info in counts["variants"].items():
        typer.echo(f"  {stage}: {info['kept']:,} of {info['read']:,} variants kept")
    typer.echo(f"export: {out_dir(config, layout())}")


# ------------------------------------------------------------------ training (pipeline/train/)


def _opt(envvar: str, help: str) -> typer.models.OptionInfo:
    return typer.Option(envvar=envvar, help=help)


def _run_training(fn, *args) -> dict:
    from pipeline.models.hf import ModelNotFoundError

    try:
        return fn(*args)
    except (ValueError, FileNotFoundError, ModelNotFoundError) as error:
        _fail(str(error))


@app.command()
def pretrain(
    dataset: Dataset = "synth",
    steps: Annotated[Optional[int], _opt("STEPS", "CLIP training steps (default 1200, ~6 min on 2 CPU cores).")] = None,
    batch_size: Annotated[Optional[int], _opt("BATCH_SIZE", "CLIP batch size (default 128).")] = None,
    lr: Annotated[Optional[float], _opt("LR", "CLIP peak learning rate (default 1e-3).")] = None,
    warmup: Annotated[Optional[int], _opt("WARMUP", "Warm-up steps (default 100).")] = None,
    clip_preset: Annotated[Optional[str], _opt("CLIP_PRESET", "CLIP size: tiny | small (default small).")] = None,
    mlm_preset: Annotated[Optional[str], _opt("MLM_PRESET", "Masked-LM size: tiny | small (default small).")] = None,
    mlm_steps: Annotated[Optional[int], _opt("MLM_STEPS", "Masked-LM training steps (default 300).")] = None,
    vocab_size: Annotated[Optional[int], _opt("VOCAB_SIZE", "Tokenizer vocabulary size (default 1000).")] = None,
    precision: Annotated[Optional[str], _opt("PRECISION", "auto (bf16 where the hardware runs it natively: CUDA with bf16, a CPU with AVX512-BF16/AMX; else fp32), bf16 (autocast) or fp32.")] = None,
    seed: Annotated[Optional[int], _opt("SEED", "Random seed.")] = None,
    data_workers: Annotated[Optional[int], _opt("DATA_WORKERS", "Loader worker processes (default 2).")] = None,
    device: Annotated[Optional[str], _opt("DEVICE", "auto, cpu or cuda.")] = None,
    report_to: ReportTo = None,
    wandb_mode: WandbMode = None,
) -> None:
    """Train the small CLIP and masked LM that stand in for pretrained models (MODELS_DIR/<dataset>/{clip,mlm})."""
    from pipeline.train.config import PretrainConfig, override
    from pipeline.train.pretrain import pretrain as run_pretrain

    cfg = override(PretrainConfig(), dataset=dataset, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                   clip_preset=clip_preset, mlm_preset=mlm_preset, mlm_steps=mlm_steps, vocab_size=vocab_size,
                   precision=precision, seed=seed, num_workers=data_workers, device=device,
                   report_to=_reporters(report_to), wandb_mode=_env_or_none(wandb_mode))
    result = _run_training(run_pretrain, cfg, layout())
    typer.echo(f"clip: {result['clip']}\nmlm:  {result['mlm']}\nrun:  {result['run_dir']}")


@app.command()
def train(
    dataset: Dataset = "synth",
    mode: Annotated[str, _opt("MODE", " | ".join(MODES) + ".")] = "mat",
    stages: Annotated[Optional[str], _opt("STAGES", "Comma-separated augmentation stages to train on (matplus; default i2t-human).")] = None,
    filter_: Annotated[Optional[str], typer.Option("--filter", envvar="FILTER", help="Filter manifest (path or name) that drops variants.")] = None,
    train_data: Annotated[Optional[str], _opt("TRAIN_DATA", "Base shard URLs instead of SHARDS_DIR/<dataset>/base: a brace pattern (/data/coco/base/train-{000000..000226}.tar), a '::' list or pipe: commands; stage shards are found beside them by the stage's name.")] = None,
    train_num_samples: Annotated[Optional[int], _opt("TRAIN_NUM_SAMPLES", "Samples in TRAIN_DATA when no sizes.json lies beside the shards (logged only).")] = None,
    clip: Annotated[Optional[str], _opt("CLIP", "CLIP to fine-tune (HF id or dir; default MODELS_DIR/<dataset>/clip).")] = None,
    mlm: Annotated[Optional[str], _opt("MLM", "Masked LM for BERT-Attack (default MODELS_DIR/<dataset>/mlm).")] = None,
    steps: Annotated[Optional[int], _opt("STEPS", "Optimiser steps (default 150).")] = None,
    batch_size: Annotated[Optional[int], _opt("BATCH_SIZE", "Batch per process (default 128).")] = None,
    accum_steps: Annotated[Optional[int], _opt("ACCUM_STEPS", "Gradient-accumulation micro-batches per step.")] = None,
    lr: Annotated[Optional[float], _opt("LR", "Peak learning rate (default 1e-4).")] = None,
    warmup: Annotated[Optional[int], _opt("WARMUP", "Warm-up steps (default 20).")] = None,
    weight_decay: Annotated[Optional[float], _opt("WEIGHT_DECAY", "AdamW weight decay (default 0.1).")] = None,
    eps: Annotated[Optional[float], _opt("EPS", "L-inf budget on [0,1] pixels (default 2/255).")] = None,
    pgd_steps: Annotated[Optional[int], _opt("PGD_STEPS", "PGD steps while training (default 2).")] = None,
    pgd_step_size: Annotated[Optional[float], _opt("PGD_STEP_SIZE", "PGD step size while training (default EPS/2: 1/255 at 2/255).")] = None,
    n_words: Annotated[Optional[int], _opt("N_WORDS", "BERT-Attack words replaced (default 1).")] = None,
    top_k: Annotated[Optional[int], _opt("TOP_K", "BERT-Attack masked-LM candidates (default 10).")] = None,
    order: Annotated[Optional[str], _opt("MAT_ORDER", "text-first | image-first | joint (default text-first).")] = None,
    precision: Annotated[Optional[str], _opt("PRECISION", "auto (bf16 where the hardware runs it natively: CUDA with bf16, a CPU with AVX512-BF16/AMX; else fp32), bf16 (autocast) or fp32.")] = None,
    seed: Annotated[Optional[int], _opt("SEED", "Random seed.")] = None,
    save_every: Annotated[Optional[int], _opt("SAVE_EVERY", "Checkpoint every N steps (and at the end).")] = None,
    log_every: Annotated[Optional[int], _opt("LOG_EVERY", "Log every N steps.")] = None,
    run_dir: Annotated[Optional[str], _opt("RUN_DIR", "Run folder (default RUNS_DIR/<mode>-<dataset>-<time>).")] = None,
    resume: Annotated[Optional[str], _opt("RESUME", "auto | latest | never.")] = None,
    data_workers: Annotated[Optional[int], _opt("DATA_WORKERS", "Loader worker processes (default 2).")] = None,
    shuffle_buffer: Annotated[Optional[int], _opt("SHUFFLE_BUFFER", "Samples in the shuffle buffer.")] = None,
    resampled: Annotated[Optional[bool], typer.Option("--resampled/--epochs", envvar="RESAMPLED", help="Draw shards with replacement (default) or read epochs split by rank and worker.")] = None,
    captions: Annotated[Optional[str], _opt("CAPTIONS", "primary (default: the primary caption per image) | all (every human caption its own pair; no STAGES).")] = None,
    train_augment: Annotated[Optional[str], typer.Option("--train-augment", envvar="TRAIN_AUGMENT", help="none (default: the evaluation's resize + centre crop) | rrc (open_clip's RandomResizedCrop, scale 0.9-1).")] = None,
    device: Annotated[Optional[str], _opt("DEVICE", "auto, cpu or cuda.")] = None,
    report_to: ReportTo = None,
    wandb_mode: WandbMode = None,
) -> None:
    """Adversarial fine-tuning of CLIP streamed from shards: MODE=ft|tecoa|fare|mat|matplus (torchrun for DDP)."""
    from pipeline.train.config import TrainConfig, override
    from pipeline.train.main import train as run_train

    stage_list = tuple(s.strip() for s in stages.split(",") if s.strip()) if _env_or_none(stages) else None
    cfg = override(
        TrainConfig(), mode=mode, dataset=dataset, clip=_env_or_none(clip), mlm=_env_or_none(mlm), steps=steps,
        batch_size=batch_size, accum_steps=accum_steps, precision=precision, seed=seed, save_every=save_every,
        log_every=log_every, run_dir=_env_or_none(run_dir), resume=_env_or_none(resume), device=device,
        report_to=_reporters(report_to), wandb_mode=_env_or_none(wandb_mode),
        **{"optim.lr": lr, "optim.warmup": warmup, "optim.weight_decay": weight_decay, "attack.eps": eps,
           "attack.pgd_steps": pgd_steps, "attack.step_size": pgd_step_size, "attack.n_words": n_words,
           "attack.k": top_k, "attack.order": _env_or_none(order), "data.stages": stage_list,
           "data.filter": _env_or_none(filter_), "data.num_workers": data_workers,
           "data.shuffle_buffer": shuffle_buffer, "data.resampled": resampled,
           "data.captions": _env_or_none(captions), "data.augment": _env_or_none(train_augment),
           "data.urls": _env_or_none(train_data), "data.num_samples": train_num_samples},
    )
    result = _run_training(run_train, cfg, layout())
    last = result.history[-1] if result.history else {}
    typer.echo(f"run: {result.run_dir}\nmodel: {result.model_dir}\nloss: {last.get('loss', float('nan')):.4f}")


# ------------------------------------------------------------------ evaluation (pipeline/evaluation/evaluate.py, pipeline/evaluation/report.py)


@app.command(name="eval")
def eval_command(
    checkpoint: Annotated[str, typer.Option("--ckpt", envvar="CKPT", help="Training run dir (its clip/), a CLIP dir or a hub id; several comma-separated, evaluated one after the other.")],
    dataset: Dataset = "synth",
    mlm: Annotated[Optional[str], typer.Option(envvar="MLM", help="Masked LM of the text attacks; default MODELS_DIR/<dataset>/mlm.")] = None,
    name: Annotated[Optional[str], typer.Option(envvar="EVAL_NAME", callback=_plain("EVAL_NAME"), help="Output name (evals/<name>.json); default the run / model dir name.")] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", envvar="EVAL_MODE", help="Row label; default the run's training mode, 'pretrained' for a bare CLIP dir.")] = None,
    attacks: Annotated[str, typer.Option(envvar="ATTACKS", help=f"Comma-separated attacks ({','.join(ATTACKS)}); empty string: clean only.")] = ",".join(ATTACKS),
    size: Annotated[Optional[int], typer.Option(envvar="EVAL_SIZE", help="First N test images (default all).")] = None,
    split: Annotated[str, typer.Option(envvar="EVAL_SPLIT", help="Split to evaluate on.")] = "test",
    eval_data: Annotated[Optional[str], typer.Option(envvar="EVAL_DATA", help="Test shard URLs (brace pattern, '::' list, pipe: commands) instead of SHARDS_DIR/<dataset>/base/<split>-*.tar.")] = None,
    batch_size: Annotated[int, typer.Option(envvar="EVAL_BATCH", help="Images attacked together (with all their captions).")] = 64,
    eps: Annotated[Optional[float], typer.Option(envvar="EPS", help="L-inf budget on [0,1] pixels for every image attack (default each attack's, 2/255).")] = None,
    steps: Annotated[Optional[int], typer.Option(envvar="ATTACK_STEPS", help="PGD steps of every image attack (default 10).")] = None,
    step_size: Annotated[Optional[float], typer.Option(envvar="ATTACK_STEP_SIZE", help="PGD step size (default each attack's).")] = None,
    top_k: Annotated[Optional[int], typer.Option(envvar="TOP_K", help="BERT-Attack masked-LM candidates (default 10).")] = None,
    n_words: Annotated[Optional[int], typer.Option(envvar="N_WORDS", help="BERT-Attack words replaced (default 1).")] = None,
    precision: Annotated[str, typer.Option(envvar="EVAL_PRECISION", help="fp32 (the reference protocol), auto or bf16 (faster, not comparable to published numbers).")] = "fp32",
    device: Annotated[str, typer.Option(envvar="DEVICE", help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option(envvar="EVAL_SEED", help="Seed of the attacks' random starts and noise (batch i uses a seed derived from it and i).")] = 0,
    normalise_captions: Annotated[bool, typer.Option("--normalise-captions/--no-normalise-captions", envvar="CAPTION_NORMALISE", help="Normalise captions as the reference evaluations do (lower case, punctuation stripped, 30 words); CAPTION_NORMALISE=0 keeps them as stored.")] = True,
    constraint: Annotated[Optional[str], typer.Option(envvar="ATTACK_CONSTRAINT", help="BERT-Attack candidate filter: synonyms (WordNet synonyms of the replaced word only); default none, as the reference code.")] = None,
    report_to: ReportTo = None,
    wandb_mode: WandbMode = None,
) -> None:
    """Retrieval R@1/5/10 (TR and IR) clean and under PGD, BERT-Attack, Co-Attack, SGA; writes evals/<name>.json.

    Resumable: rerun the same command after a crash and the finished attacks and batches are kept. Several
    checkpoints (CKPT=run1,run2,...) are evaluated one after the other, each named after its run."""
    from pipeline.evaluation.evaluate import EvalConfig, evaluate
    from pipeline.models.hf import ModelNotFoundError
    from pipeline.train.config import override

    checkpoints = [c.strip() for c in checkpoint.split(",") if c.strip()]
    if len(checkpoints) > 1 and _env_or_none(name):
        _fail(f"EVAL_NAME={name!r} names one evaluation, CKPT has {len(checkpoints)}: each is named after its run")
    for one in checkpoints:
        try:
            config = EvalConfig(
                checkpoint=one, dataset=dataset, mlm=_env_or_none(mlm), name=_env_or_none(name),
                mode=_env_or_none(mode), split=split, data=_env_or_none(eval_data), size=size, batch_size=batch_size,
                attacks=tuple(a.strip() for a in attacks.split(",") if a.strip()), eps=eps, steps=steps,
                step_size=step_size, top_k=top_k, n_words=n_words, precision=precision, device=device, seed=seed,
                normalise_captions=normalise_captions, constraint=_env_or_none(constraint),
            )
            config = override(config, report_to=_reporters(report_to), wandb_mode=_env_or_none(wandb_mode))
            record = evaluate(config, layout())
        except (ValueError, FileNotFoundError, ModelNotFoundError) as error:
            _fail(str(error))
        for attack, m in record["metrics"].items():
            typer.echo(f"{record['name']:<32} {attack:<9} TR R@1/5/10 {m['tr_r1']:5.1f} {m['tr_r5']:5.1f} {m['tr_r10']:5.1f}"
                       f"  IR R@1/5/10 {m['ir_r1']:5.1f} {m['ir_r5']:5.1f} {m['ir_r10']:5.1f}  ASR {m['tr_asr']:5.1f} {m['ir_asr']:5.1f}")


@app.command()
def report(dataset: Dataset = "synth") -> None:
    """Gather MANIFESTS_DIR/<dataset>/evals/*.json into report.md, report.png and report.json; print the table."""
    from pipeline.evaluation.report import build_report

    try:
        result = build_report(dataset, layout())
    except FileNotFoundError as error:
        _fail(str(error))
    typer.echo(result["markdown"])
    typer.echo("written: " + ", ".join(str(p) for p in result["paths"].values()))


# ------------------------------------------------------------------ the study (pipeline/study/run.py, pipeline/study/report.py)


def _names(value: Optional[str]) -> Optional[tuple[str, ...]]:
    """A comma-separated list as a tuple (None when unset, so the config default applies)."""
    return tuple(v.strip() for v in value.split(",") if v.strip()) if _env_or_none(value) is not None else None


def _mode_steps(value: Optional[str]) -> Optional[tuple[tuple[str, int], ...]]:
    """`ft=500,mat=1000` -> (("ft", 500), ("mat", 1000))."""
    if _env_or_none(value) is None:
        return None
    pairs = []
    for item in (v.strip() for v in value.split(",") if v.strip()):
        mode, sep, number = item.partition("=")
        if not sep or not number.strip().isdigit():
            raise typer.BadParameter(f"STUDY_MODE_STEPS wants mode=steps pairs, got {item!r}")
        pairs.append((mode.strip(), int(number)))
    return tuple(pairs)


def _combos(value: Optional[str]) -> Optional[tuple[tuple[str, ...], ...]]:
    """`eda+randaug,i2t-internvl+t2i-sd` -> N:N cells; `none` -> no N:N cell; unset -> auto."""
    if _env_or_none(value) is None:
        return None
    if value.strip() == "none":
        return ()
    return tuple(tuple(s.strip() for s in combo.split("+") if s.strip()) for combo in value.split(",") if combo.strip())


@app.command()
def study(
    dataset: Dataset = "synth",
    clip: Annotated[Optional[str], _opt("CLIP", "CLIP to fine-tune and evaluate (HF id or dir); default the stand-in MODELS_DIR/<dataset>/clip, pretrained first when missing.")] = None,
    mlm: Annotated[Optional[str], _opt("MLM", "Masked LM of the text attacks; default MODELS_DIR/<dataset>/mlm.")] = None,
    seeds: Annotated[Optional[int], _opt("SEEDS", "Seeds per cell (default 1; 3 gives a mean and spread).")] = None,
    modes: Annotated[Optional[str], _opt("STUDY_MODES", f"Defences to train (default {','.join(MODES)}).")] = None,
    steps: Annotated[Optional[int], _opt("STUDY_STEPS", "Training steps of every mode (default 2000).")] = None,
    mode_steps: Annotated[Optional[str], _opt("STUDY_MODE_STEPS", "Per-mode steps, e.g. ft=500,mat=1000.")] = None,
    aug_steps: Annotated[Optional[int], _opt("STUDY_AUG_STEPS", "Steps of the augmentation table's cells (default: the matplus steps).")] = None,
    batch_size: Annotated[Optional[int], _opt("BATCH_SIZE", "Training batch per process (default 128).")] = None,
    lr: Annotated[Optional[float], _opt("LR", "Peak learning rate (default train's, 1e-4; e.g. 1e-5 for ViT-B/16).")] = None,
    eval_size: Annotated[Optional[int], _opt("EVAL_SIZE", "First N test images (default all: the published protocol).")] = None,
    eval_batch: Annotated[Optional[int], _opt("EVAL_BATCH", "Images attacked together (default 64).")] = None,
    eval_split: Annotated[Optional[str], _opt("EVAL_SPLIT", "Split to evaluate on (default test; val when the dataset has no test split).")] = None,
    attacks: Annotated[Optional[str], _opt("ATTACKS", f"Attacks of the defences table (default {','.join(ATTACKS)}).")] = None,
    stages: Annotated[Optional[str], _opt("STUDY_STAGES", "Stages of the augmentation table (default every available one).")] = None,
    combos: Annotated[Optional[str], _opt("STUDY_COMBOS", "N:N cells as text+image stage pairs, e.g. eda+randaug; none; default auto.")] = None,
    augmentation: Annotated[Optional[bool], typer.Option("--augmentation/--no-augmentation", envvar="STUDY_AUGMENTATION", help="Build the augmentation table (default yes).")] = None,
    pretrain_steps: Annotated[Optional[int], _opt("PRETRAIN_STEPS", "Steps of the stand-in CLIP when it must be pretrained (default 1200).")] = None,
    resamples: Annotated[Optional[int], _opt("BOOTSTRAP_RESAMPLES", "Bootstrap resamples (default 1000).")] = None,
    precision: Annotated[Optional[str], _opt("PRECISION", "Training precision: auto, bf16 or fp32.")] = None,
    device: Annotated[Optional[str], _opt("DEVICE", "auto, cpu or cuda.")] = None,
    workers: Annotated[Optional[int], _opt("WORKERS", "Augmentation processes (stages the study makes).")] = None,
    data_workers: Annotated[Optional[int], _opt("DATA_WORKERS", "Training loader workers (default 2).")] = None,
) -> None:
    """The paper's comparisons as a resumable plan: defences table, augmentation table, figure, claims.

    Output: MANIFESTS_DIR/<dataset>/study/{plan.json, units/, report.md, report.json, augmentation_quality.png};
    rerun the same command after an interruption and the finished units are skipped.
    """
    from pipeline.models.hf import ModelNotFoundError
    from pipeline.study.plan import StudyConfig
    from pipeline.study.run import run_study

    given = dict(
        dataset=dataset, clip=_env_or_none(clip), mlm=_env_or_none(mlm), seeds=seeds, modes=_names(modes),
        steps=steps, mode_steps=_mode_steps(mode_steps), aug_steps=aug_steps, batch_size=batch_size, lr=lr,
        eval_size=eval_size, eval_batch=eval_batch, eval_split=_env_or_none(eval_split), stages=_names(stages), combos=_combos(combos),
        attacks=tuple(a.strip() for a in attacks.split(",") if a.strip()) if attacks is not None else None,
        augmentation=augmentation, pretrain_steps=pretrain_steps, resamples=resamples, precision=precision,
        device=device, workers=workers, data_workers=data_workers)
    try:
        config = StudyConfig(**{k: v for k, v in given.items() if v is not None})
        result = run_study(config, layout(), echo=typer.echo)
    except (ValueError, FileNotFoundError, ModelNotFoundError) as error:
        _fail(str(error))
    typer.echo(result["markdown"])


# ------------------------------------------------------------------ demo, bench, clean


@app.command()
def demo(
    size: Annotated[Optional[int], typer.Option(envvar="DEMO_SIZE", help="Images in the embedded synth dataset, 80/10/10 split (default 3000).")] = None,
    pretrain_steps: Annotated[Optional[int], typer.Option(envvar="DEMO_PRETRAIN_STEPS", help="CLIP pretraining steps (default 700).")] = None,
    train_steps: Annotated[Optional[int], typer.Option(envvar="DEMO_TRAIN_STEPS", help="Fine-tuning steps of every cell (default 70).")] = None,
    modes: Annotated[Optional[str], typer.Option(envvar="DEMO_MODES", help="Comma-separated training modes (default ft,tecoa,mat,matplus; add fare if wanted).")] = None,
    eval_size: Annotated[Optional[int], typer.Option(envvar="DEMO_EVAL_SIZE", help="Test images per evaluation (default 150).")] = None,
    attacks: Annotated[Optional[str], typer.Option(envvar="DEMO_ATTACKS", help=f"Comma-separated attacks (default {','.join(ATTACKS)}).")] = None,
    stages: Annotated[Optional[str], typer.Option(envvar="DEMO_STAGES", help=f"Stages of the augmentation table, one MAT+ cell each (default {','.join(STAGES.names(without={'model'}))}).")] = None,
    seeds: Annotated[Optional[int], typer.Option(envvar="DEMO_SEEDS", help="Seeds per cell (default 1).")] = None,
    workers: Workers = 2,
) -> None:
    """`make study` on the embedded `synth` dataset with small budgets: ingest, pretrain, augment, stats, study."""
    from pipeline.commands.demo import DemoConfig, DemoError, run_demo

    def run_command(argv: list[str]) -> int:
        try:
            code = typer.main.get_command(app).main(argv, prog_name="mat-pipeline", standalone_mode=False)
        except typer.Exit as stop:  # raised by _fail inside a command
            code = stop.exit_code
        return code if isinstance(code, int) else 0

    given = dict(size=size, pretrain_steps=pretrain_steps, train_steps=train_steps, eval_size=eval_size,
                 modes=_names(modes), attacks=_names(attacks), stages=_names(stages), seeds=seeds, workers=workers)
    try:
        config = DemoConfig(**{k: v for k, v in given.items() if v is not None})
    except ValueError as error:
        _fail(str(error))
    try:
        run_demo(config, run_command, layout(), echo=typer.echo)
    except DemoError as error:
        _fail(str(error))


@app.command()
def bench(
    only: Annotated[Optional[str], typer.Option(envvar="BENCH", help="Comma-separated benchmark names (e.g. ingest,train); default all but gpu (real-size models: BENCH=gpu).")] = None,
) -> None:
    """Run the package's own benchmarks/bench_*.py (not the current directory's) and write MANIFESTS_DIR/bench.json."""
    from pipeline.commands.bench import run_benchmarks

    try:
        figures = run_benchmarks(layout().manifests_dir / "bench.json", _env_or_none(only))
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    typer.echo(json.dumps(figures, indent=1, sort_keys=True))


@app.command()
def clean(
    dataset: Annotated[Optional[str], typer.Option("--dataset", envvar="DATASET", callback=_plain("dataset"), help="Only this dataset (default: all outputs).")] = None,
) -> None:
    """Remove what the pipeline wrote (shards, manifests, runs, models; of one dataset, or all) and list it.

    Only the pipeline's own files inside SHARDS_DIR, MANIFESTS_DIR, RUNS_DIR and MODELS_DIR go (pipeline/commands/clean.py
    lists them); other files, and the folders holding them, stay.
    """
    from pipeline.commands.clean import clean as run_clean

    for line in run_clean(layout(), dataset).lines():
        typer.echo(line)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
