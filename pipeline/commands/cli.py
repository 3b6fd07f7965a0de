"""The command line: `mat-pipeline <command>` (or `python -m pipeline`). Every Makefile target is a command here.

Options also read environment variables (shown in --help), which is how `make VAR=value target` passes them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipeline.attacks.bert_attack import BERTAttack
from pipeline.attacks.pgd import PGD
from pipeline.augment.runner import AugmentConfig
from pipeline.commands.demo import DemoConfig
from pipeline.core.config import build_config, field_default
from pipeline.core.executor import EXECUTORS
from pipeline.core.lifetime import stop_on_signals
from pipeline.core.paths import Layout, plain_name
from pipeline.curate.export import ExportConfig
from pipeline.curate.filters import FilterConfig
from pipeline.data.ingest import IngestConfig
from pipeline.data.sources import SOURCES
from pipeline.evaluation.evaluate import EvalConfig
from pipeline.evaluation.zeroshot import ZeroShotConfig
from pipeline.study.plan import DEFAULT_STEPS, PAPER_STEPS, StudyConfig
from pipeline.train.config import PretrainConfig, TrainConfig
from pipeline.train.registry import MODES

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
def _data_root(value: str):
    from pipeline.core.shard_urls import path_or_spec

    return path_or_spec(value)  # a shard URL spec stays a string: a Path would fold the '//' of s3:// and https://


DataRoot = Annotated[Optional[Path], typer.Option("--data-root", envvar="DATA_ROOT", parser=_data_root, help="Dataset folder or annotation file; FORMAT=wds: also shard URLs (a brace pattern, a '::' list, pipe: commands).")]
BaseData = Annotated[Optional[str], typer.Option("--base-data", envvar="BASE_DATA", help="Base shard URLs instead of SHARDS_DIR/<dataset>/base: a brace pattern (/data/coco/base/train-{000000..000009}.tar), a '::' list or pipe: commands; stage shards are those beside them, by the stage's name.")]
Format = Annotated[Optional[str], typer.Option("--format", envvar="FORMAT", help=f"{' | '.join(SOURCES)} (detected when empty).")]
Workers = Annotated[int, typer.Option("--workers", envvar="WORKERS", help="Processes, one shard each at a time.")]
Executor = Annotated[str, typer.Option("--executor", envvar="EXECUTOR", help=" | ".join(f"{e.name} ({e.description})" for e in EXECUTORS.entries()) + ".")]
ReportTo = Annotated[Optional[str], typer.Option("--report-to", envvar="REPORT_TO", help="Trackers: tensorboard (default), wandb, both comma-separated, or none.")]
WandbMode = Annotated[Optional[str], typer.Option("--wandb-mode", envvar="WANDB_MODE", help="W&B mode: offline (default: no network needed; `wandb sync` later), online or disabled.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Redo every shard instead of resuming.")]

# Ingest options: `ingest`'s, and `augment`'s for the ingest it runs first when the base shards are missing.
# Defaults are IngestConfig's (pipeline/data/ingest.py).
ShardSize = Annotated[int, typer.Option("--shard-size", envvar="SHARD_SIZE", help="Images per shard.")]
MaxSide = Annotated[Optional[int], typer.Option("--max-side", envvar="MAX_SIDE", help="Resize images whose longer side exceeds this (default: keep as is).")]
SynthSize = Annotated[int, typer.Option("--synth-size", envvar="SYNTH_SIZE", help="Images in the embedded synth dataset.")]
SynthSeed = Annotated[int, typer.Option("--synth-seed", envvar="SYNTH_SEED", help="Seed of the synth dataset.")]
SplitFractionsOption = Annotated[str, typer.Option("--split-fractions", envvar="SPLIT_FRACTIONS", help="train,val,test fractions for sources without splits.")]
ImageColumn = Annotated[str, typer.Option("--image-column", envvar="IMAGE_COLUMN", help="CSV/TSV/hf: the image column (hf: an Image feature, bytes or paths).")]
CaptionColumn = Annotated[str, typer.Option("--caption-column", envvar="CAPTION_COLUMN", help="CSV/TSV/imagefolder/hf: the caption column (hf: a list, or one caption per row).")]
IdColumn = Annotated[Optional[str], typer.Option("--id-column", envvar="ID_COLUMN", help="hf: the column naming the image (rows sharing it are one image); default: the image path.")]
IdPrefix = Annotated[Optional[str], typer.Option("--id-prefix", envvar="ID_PREFIX", help="hf/wds: prefix of the image ids they form (default hf / wds).")]
SplitColumn = Annotated[str, typer.Option("--split-column", envvar="SPLIT_COLUMN", help="hf: a column holding each row's split, used when present.")]
Limit = Annotated[Optional[int], typer.Option("--limit", envvar="LIMIT", help="Only the first N images of the source (a quick try on a big dataset).")]
INGEST_OPTIONS = ("dataset", "data_root", "fmt", "shard_size", "max_side", "synth_size", "synth_seed", "split_fractions",
                  "image_column", "caption_column", "id_column", "id_prefix", "split_column", "limit")


def _ingest_default(name: str) -> Any:
    return field_default(IngestConfig, name)


def _fractions_text(fractions: Any) -> str:
    return ",".join(f"{getattr(fractions, name):g}" for name in ("train", "val", "test"))


def _given(ctx: typer.Context) -> dict[str, Any]:
    """The command's options given on the command line or in the environment (those left at their default are
    not: a --config file's value stands for them)."""
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}
    return {name: value for name, value in ctx.params.items()
            if sources[name] is not None and sources[name].name not in ("DEFAULT", "DEFAULT_MAP")}


def _ingest_options(given: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The ingest options given, as IngestConfig settings (under `prefix`: "ingest." for AugmentConfig)."""
    options = {prefix + name: given[name] for name in INGEST_OPTIONS if name in given and name != "split_fractions"}
    for name in ("fmt", "id_column"):
        if name in options:
            options[prefix + name] = _env_or_none(options[prefix + name])
    if _env_or_none(given.get("split_fractions")) is not None:
        parts = given["split_fractions"].split(",")
        if len(parts) > 3:
            raise ValueError(f"SPLIT_FRACTIONS={given['split_fractions']!r}: give train,val,test")
        try:
            options.update({f"{prefix}fractions.{name}": float(part) for name, part in zip(("train", "val", "test"), parts)})
        except ValueError as error:
            raise ValueError(f"SPLIT_FRACTIONS={given['split_fractions']!r}: {error}") from error
    return options

# Every command with settings: a settings file, then the options, then --set (each later one wins).
OptDataset = Annotated[Optional[str], typer.Option("--dataset", envvar="DATASET", callback=_plain("dataset"), help="Dataset name (a plain name: letters, digits, _ - .); default synth, the embedded one.")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", envvar="CONFIG", help="Settings file, YAML or JSON (a run's saved config.json replays as is); the options and --set override it.")]
Assignments = Annotated[Optional[list[str]], typer.Option("--set", envvar="SET", help="Any setting as name=value, applied last, repeatable (e.g. --set optim.lr=1e-5 --set attack.text.mlm_threshold=0.5; names as in the saved config.json; env SET, space-separated).")]


def _env_or_none(value: Optional[str]) -> Optional[str]:
    return value if value not in (None, "") else None


def _default(cls: type, name: str) -> str:
    """A config default as --help shows it, read from the dataclass (``attack.image.eps``: a nested field)."""
    head, *rest = name.split(".")
    value = field_default(cls, head)
    for part in rest:
        value = getattr(value, part)
    return _shown(value, pixels=name.endswith(("eps", "step_size")) and not name.startswith("optim."))


def _shown(value, pixels: bool = False) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) or "none"
    if value is None:
        return "none"
    if pixels and isinstance(value, float) and abs(value * 255 - round(value * 255)) < 1e-9:
        return f"{round(value * 255)}/255"  # pixel budgets, in the papers' unit
    return f"{value:g}" if isinstance(value, float) else str(value)


def _build(cls: type, config_file: Optional[Path], options: dict, assignments: Optional[list[str]]):
    """Defaults < --config file < options < --set; a bad value is a one-line error naming it."""
    try:
        return build_config(cls, config_file, options, assignments or ())
    except ValueError as error:
        _fail(str(error))


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
    global _layout
    _layout = Layout(shards_dir=shards_dir, manifests_dir=manifests_dir, runs_dir=runs_dir, models_dir=models_dir)


_layout: Optional[Layout] = None  # main_options sets it before any command runs


def layout() -> Layout:
    """The folders of this invocation (main_options built them from --shards-dir / SHARDS_DIR, ...)."""
    if _layout is None:
        raise RuntimeError("layout() is called inside a command of the app, after main_options")
    return _layout


def _layout_argv(folders: Layout) -> list[str]:
    """main_options' arguments giving `folders`, for a command run again inside this one (the demo's phases)."""
    return ["--shards-dir", str(folders.shards_dir), "--manifests-dir", str(folders.manifests_dir),
            "--runs-dir", str(folders.runs_dir), "--models-dir", str(folders.models_dir)]


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _fail_on_failed_shards(manifests: list[dict[str, Any]]) -> None:
    """Exit 1 when a shard failed after its retries: the output is incomplete (a rerun resumes it)."""
    failed = [(m, f) for m in manifests for f in m.get("failed_shards", [])]
    if failed:
        names = ", ".join(f"{m['dataset']}/{m['stage']}/{f['shard']} ({f['error']})" for m, f in failed[:3])
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        _fail(f"{len(failed)} shard(s) failed: {names}{more}; rerun the same command to resume them", code=1)


# ------------------------------------------------------------------ ingest


@app.command()
def ingest(
    ctx: typer.Context,
    dataset: Dataset = _ingest_default("dataset"),
    data_root: DataRoot = None,
    fmt: Format = None,
    shard_size: ShardSize = _ingest_default("shard_size"),
    max_side: MaxSide = None,
    synth_size: SynthSize = _ingest_default("synth_size"),
    synth_seed: SynthSeed = _ingest_default("synth_seed"),
    split_fractions: SplitFractionsOption = _fractions_text(_ingest_default("fractions")),
    image_column: ImageColumn = _ingest_default("image_column"),
    caption_column: CaptionColumn = _ingest_default("caption_column"),
    id_column: IdColumn = None,
    id_prefix: IdPrefix = None,
    split_column: SplitColumn = _ingest_default("split_column"),
    limit: Limit = None,
    workers: Workers = 2,
    executor: Executor = "local",
    overwrite: Overwrite = False,
    config: ConfigFile = None,
    settings: Assignments = None,
) -> None:
    """Read a dataset and write its base shards: SHARDS_DIR/<dataset>/base/<split>-NNNNNN.tar.

    Output: the tars (each with a .stats.json written last), sizes.json, and MANIFESTS_DIR/<dataset>/base.json
    with counts (input = written + skipped), every skipped record with its reason, and per-shard sha256.
    A rerun skips shards already done and redoes incomplete or damaged ones. Every IngestConfig field
    (pipeline/data/ingest.py) can be given with --set or in a --config file.
    """
    from pipeline.data.ingest import run_ingest
    from pipeline.core.manifests import summary_lines
    from pipeline.data.sources import SourceError
    from pipeline.core.executor import RunOptions

    try:
        config_ = build_config(IngestConfig, config, _ingest_options(_given(ctx)), settings or ())
        manifest = run_ingest(config_, layout(), RunOptions(workers=workers, executor=executor, mode="overwrite" if overwrite else "incremental"))
    except (ValueError, SourceError, FileNotFoundError) as error:
        _fail(str(error))
    for line in summary_lines(manifest):
        typer.echo(line)
    _fail_on_failed_shards([manifest])


# ------------------------------------------------------------------ augment


def _augment_default(name: str) -> Any:
    return field_default(AugmentConfig, name)


def _augment_settings(items: list[str]) -> tuple[list[str], dict[str, dict[str, str]]]:
    """`--set` items, told apart by their first name: AugmentConfig settings (`seed=1`, `ingest.shard_size=100`)
    and stage options (`eda.variants_per_caption=2` -> {"eda": {"variants_per_caption": "2"}})."""
    fields = {f.name for f in dataclasses.fields(AugmentConfig)}
    settings: list[str] = []
    stage_options: dict[str, dict[str, str]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        stage, dot, option = name.strip().partition(".")
        if sep and stage in fields:
            settings.append(item)
        elif sep and dot and option:
            stage_options.setdefault(stage, {})[option] = value
        else:
            raise ValueError(f"--set wants stage.option=value or an augment setting (name=value), got {item!r}")
    return settings, stage_options


@app.command()
def augment(
    ctx: typer.Context,
    dataset: Dataset = _ingest_default("dataset"),
    data_root: DataRoot = None,
    fmt: Format = None,
    stages: Annotated[Optional[str], typer.Option(envvar="STAGES", help="Comma-separated stages; default: every stage that can run here.")] = None,
    settings: Annotated[Optional[list[str]], typer.Option("--set", help="Stage option, e.g. --set eda.variants_per_caption=2, or any augment setting, e.g. --set ingest.shard_size=100 (names as in --config files); repeatable.")] = None,
    stage_opts: Annotated[Optional[str], typer.Option("--stage-opts", envvar="STAGE_OPTS", help="Stage options as --set takes them, space-separated.")] = None,
    i2t_model: Annotated[Optional[str], typer.Option("--i2t-model", envvar="I2T_MODEL", help="i2t-internvl's checkpoint (local dir or cached hub id); given, the stage runs by default.")] = None,
    t2i_model: Annotated[Optional[str], typer.Option("--t2i-model", envvar="T2I_MODEL", help="t2i-sd's checkpoint (local dir or cached hub id); given, the stage runs by default.")] = None,
    scorer: Annotated[Optional[str], typer.Option(envvar="SCORER", help="CLIP (HF id or local dir) that scores alignment/shift; default: MODELS_DIR/<dataset>/clip when `make pretrain` made it.")] = None,
    seed: Annotated[int, typer.Option(envvar="SEED", help="Global seed mixed into every per-sample seed.")] = _augment_default("seed"),
    device: Annotated[str, typer.Option(envvar="DEVICE", help="cpu or cuda for model-based stages.")] = _augment_default("device"),
    workers: Workers = _augment_default("workers"),
    executor: Executor = _augment_default("executor"),
    retries: Annotated[int, typer.Option(envvar="RETRIES", help="Times a failed shard is retried before it is recorded.")] = _augment_default("retries"),
    overwrite: Overwrite = _augment_default("overwrite"),
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", envvar="TRUST_REMOTE_CODE", help="i2t-internvl on lmdeploy: accept a checkpoint that is not a local directory (lmdeploy loads it with trust_remote_code=True, running its own Python code).")] = False,
    shard_size: ShardSize = _ingest_default("shard_size"),
    max_side: MaxSide = None,
    synth_size: SynthSize = _ingest_default("synth_size"),
    synth_seed: SynthSeed = _ingest_default("synth_seed"),
    split_fractions: SplitFractionsOption = _fractions_text(_ingest_default("fractions")),
    image_column: ImageColumn = _ingest_default("image_column"),
    caption_column: CaptionColumn = _ingest_default("caption_column"),
    id_column: IdColumn = None,
    id_prefix: IdPrefix = None,
    split_column: SplitColumn = _ingest_default("split_column"),
    limit: Limit = None,
    config: ConfigFile = None,
    base_data: BaseData = None,
) -> None:
    """Run augmentation stages; each writes SHARDS_DIR/<dataset>/<stage>/, aligned with the base shards.

    Ingests first when the base shards are missing, with the ingest options given (as `ingest` takes them).
    Output per stage: the tars (same names, keys and order as the base), stats files, and
    MANIFESTS_DIR/<dataset>/<stage>.json (counts, variants, skip reasons, scorer, Frechet distances). Interrupted
    runs resume; a rerun with other stage options, seed or scorer stops and names them (--overwrite redoes the
    stage with the new settings). Every AugmentConfig field (pipeline/augment/runner.py) can be given with --set
    or in a --config file.
    """
    from pipeline.augment.runner import run_augment
    from pipeline.core.shards import ShardError

    given = _given(ctx)
    try:
        _plain_list(stages, "stage")
        assignments, from_set = _augment_settings((stage_opts or "").split() + list(settings or []))
        stage_options: dict[str, dict[str, str]] = {}
        for stage, model in (("i2t-internvl", i2t_model), ("t2i-sd", t2i_model)):
            if _env_or_none(model):
                stage_options.setdefault(stage, {})["model"] = model
        for stage, values in from_set.items():
            stage_options.setdefault(stage, {}).update(values)
        if trust_remote_code:
            stage_options.setdefault("i2t-internvl", {})["trust_remote_code"] = "true"
        options = _ingest_options(given, "ingest.")
        options.update({name: given[name] for name in ("seed", "device", "workers", "executor", "retries", "overwrite") if name in given})
        if _env_or_none(stages) is not None:
            options["stages"] = tuple(s.strip() for s in stages.split(",") if s.strip())
        options["scorer"] = _env_or_none(scorer)
        options["base_data"] = _env_or_none(base_data)
        config_ = build_config(AugmentConfig, config, options, assignments)
        if stage_options:  # on top of the --config file's
            merged = {stage: dict(values) for stage, values in config_.stage_options.items()}
            for stage, values in stage_options.items():
                merged.setdefault(stage, {}).update(values)
            config_ = dataclasses.replace(config_, stage_options=merged)
        manifests = run_augment(config_, layout())
    except (ValueError, FileNotFoundError, ShardError) as error:
        _fail(str(error))
    _fail_on_failed_shards(manifests)


# ------------------------------------------------------------------ stats and filters (pipeline/curate/stats.py, pipeline/curate/filters.py)


@app.command()
def stats(dataset: Dataset = "synth", base_data: BaseData = None) -> None:
    """Per-stage table (counts, variants, alignment, diversity, shift, Frechet distances) and plots.

    Output: MANIFESTS_DIR/<dataset>/stats.json, stats.md and plots/*.png (alignment histogram, alignment vs
    diversity, Frechet distance per stage).
    """
    from pipeline.core.shards import ShardError
    from pipeline.curate.stats import run_stats

    try:
        result = run_stats(dataset, layout(), _env_or_none(base_data))
    except (ValueError, FileNotFoundError, ShardError) as error:
        _fail(str(error))
    typer.echo(result["markdown"])
    for path in result["plots"].values():
        typer.echo(f"plot: {path}")


@app.command(name="filter")
def filter_command(
    ctx: typer.Context,
    dataset: Dataset = "synth",
    name: Annotated[str, typer.Option("--name", envvar="FILTER", callback=_plain("filter name"), help="Filter name: MANIFESTS_DIR/<dataset>/filters/<name>.json.")] = field_default(FilterConfig, "name"),
    min_alignment: Annotated[Optional[float], typer.Option(envvar="MIN_ALIGNMENT", help="Keep variants with alignment >= this cosine.")] = None,
    max_shift: Annotated[Optional[float], typer.Option(envvar="MAX_SHIFT", help="Keep variants with shift <= this (about 1 = a typical original).")] = None,
    shift_percentile: Annotated[Optional[float], typer.Option(envvar="SHIFT_PERCENTILE", help="Drop variants farther from the originals than this percentile (0-100] of the originals themselves.")] = None,
    top_fraction: Annotated[Optional[float], typer.Option(envvar="TOP_FRACTION", help="Keep this fraction of variants with the highest alignment (DataComp style).")] = None,
    scope: Annotated[str, typer.Option(envvar="FILTER_SCOPE", help="Rank TOP_FRACTION per stage or global (all stages together).")] = field_default(FilterConfig, "scope"),
    stages: Annotated[Optional[str], typer.Option("--stages", envvar="FILTER_STAGES", help="Comma-separated stages to filter; default: all.")] = None,
    config: ConfigFile = None,
    settings: Assignments = None,
) -> None:
    """Write a filter manifest (thresholds on alignment / shift, top fraction by alignment); shards stay as they are.

    Training reads it with FILTER=<name> and skips the dropped variants. Every FilterConfig field
    (pipeline/curate/filters.py) can be given with --set or in a --config file.
    """
    from pipeline.curate.filters import filter_path, run_filter

    given = _given(ctx)
    options = {key: given.get(key) for key in ("name", "min_alignment", "max_shift", "shift_percentile", "top_fraction", "scope")}
    if given.get("stages") is not None:
        options["stages"] = tuple(s for s in given["stages"].split(",") if s)
    try:
        config_ = build_config(FilterConfig, config, options, settings or ())
        result = run_filter(dataset, config_, layout())
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    for stage, info in result["stages"].items():
        typer.echo(f"{stage}: kept {info['kept']:,} of {info['variants']:,} variants ({info['dropped']:,} dropped)")
    typer.echo(f"filter: {filter_path(layout(), dataset, config_.name)}")


# ------------------------------------------------------------------ export (pipeline/curate/export.py)


@app.command(name="export")
def export_command(
    ctx: typer.Context,
    dataset: Dataset = field_default(ExportConfig, "dataset"),
    stages: Annotated[Optional[str], typer.Option(envvar="STAGES", help="Comma-separated stages whose variants are exported; default: every augmented stage of the dataset; `base`: base pairs only.")] = None,
    filter_: Annotated[Optional[str], typer.Option("--filter", envvar="FILTER", help="Filter manifest (path or name) that drops variants, as in training.")] = None,
    split: Annotated[str, typer.Option(envvar="EXPORT_SPLIT", callback=_plain("split"), help="Split to export.")] = field_default(ExportConfig, "split"),
    shard_size: Annotated[int, typer.Option(envvar="SHARD_SIZE", help="Pairs per output shard.")] = field_default(ExportConfig, "shard_size"),
    out: Annotated[Optional[Path], typer.Option(envvar="EXPORT_DIR", help="Output folder (default SHARDS_DIR/<dataset>/export-<split>).")] = None,
    config: ConfigFile = None,
    settings: Assignments = None,
) -> None:
    """Write the filtered one-to-many pairs as a plain WebDataset: one sample per pair, jpg + txt + json.

    Output: <split>-NNNNNN.tar shards (each written atomically, with a .stats.json), sizes.json, and export.json
    last (settings, counts per source, shards). An interrupted or outdated export is written again; a complete
    one is left as it is. Every ExportConfig field (pipeline/curate/export.py) can be given with --set or in a
    --config file.
    """
    from pipeline.curate.export import out_dir, run_export

    given = _given(ctx)
    try:
        names = None if stages is None else [s.strip() for s in _plain_list(stages, "stage").split(",")]
        stage_list = None if names is None else tuple(s for s in names if s and s != "base")
        options = {key: given.get(key) for key in ("dataset", "split", "shard_size", "out")}
        options.update(stages=stage_list, filter=_env_or_none(filter_))
        config_ = build_config(ExportConfig, config, options, settings or ())
        summary = run_export(config_, layout())
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    counts = summary["counts"]
    typer.echo(f"{config_.dataset}/{config_.split}: {counts['pairs']:,} pairs of {counts['images']:,} images in {len(summary['shards'])} shards")
    for source, n in counts["pairs_by_source"].items():
        typer.echo(f"  {source}: {n:,} pairs")
    for stage, info in counts["variants"].items():
        typer.echo(f"  {stage}: {info['kept']:,} of {info['read']:,} variants kept")
    typer.echo(f"export: {out_dir(config_, layout())}")


# ------------------------------------------------------------------ training (pipeline/train/)


def _opt(envvar: str, help: str) -> typer.models.OptionInfo:
    return typer.Option(envvar=envvar, help=help)


def _run_training(fn, *args) -> dict:
    from pipeline.models.errors import ModelNotFoundError

    try:
        return fn(*args)
    except (ValueError, FileNotFoundError, ModelNotFoundError) as error:
        _fail(str(error))


P, T, E, S = PretrainConfig, TrainConfig, EvalConfig, StudyConfig
_PRECISION_HELP = "auto (bf16 where the hardware runs it natively: CUDA with bf16, a CPU with AVX512-BF16/AMX; else fp32), bf16 (autocast) or fp32"


@app.command()
def pretrain(
    dataset: OptDataset = None,
    steps: Annotated[Optional[int], _opt("STEPS", f"CLIP training steps (default {_default(P, 'steps')}, ~6 min on 2 CPU cores).")] = None,
    batch_size: Annotated[Optional[int], _opt("BATCH_SIZE", f"CLIP batch size (default {_default(P, 'batch_size')}).")] = None,
    lr: Annotated[Optional[float], _opt("LR", f"CLIP peak learning rate (default {_default(P, 'lr')}).")] = None,
    warmup: Annotated[Optional[int], _opt("WARMUP", f"Warm-up steps (default {_default(P, 'warmup')}).")] = None,
    clip_preset: Annotated[Optional[str], _opt("CLIP_PRESET", f"CLIP size: tiny | small (default {_default(P, 'clip_preset')}).")] = None,
    mlm_preset: Annotated[Optional[str], _opt("MLM_PRESET", f"Masked-LM size: tiny | small (default {_default(P, 'mlm_preset')}).")] = None,
    mlm_steps: Annotated[Optional[int], _opt("MLM_STEPS", f"Masked-LM training steps (default {_default(P, 'mlm_steps')}).")] = None,
    vocab_size: Annotated[Optional[int], _opt("VOCAB_SIZE", f"Tokenizer vocabulary size (default {_default(P, 'vocab_size')}).")] = None,
    precision: Annotated[Optional[str], _opt("PRECISION", f"{_PRECISION_HELP} (default {_default(P, 'precision')}).")] = None,
    seed: Annotated[Optional[int], _opt("SEED", f"Random seed (default {_default(P, 'seed')}).")] = None,
    data_workers: Annotated[Optional[int], _opt("DATA_WORKERS", f"Loader worker processes (default {_default(P, 'num_workers')}).")] = None,
    device: Annotated[Optional[str], _opt("DEVICE", f"auto, cpu or cuda (default {_default(P, 'device')}).")] = None,
    report_to: ReportTo = None,
    wandb_mode: WandbMode = None,
    config: ConfigFile = None,
    settings: Assignments = None,
) -> None:
    """Train the small CLIP and masked LM that stand in for pretrained models (MODELS_DIR/<dataset>/{clip,mlm})."""
    from pipeline.train.pretrain import pretrain as run_pretrain

    cfg = _build(PretrainConfig, config, dict(
        dataset=dataset, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, clip_preset=clip_preset,
        mlm_preset=mlm_preset, mlm_steps=mlm_steps, vocab_size=vocab_size, precision=precision, seed=seed,
        num_workers=data_workers, device=device, report_to=_reporters(report_to),
        wandb_mode=_env_or_none(wandb_mode)), settings)
    result = _run_training(run_pretrain, cfg, layout())
    typer.echo(f"clip: {result['clip']}\nmlm:  {result['mlm']}\nrun:  {result['run_dir']}")


def _mode_stage_defaults() -> str:
    return ", ".join(f"{name}: {','.join(entry.default('stages'))}" for name in MODES.names(needs={"stages"})
                     if (entry := MODES.get(name)).default("stages"))


@app.command()
def train(
    dataset: OptDataset = None,
    mode: Annotated[Optional[str], _opt("MODE", f"{' | '.join(MODES)} (default {_default(T, 'mode')}).")] = None,
    stages: Annotated[Optional[str], _opt("STAGES", f"Comma-separated augmentation stages to train on (modes that need them; default: the mode's own, {_mode_stage_defaults()}).")] = None,
    filter_: Annotated[Optional[str], typer.Option("--filter", envvar="FILTER", help="Filter manifest (path or name) that drops variants.")] = None,
    train_data: Annotated[Optional[str], _opt("TRAIN_DATA", "Base shard URLs instead of SHARDS_DIR/<dataset>/base: a brace pattern (/data/coco/base/train-{000000..000226}.tar), a '::' list or pipe: commands; stage shards are found beside them by the stage's name.")] = None,
    train_num_samples: Annotated[Optional[int], _opt("TRAIN_NUM_SAMPLES", "Samples in TRAIN_DATA when no sizes.json lies beside the shards (logged only).")] = None,
    clip: Annotated[Optional[str], _opt("CLIP", "CLIP to fine-tune (HF id or dir; default MODELS_DIR/<dataset>/clip).")] = None,
    mlm: Annotated[Optional[str], _opt("MLM", "Masked LM for BERT-Attack (default MODELS_DIR/<dataset>/mlm).")] = None,
    steps: Annotated[Optional[int], _opt("STEPS", f"Optimiser steps (default {_default(T, 'steps')}).")] = None,
    batch_size: Annotated[Optional[int], _opt("BATCH_SIZE", f"Batch per process (default {_default(T, 'batch_size')}).")] = None,
    accum_steps: Annotated[Optional[int], _opt("ACCUM_STEPS", f"Gradient-accumulation micro-batches per step (default {_default(T, 'accum_steps')}).")] = None,
    lr: Annotated[Optional[float], _opt("LR", f"Peak learning rate (default {_default(T, 'optim.lr')}).")] = None,
    warmup: Annotated[Optional[int], _opt("WARMUP", f"Warm-up steps (default {_default(T, 'optim.warmup')}).")] = None,
    weight_decay: Annotated[Optional[float], _opt("WEIGHT_DECAY", f"AdamW weight decay (default {_default(T, 'optim.weight_decay')}).")] = None,
    eps: Annotated[Optional[float], _opt("EPS", f"L-inf budget on [0,1] pixels (attack.image.eps, default {_default(T, 'attack.image.eps')}).")] = None,
    pgd_steps: Annotated[Optional[int], _opt("PGD_STEPS", f"PGD steps while training (attack.image.steps, default {_default(T, 'attack.image.steps')}).")] = None,
    pgd_step_size: Annotated[Optional[float], _opt("PGD_STEP_SIZE", f"PGD step size while training (attack.image.step_size; default EPS x {_default(T, 'attack.image.step_ratio')}: {_shown(field_default(T, 'attack').image.step_length, pixels=True)} at {_default(T, 'attack.image.eps')}).")] = None,
    n_words: Annotated[Optional[int], _opt("N_WORDS", f"BERT-Attack words replaced (attack.text.n_words, default {_default(T, 'attack.text.n_words')}).")] = None,
    top_k: Annotated[Optional[int], _opt("TOP_K", f"BERT-Attack masked-LM candidates (attack.text.top_k, default {_default(T, 'attack.text.top_k')}).")] = None,
    order: Annotated[Optional[str], _opt("MAT_ORDER", f"text-first | image-first | joint (default {_default(T, 'attack.order')}).")] = None,
    precision: Annotated[Optional[str], _opt("PRECISION", f"{_PRECISION_HELP} (default {_default(T, 'precision')}).")] = None,
    seed: Annotated[Optional[int], _opt("SEED", f"Random seed (default {_default(T, 'seed')}).")] = None,
    save_every: Annotated[Optional[int], _opt("SAVE_EVERY", f"Checkpoint every N steps and at the end (default {_default(T, 'save_every')}).")] = None,
    log_every: Annotated[Optional[int], _opt("LOG_EVERY", f"Log every N steps (default {_default(T, 'log_every')}).")] = None,
    run_dir: Annotated[Optional[str], _opt("RUN_DIR", "Run folder (default RUNS_DIR/<mode>-<dataset>-<time>).")] = None,
    resume: Annotated[Optional[str], _opt("RESUME", f"auto | latest | never (default {_default(T, 'resume')}).")] = None,
    data_workers: Annotated[Optional[int], _opt("DATA_WORKERS", f"Loader worker processes (default {_default(T, 'data.num_workers')}).")] = None,
    shuffle_buffer: Annotated[Optional[int], _opt("SHUFFLE_BUFFER", f"Samples in the shuffle buffer (default {_default(T, 'data.shuffle_buffer')}).")] = None,
    resampled: Annotated[Optional[bool], typer.Option("--resampled/--epochs", envvar="RESAMPLED", help="Draw shards with replacement (default) or read epochs split by rank and worker.")] = None,
    captions: Annotated[Optional[str], _opt("CAPTIONS", f"primary (the primary caption per image) | all (every human caption its own pair; no STAGES); default {_default(T, 'data.captions')}.")] = None,
    train_augment: Annotated[Optional[str], typer.Option("--train-augment", envvar="TRAIN_AUGMENT", help=f"none (the evaluation's resize + centre crop) | rrc (open_clip's RandomResizedCrop, scale 0.9-1); default {_default(T, 'data.augment')}.")] = None,
    device: Annotated[Optional[str], _opt("DEVICE", f"auto, cpu or cuda (default {_default(T, 'device')}).")] = None,
    report_to: ReportTo = None,
    wandb_mode: WandbMode = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", envvar="OVERWRITE", help="Remove the training run found in the run folder (its config.json, metrics, checkpoints, model, logs) and start afresh instead of resuming it.")] = False,
    config: ConfigFile = None,
    settings: Assignments = None,
) -> None:
    """Adversarial fine-tuning of CLIP streamed from shards: MODE=ft|tecoa|fare|mat|matplus (torchrun for DDP).

    Every setting of TrainConfig (pipeline/train/config.py), the attacks' own included (attack.image: PGD,
    attack.text: BERTAttack), can be given with --set or in a --config file."""
    from pipeline.train.main import train as run_train

    stage_list = tuple(s.strip() for s in stages.split(",") if s.strip()) if _env_or_none(stages) else None
    cfg = _build(TrainConfig, config, {
        "mode": _env_or_none(mode), "dataset": dataset, "clip": _env_or_none(clip), "mlm": _env_or_none(mlm),
        "steps": steps, "batch_size": batch_size, "accum_steps": accum_steps, "precision": precision, "seed": seed,
        "save_every": save_every, "log_every": log_every, "run_dir": _env_or_none(run_dir),
        "resume": _env_or_none(resume), "device": device, "report_to": _reporters(report_to),
        "wandb_mode": _env_or_none(wandb_mode), "optim.lr": lr, "optim.warmup": warmup,
        "optim.weight_decay": weight_decay, "attack.image.eps": eps, "attack.image.steps": pgd_steps,
        "attack.image.step_size": pgd_step_size, "attack.text.n_words": n_words, "attack.text.top_k": top_k,
        "attack.order": _env_or_none(order), "data.stages": stage_list, "data.filter": _env_or_none(filter_),
        "data.num_workers": data_workers, "data.shuffle_buffer": shuffle_buffer, "data.resampled": resampled,
        "data.captions": _env_or_none(captions), "data.augment": _env_or_none(train_augment),
        "data.urls": _env_or_none(train_data), "data.num_samples": train_num_samples,
    }, settings)
    result = _run_training(functools.partial(run_train, overwrite=overwrite), cfg, layout())
    last = result.history[-1] if result.history else {}
    typer.echo(f"run: {result.run_dir}\nmodel: {result.model_dir}\nloss: {last.get('loss', float('nan')):.4f}")


# ------------------------------------------------------------------ evaluation (pipeline/evaluation/evaluate.py, pipeline/evaluation/report.py)


@app.command(name="eval")
def eval_command(
    checkpoint: Annotated[Optional[str], typer.Option("--ckpt", envvar="CKPT", help="Training run dir (its clip/), a CLIP dir or a hub id; several comma-separated, evaluated one after the other (required unless the --config file names one).")] = None,
    dataset: OptDataset = None,
    mlm: Annotated[Optional[str], typer.Option(envvar="MLM", help="Masked LM of the text attacks; default MODELS_DIR/<dataset>/mlm.")] = None,
    name: Annotated[Optional[str], typer.Option(envvar="EVAL_NAME", callback=_plain("EVAL_NAME"), help="Output name (evals/<name>.json); default the run / model dir name.")] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", envvar="EVAL_MODE", help="Row label; default the run's training mode, 'pretrained' for a bare CLIP dir.")] = None,
    attacks: Annotated[Optional[str], typer.Option(envvar="ATTACKS", help=f"Comma-separated attacks (default {_default(E, 'attacks')}); empty string: clean only.")] = None,
    size: Annotated[Optional[int], typer.Option(envvar="EVAL_SIZE", help="First N test images (default all).")] = None,
    split: Annotated[Optional[str], typer.Option(envvar="EVAL_SPLIT", help=f"Split to evaluate on (default {_default(E, 'split')}).")] = None,
    eval_data: Annotated[Optional[str], typer.Option(envvar="EVAL_DATA", help="Test shard URLs (brace pattern, '::' list, pipe: commands) instead of SHARDS_DIR/<dataset>/base/<split>-*.tar.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(envvar="EVAL_BATCH", help=f"Images attacked together, with all their captions (default {_default(E, 'batch_size')}).")] = None,
    eps: Annotated[Optional[float], typer.Option(envvar="EPS", help=f"L-inf budget on [0,1] pixels for every image attack (default each attack's, {_default(PGD, 'eps')}).")] = None,
    steps: Annotated[Optional[int], typer.Option(envvar="ATTACK_STEPS", help=f"PGD steps of every image attack (default each attack's; PGD {_default(PGD, 'steps')}).")] = None,
    step_size: Annotated[Optional[float], typer.Option(envvar="ATTACK_STEP_SIZE", help="PGD step size (default each attack's).")] = None,
    top_k: Annotated[Optional[int], typer.Option(envvar="TOP_K", help=f"BERT-Attack masked-LM candidates (default {_default(BERTAttack, 'top_k')}).")] = None,
    n_words: Annotated[Optional[int], typer.Option(envvar="N_WORDS", help=f"BERT-Attack words replaced (default {_default(BERTAttack, 'n_words')}).")] = None,
    precision: Annotated[Optional[str], typer.Option(envvar="EVAL_PRECISION", help=f"fp32 (the reference protocol), auto or bf16 (faster, not comparable to published numbers); default {_default(E, 'precision')}.")] = None,
    device: Annotated[Optional[str], typer.Option(envvar="DEVICE", help=f"auto, cpu or cuda (default {_default(E, 'device')}).")] = None,
    seed: Annotated[Optional[int], typer.Option(envvar="EVAL_SEED", help=f"Seed of the attacks' random starts and noise; batch i uses a seed derived from it and i (default {_default(E, 'seed')}).")] = None,
    normalise_captions: Annotated[Optional[bool], typer.Option("--normalise-captions/--no-normalise-captions", envvar="CAPTION_NORMALISE", help="Normalise captions as the reference evaluations do (lower case, punctuation stripped, 30 words; the default); CAPTION_NORMALISE=0 keeps them as stored.")] = None,
    constraint: Annotated[Optional[str], typer.Option(envvar="ATTACK_CONSTRAINT", help="BERT-Attack candidate filter: synonyms (WordNet synonyms of the replaced word only); default none, as the reference code.")] = None,
    report_to: ReportTo = None,
    wandb_mode: WandbMode = None,
    config: ConfigFile = None,
    settings: Assignments = None,
    itm_k: Annotated[Optional[int], typer.Option(envvar="ITM_K", help="BLIP: re-rank each query's contrastive top k with the ITM head, as BLIP/ALBEF evaluate (0: off; default EvalConfig's).")] = None,
    attack_source: Annotated[Optional[str], typer.Option(envvar="ATTACK_SOURCE", help="Transfer: craft the attacks on this model (dir, run dir, open_clip:... spec) and evaluate CKPT on them.")] = None,
) -> None:
    """Retrieval R@1/5/10 (TR and IR) clean and under PGD, BERT-Attack, Co-Attack, SGA; writes evals/<name>.json.

    Resumable: rerun the same command after a crash and the finished attacks and batches are kept. Several
    checkpoints (CKPT=run1,run2,...) are evaluated one after the other, each named after its run. Settings:
    EvalConfig (pipeline/evaluation/evaluate.py), through --set or a --config file too."""
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.models.errors import ModelNotFoundError
    from pipeline.core.shards import ShardError

    options = dict(
        dataset=dataset, mlm=_env_or_none(mlm), name=_env_or_none(name), mode=_env_or_none(mode), split=split,
        data=_env_or_none(eval_data), size=size, batch_size=batch_size,
        attacks=tuple(a.strip() for a in attacks.split(",") if a.strip()) if attacks is not None else None,
        eps=eps, steps=steps, step_size=step_size, top_k=top_k, n_words=n_words, precision=precision, device=device,
        seed=seed, normalise_captions=normalise_captions, constraint=_env_or_none(constraint),
        report_to=_reporters(report_to), wandb_mode=_env_or_none(wandb_mode),
        itm_k=itm_k, attack_source=_env_or_none(attack_source))
    base = _build(EvalConfig, config, options, settings)
    if _env_or_none(checkpoint):
        checkpoints = [c.strip() for c in checkpoint.split(",") if c.strip()]
    else:
        checkpoints = [base.checkpoint] if base.checkpoint else []
    if not checkpoints:
        _fail("CKPT: name the checkpoint(s) to evaluate (--ckpt, or checkpoint in the --config file)")
    if len(checkpoints) > 1 and base.name:
        _fail(f"EVAL_NAME={base.name!r} names one evaluation, CKPT has {len(checkpoints)}: each is named after its run")
    for one in checkpoints:
        cfg = _build(EvalConfig, config, {**options, "checkpoint": one}, settings)
        try:
            record = evaluate(cfg, layout())
        except (ValueError, FileNotFoundError, ModelNotFoundError, ShardError) as error:
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
    dataset: OptDataset = None,
    clip: Annotated[Optional[str], _opt("CLIP", "CLIP to fine-tune and evaluate (HF id or dir); default the stand-in MODELS_DIR/<dataset>/clip, pretrained first when missing.")] = None,
    mlm: Annotated[Optional[str], _opt("MLM", "Masked LM of the text attacks; default MODELS_DIR/<dataset>/mlm.")] = None,
    seeds: Annotated[Optional[int], _opt("SEEDS", f"Seeds per cell (default {_default(S, 'seeds')}; 3 gives a mean and spread).")] = None,
    modes: Annotated[Optional[str], _opt("STUDY_MODES", f"Defences to train (default {_default(S, 'modes')}).")] = None,
    steps: Annotated[Optional[int], _opt("STUDY_STEPS", f"Training steps of every mode (default {DEFAULT_STEPS}; with CLIP= the paper's budget by dataset: {', '.join(f'{d} {n}' for d, n in PAPER_STEPS.items())}).")] = None,
    mode_steps: Annotated[Optional[str], _opt("STUDY_MODE_STEPS", "Per-mode steps, e.g. ft=500,mat=1000.")] = None,
    aug_steps: Annotated[Optional[int], _opt("STUDY_AUG_STEPS", "Steps of the augmentation table's cells (default: the matplus steps).")] = None,
    batch_size: Annotated[Optional[int], _opt("BATCH_SIZE", f"Training batch per process (default {_default(S, 'batch_size')}).")] = None,
    lr: Annotated[Optional[float], _opt("LR", f"Peak learning rate (default train's, {_default(T, 'optim.lr')}; e.g. 1e-5 for ViT-B/16).")] = None,
    eval_size: Annotated[Optional[int], _opt("EVAL_SIZE", "First N test images (default all: the published protocol).")] = None,
    eval_batch: Annotated[Optional[int], _opt("EVAL_BATCH", f"Images attacked together (default {_default(S, 'eval_batch')}).")] = None,
    eval_split: Annotated[Optional[str], _opt("EVAL_SPLIT", "Split to evaluate on (default test; val when the dataset has no test split).")] = None,
    attacks: Annotated[Optional[str], _opt("ATTACKS", f"Attacks of the defences table (default {_default(S, 'attacks')}).")] = None,
    stages: Annotated[Optional[str], _opt("STUDY_STAGES", "Stages of the augmentation table (default every available one).")] = None,
    combos: Annotated[Optional[str], _opt("STUDY_COMBOS", "N:N cells as text+image stage pairs, e.g. eda+randaug; none; default auto.")] = None,
    augmentation: Annotated[Optional[bool], typer.Option("--augmentation/--no-augmentation", envvar="STUDY_AUGMENTATION", help="Build the augmentation table (default yes).")] = None,
    pretrain_steps: Annotated[Optional[int], _opt("PRETRAIN_STEPS", f"Steps of the stand-in CLIP when it must be pretrained (default {_default(S, 'pretrain_steps')}).")] = None,
    resamples: Annotated[Optional[int], _opt("BOOTSTRAP_RESAMPLES", f"Bootstrap resamples (default {_default(S, 'resamples')}).")] = None,
    precision: Annotated[Optional[str], _opt("PRECISION", f"Training precision: auto, bf16 or fp32 (default {_default(S, 'precision')}).")] = None,
    device: Annotated[Optional[str], _opt("DEVICE", f"auto, cpu or cuda (default {_default(S, 'device')}).")] = None,
    workers: Annotated[Optional[int], _opt("WORKERS", f"Augmentation processes, stages the study makes (default {_default(S, 'workers')}).")] = None,
    data_workers: Annotated[Optional[int], _opt("DATA_WORKERS", f"Training loader workers (default {_default(S, 'data_workers')}).")] = None,
    config: ConfigFile = None,
    settings: Assignments = None,
) -> None:
    """The paper's comparisons as a resumable plan: defences table, augmentation table, figure, claims.

    Output: MANIFESTS_DIR/<dataset>/study/{plan.json, units/, report.md, report.json, augmentation_quality.png};
    rerun the same command after an interruption and the finished units are skipped. Settings: StudyConfig
    (pipeline/study/plan.py), through --set or a --config file too.
    """
    from pipeline.models.errors import ModelNotFoundError
    from pipeline.study.run import run_study

    given = dict(
        dataset=dataset, clip=_env_or_none(clip), mlm=_env_or_none(mlm), seeds=seeds, modes=_names(modes),
        steps=steps, mode_steps=_mode_steps(mode_steps), aug_steps=aug_steps, batch_size=batch_size, lr=lr,
        eval_size=eval_size, eval_batch=eval_batch, eval_split=_env_or_none(eval_split), stages=_names(stages), combos=_combos(combos),
        attacks=tuple(a.strip() for a in attacks.split(",") if a.strip()) if attacks is not None else None,
        augmentation=augmentation, pretrain_steps=pretrain_steps, resamples=resamples, precision=precision,
        device=device, workers=workers, data_workers=data_workers)
    config_ = _build(StudyConfig, config, given, settings)
    try:
        result = run_study(config_, layout(), echo=typer.echo)
    except (ValueError, FileNotFoundError, ModelNotFoundError) as error:
        _fail(str(error))
    typer.echo(result["markdown"])


# ------------------------------------------------------------------ demo, bench, clean


@app.command()
def demo(
    size: Annotated[Optional[int], typer.Option(envvar="DEMO_SIZE", help=f"Images in the embedded synth dataset, 80/10/10 split (default {field_default(DemoConfig, 'size')}).")] = None,
    pretrain_steps: Annotated[Optional[int], typer.Option(envvar="DEMO_PRETRAIN_STEPS", help=f"CLIP pretraining steps (default {field_default(DemoConfig, 'pretrain_steps')}).")] = None,
    train_steps: Annotated[Optional[int], typer.Option(envvar="DEMO_TRAIN_STEPS", help=f"Fine-tuning steps of every cell (default {field_default(DemoConfig, 'train_steps')}).")] = None,
    modes: Annotated[Optional[str], typer.Option(envvar="DEMO_MODES", help=f"Comma-separated training modes (default {','.join(field_default(DemoConfig, 'modes'))}; add fare if wanted).")] = None,
    eval_size: Annotated[Optional[int], typer.Option(envvar="DEMO_EVAL_SIZE", help=f"Test images per evaluation (default {field_default(DemoConfig, 'eval_size')}).")] = None,
    attacks: Annotated[Optional[str], typer.Option(envvar="DEMO_ATTACKS", help=f"Comma-separated attacks (default {','.join(field_default(DemoConfig, 'attacks'))}).")] = None,
    stages: Annotated[Optional[str], typer.Option(envvar="DEMO_STAGES", help=f"Stages of the augmentation table, one MAT+ cell each (default {','.join(field_default(DemoConfig, 'stages'))}).")] = None,
    seeds: Annotated[Optional[int], typer.Option(envvar="DEMO_SEEDS", help=f"Seeds per cell (default {field_default(DemoConfig, 'seeds')}).")] = None,
    workers: Workers = field_default(DemoConfig, "workers"),
) -> None:
    """`make study` on the embedded `synth` dataset with small budgets: ingest, pretrain, augment, stats, study."""
    from pipeline.commands.demo import DemoError, run_demo

    folders = layout()

    def run_command(argv: list[str]) -> int:
        try:  # each phase writes into this invocation's folders
            code = typer.main.get_command(app).main(_layout_argv(folders) + argv, prog_name="mat-pipeline", standalone_mode=False)
        except typer.Exit as stop:  # raised by _fail inside a command
            code = stop.exit_code
        return code if isinstance(code, int) else 0

    given = dict(size=size, pretrain_steps=pretrain_steps, train_steps=train_steps, eval_size=eval_size,
                 modes=_names(modes), attacks=_names(attacks), stages=_names(stages), seeds=seeds, workers=workers)
    try:
        config = build_config(DemoConfig, None, given)
    except ValueError as error:
        _fail(str(error))
    try:
        run_demo(config, run_command, folders, echo=typer.echo)
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

    Only what the ledgers (.mat-pipeline) inside SHARDS_DIR, MANIFESTS_DIR, RUNS_DIR and MODELS_DIR record as
    written by the pipeline goes (pipeline/commands/clean.py); other files, and the folders holding them, stay.
    """
    from pipeline.commands.clean import clean as run_clean

    for line in run_clean(layout(), dataset).lines():
        typer.echo(line)


@app.command(name="eval-zeroshot")
def eval_zeroshot_command(
    checkpoint: Annotated[Optional[str], typer.Option("--ckpt", envvar="CKPT", help="Any model load_model reads: a training run dir, an HF CLIP / BLIP dir or hub id, open_clip:<model>[:<pretrained>].")] = None,
    data: Annotated[Optional[str], typer.Option(envvar="ZS_DATA", help="An ImageFolder (class folders; '_' reads as a space) or a datasets dataset saved with save_to_disk.")] = None,
    labels: Annotated[Optional[str], typer.Option("--labels", envvar="ZS_LABELS", help="Without ZS_DATA: a labelled set from the synth generator, by shape or colour.")] = None,
    synth_images: Annotated[Optional[int], _opt("ZS_SYNTH_IMAGES", f"Images of the synth labelled set (default {_default(ZeroShotConfig, 'synth_images')}).")] = None,
    dataset: OptDataset = None,
    name: Annotated[Optional[str], typer.Option(envvar="EVAL_NAME", callback=_plain("EVAL_NAME"), help="Output name (evals/zeroshot/<name>.json).")] = None,
    split: Annotated[Optional[str], _opt("ZS_SPLIT", f"Split of a saved DatasetDict (default {_default(ZeroShotConfig, 'split')}).")] = None,
    size: Annotated[Optional[int], typer.Option(envvar="EVAL_SIZE", help="First N images (classes interleaved; default all).")] = None,
    eps: Annotated[Optional[str], _opt("ZS_EPS", f"Comma-separated L-inf budgets in 1/255 units (default {','.join(f'{e * 255:g}' for e in field_default(ZeroShotConfig, 'eps'))}).")] = None,
    pgd_steps: Annotated[Optional[int], _opt("ZS_PGD_STEPS", f"PGD steps of eps/4 (default {_default(ZeroShotConfig, 'pgd_steps')}).")] = None,
    apgd: Annotated[Optional[bool], typer.Option("--apgd/--no-apgd", envvar="ZS_APGD", help="APGD-CE and APGD-T via torchattacks (default on; skipped with a note when not installed).")] = None,
    apgd_steps: Annotated[Optional[int], _opt("ZS_APGD_STEPS", f"APGD iterations (default {_default(ZeroShotConfig, 'apgd_steps')}).")] = None,
    templates: Annotated[Optional[str], typer.Option(envvar="ZS_TEMPLATES", help="A text file of prompt templates, one per line, each with {} for the class name.")] = None,
    batch_size: Annotated[Optional[int], _opt("EVAL_BATCH", f"Images per forward / attack batch (default {_default(ZeroShotConfig, 'batch_size')}).")] = None,
    device: Annotated[Optional[str], _opt("DEVICE", "auto, cpu or cuda (default auto).")] = None,
    seed: Annotated[Optional[int], _opt("EVAL_SEED", "Seed of the attacks' random starts (default 0).")] = None,
    config: ConfigFile = None,
    settings: Assignments = None,
) -> None:
    """Zero-shot classification accuracy, clean and under PGD (and APGD-CE / APGD-T) at each eps; writes
    evals/zeroshot/<name>.json. Settings: ZeroShotConfig (pipeline/evaluation/zeroshot.py), through --set or a
    --config file too."""
    from pipeline.evaluation.zeroshot import evaluate_zeroshot
    from pipeline.models.errors import ModelNotFoundError

    try:
        prompts = tuple(line.strip() for line in Path(templates).read_text().splitlines() if line.strip()) \
            if templates else None
        budgets = tuple(float(e) / 255 for e in eps.split(",") if e.strip()) if _env_or_none(eps) else None
    except (OSError, ValueError) as error:
        _fail(f"ZS_TEMPLATES / ZS_EPS: {error}")
    options = dict(checkpoint=_env_or_none(checkpoint), data=_env_or_none(data), synth_labels=_env_or_none(labels),
                   synth_images=synth_images, dataset=dataset, name=_env_or_none(name), split=split, size=size,
                   templates=prompts, eps=budgets, pgd_steps=pgd_steps, apgd=apgd, apgd_steps=apgd_steps,
                   batch_size=batch_size, device=device, seed=seed)
    cfg = _build(ZeroShotConfig, config, options, settings)
    try:
        record = evaluate_zeroshot(cfg, layout())
    except (ValueError, FileNotFoundError, ModelNotFoundError, ImportError) as error:
        _fail(str(error))
    metrics = record["metrics"]
    typer.echo(f"{record['name']}: {record['n_images']} images, {len(record['classes'])} classes "
               f"(chance {record['chance']:.1f}%), clean {metrics['clean']['accuracy']:.1f}%")
    for key, row in metrics.items():
        if key != "clean":
            apgd_text = f"  APGD-CE+T {row['apgd_accuracy']:5.1f}%" if "apgd_accuracy" in row else ""
            typer.echo(f"  {key:<10} PGD-{row['pgd_steps']} {row['pgd_accuracy']:5.1f}%{apgd_text}")
    for note in record["notes"]:
        typer.echo(f"  note: {note}")


def main() -> None:
    stop_on_signals()
    app()


if __name__ == "__main__":
    main()
