"""The command line: `mat-pipeline <command>` (or `python -m pipeline`). Every Makefile target is a command here.

A command's settings are its config dataclass; their options are generated from the fields
(pipeline/commands/options.py), so a setting is declared once, in its field. Options also read the environment
variable MAT_<NAME> (shown in --help); `make NAME=value <target>` sets it. Nothing here imports torch until a
command runs: --help and a bad value answer at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipeline.augment.runner import AugmentConfig
from pipeline.commands.demo import DemoConfig
from pipeline.commands.options import env, fail, settings_command
from pipeline.core.config import DATASET_OPTION
from pipeline.core.executor import EXECUTORS
from pipeline.core.lifetime import stop_on_signals
from pipeline.core.paths import Layout, plain_name
from pipeline.curate.export import ExportConfig
from pipeline.curate.filters import FilterConfig
from pipeline.data.ingest import IngestConfig
from pipeline.evaluation.config import CaptioningConfig, EvalConfig, GroundingConfig, ZeroShotConfig
from pipeline.study.plan import StudyConfig
from pipeline.train.config import PretrainConfig, TrainConfig

app = typer.Typer(
    help="MAT / MAT+ pipeline: one-to-many augmentation shards, adversarial training of CLIP, robust evaluation.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
log = logging.getLogger("pipeline")

# Errors of the layers below that are the user's to fix: shown as one line, exit 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def _user_errors() -> tuple[type[BaseException], ...]:
    """USER_ERRORS and the model and shard errors (imported here: their modules are loaded by then)."""
    from pipeline.core.shards import ShardError
    from pipeline.data.sources import SourceError
    from pipeline.models.errors import ModelNotFoundError

    return USER_ERRORS + (ModelNotFoundError, ShardError, SourceError)


def _run(fn, *args, **kwargs) -> Any:
    """Call a command's work; a user error is one line (exit 2)."""
    try:
        return fn(*args, **kwargs)
    except _user_errors() as error:
        fail(str(error))


def _plain(what: str):
    """An option callback refusing a name that is not plain (paths.plain_name): names become folder names."""

    def check(value: Optional[str]) -> Optional[str]:
        try:
            return value if value is None else plain_name(value, what)
        except ValueError as error:
            raise typer.BadParameter(str(error)) from error

    return check


# Options of commands without a config of their own.
Dataset = Annotated[str, typer.Option("--dataset", envvar=env("DATASET"), callback=_plain("dataset"), help=DATASET_OPTION["option"].help)]
BaseData = Annotated[Optional[str], typer.Option("--base-data", envvar=env("BASE_DATA"), help="Base shard URLs instead of SHARDS_DIR/<dataset>/base (a brace pattern, a '::' list or pipe: commands).")]


@app.callback()
def main_options(
    shards_dir: Annotated[Path, typer.Option(envvar=env("SHARDS_DIR"), help="Where shards are written.")] = Path("shards"),
    manifests_dir: Annotated[Path, typer.Option(envvar=env("MANIFESTS_DIR"), help="Where manifests, stats, filters and reports go.")] = Path("manifests"),
    runs_dir: Annotated[Path, typer.Option(envvar=env("RUNS_DIR"), help="Where training runs (checkpoints, logs) go.")] = Path("runs"),
    models_dir: Annotated[Path, typer.Option(envvar=env("MODELS_DIR"), help="Where `pretrain` saves the dataset's CLIP and masked LM.")] = Path("models"),
    threads: Annotated[Optional[int], typer.Option("--threads", envvar=env("THREADS"), min=1, help="Torch threads of this command (default one per core); a training's or an evaluation's numbers depend on it, so fix it to get the same numbers on another machine.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    if threads is not None:  # this process and the ones it starts (augmentation workers set their own share)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    global _layout
    _layout = Layout(shards_dir=shards_dir, manifests_dir=manifests_dir, runs_dir=runs_dir, models_dir=models_dir)


_layout: Optional[Layout] = None  # main_options sets it before any command runs


def layout() -> Layout:
    """The folders of this invocation (main_options built them from --shards-dir / MAT_SHARDS_DIR, ...)."""
    if _layout is None:
        raise RuntimeError("layout() is called inside a command of the app, after main_options")
    return _layout


def _layout_argv(folders: Layout) -> list[str]:
    """main_options' arguments giving `folders`, for a command run again inside this one (the demo's phases)."""
    return ["--shards-dir", str(folders.shards_dir), "--manifests-dir", str(folders.manifests_dir),
            "--runs-dir", str(folders.runs_dir), "--models-dir", str(folders.models_dir)]


def _fail_on_failed_shards(manifests: list[dict[str, Any]]) -> None:
    """Exit 1 when a shard failed after its retries: the output is incomplete (a rerun resumes it)."""
    failed = [(m, f) for m in manifests for f in m.get("failed_shards", [])]
    if failed:
        names = ", ".join(f"{m['dataset']}/{m['stage']}/{f['shard']} ({f['error']})" for m, f in failed[:3])
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        fail(f"{len(failed)} shard(s) failed: {names}{more}; rerun the same command to resume them", code=1)


# ------------------------------------------------------------------ ingest, augment


Workers = Annotated[int, typer.Option("--workers", envvar=env("WORKERS"), help="Processes, one shard each at a time.")]
Executor = Annotated[str, typer.Option("--executor", envvar=env("EXECUTOR"), help=" | ".join(f"{e.name} ({e.description})" for e in EXECUTORS.entries()) + ".")]


@app.command()
@settings_command(IngestConfig)
def ingest(
    settings: IngestConfig,
    workers: Workers = 2,
    executor: Executor = "local",
    overwrite: Annotated[bool, typer.Option("--overwrite", envvar=env("OVERWRITE"), help="Redo every shard instead of resuming.")] = False,
) -> None:
    """Read a dataset and write its base shards: SHARDS_DIR/<dataset>/base/<split>-NNNNNN.tar.

    Output: the tars (each with a .stats.json written last), sizes.json, and MANIFESTS_DIR/<dataset>/base.json
    with counts (input = written + skipped), every skipped record with its reason, and per-shard sha256.
    A rerun skips shards already done and redoes incomplete or damaged ones.
    """
    from pipeline.core.executor import RunOptions
    from pipeline.core.manifests import summary_lines
    from pipeline.data.ingest import run_ingest

    options = RunOptions(workers=workers, executor=executor, mode="overwrite" if overwrite else "incremental")
    manifest = _run(run_ingest, settings, layout(), options)
    for line in summary_lines(manifest):
        typer.echo(line)
    _fail_on_failed_shards([manifest])


def _augment_set(items: Sequence[str]) -> tuple[list[str], dict[str, dict[str, str]]]:
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
@settings_command(AugmentConfig, split_set=_augment_set)
def augment(
    settings: AugmentConfig,
    set_extra: dict[str, dict[str, str]],
    stage_opts: Annotated[Optional[str], typer.Option("--stage-opts", envvar=env("STAGE_OPTS"), help="Stage options as --set takes them, space-separated.")] = None,
    i2t_model: Annotated[Optional[str], typer.Option("--i2t-model", envvar=env("I2T_MODEL"), help="i2t-internvl's checkpoint (local dir or cached hub id); given, the stage runs by default.")] = None,
    t2i_model: Annotated[Optional[str], typer.Option("--t2i-model", envvar=env("T2I_MODEL"), help="t2i-sd's checkpoint (local dir or cached hub id); given, the stage runs by default.")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", envvar=env("TRUST_REMOTE_CODE"), help="i2t-internvl on lmdeploy: accept a checkpoint that is not a local directory (lmdeploy loads it with trust_remote_code=True, running its own Python code).")] = False,
) -> None:
    """Run augmentation stages; each writes SHARDS_DIR/<dataset>/<stage>/, aligned with the base shards.

    Ingests first when the base shards are missing, with the ingest options given (as `ingest` takes them).
    Output per stage: the tars (same names, keys and order as the base), stats files, and
    MANIFESTS_DIR/<dataset>/<stage>.json (counts, variants, skip reasons, scorer, Frechet distances). Interrupted
    runs resume; a rerun with other stage options, seed or scorer stops and names them (--overwrite redoes the
    stage with the new settings). --set takes stage options (eda.variants_per_caption=2) and augment settings.
    """
    from pipeline.augment.runner import run_augment

    given: dict[str, dict[str, Any]] = {}
    for stage, model in (("i2t-internvl", i2t_model), ("t2i-sd", t2i_model)):
        if model:
            given.setdefault(stage, {})["model"] = model
    if trust_remote_code:
        given.setdefault("i2t-internvl", {})["trust_remote_code"] = "true"
    try:
        _, from_opts = _augment_set((stage_opts or "").split())
    except ValueError as error:
        fail(str(error))
    for source in (from_opts, set_extra):
        for stage, values in source.items():
            given.setdefault(stage, {}).update(values)
    if given:  # on top of the --config file's
        merged = {stage: dict(values) for stage, values in settings.stage_options.items()}
        for stage, values in given.items():
            merged.setdefault(stage, {}).update(values)
        settings = dataclasses.replace(settings, stage_options=merged)
    _fail_on_failed_shards(_run(run_augment, settings, layout()))


# ------------------------------------------------------------------ stats, filter, export (pipeline/curate/)


@app.command()
def stats(dataset: Dataset = "synth", base_data: BaseData = None) -> None:
    """Per-stage table (counts, variants, alignment, diversity, shift, Frechet distances) and plots.

    Output: MANIFESTS_DIR/<dataset>/stats.json, stats.md and plots/*.png (alignment histogram, alignment vs
    diversity, Frechet distance per stage).
    """
    from pipeline.curate.stats import run_stats

    result = _run(run_stats, dataset, layout(), base_data or None)
    typer.echo(result["markdown"])
    for path in result["plots"].values():
        typer.echo(f"plot: {path}")


@app.command(name="filter")
@settings_command(FilterConfig)
def filter_command(settings: FilterConfig, dataset: Dataset = "synth") -> None:
    """Write a filter manifest (thresholds on alignment / shift, top fraction by alignment); shards stay as they are.

    Training reads it with FILTER=<name> and skips the dropped variants.
    """
    from pipeline.curate.filters import filter_path, run_filter

    result = _run(run_filter, dataset, settings, layout())
    for stage, info in result["stages"].items():
        typer.echo(f"{stage}: kept {info['kept']:,} of {info['variants']:,} variants ({info['dropped']:,} dropped)")
    typer.echo(f"filter: {filter_path(layout(), dataset, settings.name)}")


@app.command(name="export")
@settings_command(ExportConfig)
def export_command(settings: ExportConfig) -> None:
    """Write the filtered one-to-many pairs as a plain WebDataset: one sample per pair, jpg + txt + json.

    Output: <split>-NNNNNN.tar shards (each written atomically, with a .stats.json), sizes.json, and export.json
    last (settings, counts per source, shards). An interrupted or outdated export is written again; a complete
    one is left as it is.
    """
    from pipeline.curate.export import out_dir, run_export

    summary = _run(run_export, settings, layout())
    counts = summary["counts"]
    typer.echo(f"{settings.dataset}/{settings.split}: {counts['pairs']:,} pairs of {counts['images']:,} images in {len(summary['shards'])} shards")
    for source, n in counts["pairs_by_source"].items():
        typer.echo(f"  {source}: {n:,} pairs")
    for stage, info in counts["variants"].items():
        typer.echo(f"  {stage}: {info['kept']:,} of {info['read']:,} variants kept")
    typer.echo(f"export: {out_dir(settings, layout())}")


# ------------------------------------------------------------------ training (pipeline/train/)


@app.command()
@settings_command(PretrainConfig)
def pretrain(settings: PretrainConfig) -> None:
    """Train the small CLIP (or BLIP: FAMILY=blip) and masked LM that stand in for pretrained models
    (MODELS_DIR/<dataset>/{clip or blip,mlm})."""
    from pipeline.train.pretrain import pretrain as run_pretrain

    result = _run(run_pretrain, settings, layout())
    typer.echo("\n".join(f"{name}: {path}" for name, path in result.items()))


@app.command()
@settings_command(TrainConfig)
def train(
    settings: TrainConfig,
    overwrite: Annotated[bool, typer.Option("--overwrite", envvar=env("OVERWRITE"), help="Remove the training run found in the run folder (its config.json, metrics, checkpoints, model, logs) and start afresh instead of resuming it.")] = False,
) -> None:
    """Adversarial fine-tuning of CLIP streamed from shards: MODE=ft|tecoa|fare|mat|matplus (torchrun for DDP).

    Every setting of TrainConfig (pipeline/train/config.py), the attacks' own included (attack.image: PGD,
    attack.text: BERTAttack), can be given with --set or in a --config file."""
    from pipeline.train.main import train as run_train

    result = _run(run_train, settings, layout(), overwrite=overwrite)
    last = result.history[-1] if result.history else {}
    typer.echo(f"run: {result.run_dir}\nmodel: {result.model_dir}\nloss: {last.get('loss', float('nan')):.4f}")


# ------------------------------------------------------------------ evaluation (pipeline/evaluation/)


@app.command(name="eval")
@settings_command(EvalConfig)
def eval_command(
    settings: EvalConfig,
    checkpoint: Annotated[Optional[str], typer.Option("--ckpt", envvar=env("CKPT"), help="Training run dir (its clip/), a CLIP dir or a hub id; several comma-separated, evaluated one after the other (required unless the --config file names one).")] = None,
) -> None:
    """Retrieval R@1/5/10 (TR and IR) clean and under PGD, BERT-Attack, Co-Attack, SGA; writes evals/<name>.json.

    Resumable: rerun the same command after a crash and the finished attacks and batches are kept. Several
    checkpoints (CKPT=run1,run2,...) are evaluated one after the other, each named after its run."""
    from pipeline.evaluation.evaluate import evaluate

    checkpoints = [c.strip() for c in (checkpoint or settings.checkpoint).split(",") if c.strip()]
    if not checkpoints:
        fail("CKPT: name the checkpoint(s) to evaluate (--ckpt, or checkpoint in the --config file)")
    if len(checkpoints) > 1 and settings.name:
        fail(f"EVAL_NAME={settings.name!r} names one evaluation, CKPT has {len(checkpoints)}: each is named after its run")
    printing = os.environ.get("RANK", "0") == "0"  # under torchrun every rank returns the record; one prints it
    for one in checkpoints:
        record = _run(evaluate, dataclasses.replace(settings, checkpoint=one), layout())
        for attack, m in (record["metrics"] if printing else {}).items():
            typer.echo(f"{record['name']:<32} {attack:<9} TR R@1/5/10 {m['tr_r1']:5.1f} {m['tr_r5']:5.1f} {m['tr_r10']:5.1f}"
                       f"  IR R@1/5/10 {m['ir_r1']:5.1f} {m['ir_r5']:5.1f} {m['ir_r10']:5.1f}  ASR {m['tr_asr']:5.1f} {m['ir_asr']:5.1f}")


@app.command(name="eval-zeroshot")
@settings_command(ZeroShotConfig)
def eval_zeroshot_command(settings: ZeroShotConfig) -> None:
    """Zero-shot classification accuracy, clean and under PGD (and APGD-CE / APGD-T) at each eps; writes
    evals/zeroshot/<name>.json."""
    from pipeline.evaluation.zeroshot import evaluate_zeroshot

    try:
        record = evaluate_zeroshot(settings, layout())
    except _user_errors() + (ImportError,) as error:
        fail(str(error))
    metrics = record["metrics"]
    typer.echo(f"{record['name']}: {record['n_images']} images, {len(record['classes'])} classes "
               f"(chance {record['chance']:.1f}%), clean {metrics['clean']['accuracy']:.1f}%")
    for key, row in metrics.items():
        if key != "clean":
            apgd_text = f"  APGD-CE+T {row['apgd_accuracy']:5.1f}%" if "apgd_accuracy" in row else ""
            typer.echo(f"  {key:<10} PGD-{row['pgd_steps']} {row['pgd_accuracy']:5.1f}%{apgd_text}")
    for note in record["notes"]:
        typer.echo(f"  note: {note}")


@app.command(name="eval-grounding")
@settings_command(GroundingConfig)
def eval_grounding_command(settings: GroundingConfig) -> None:
    """Weakly supervised grounding (Grad-CAM of a BLIP's ITM cross-attention, ALBEF's protocol): accuracy per
    split, clean and under PGD on the ITM score, Co-Attack and SGA; writes evals/grounding/<name>.json."""
    from pipeline.evaluation.grounding import evaluate_grounding

    record = _run(evaluate_grounding, settings, layout())
    for attack, row in record["metrics"].items():
        splits = "  ".join(f"{split} {accuracy:5.1f}" for split, accuracy in row["accuracy"].items())
        typer.echo(f"{record['name']:<32} {attack:<9} {splits}  ({record['n_expressions']} expressions, "
                   f"{row['seconds']:.0f} s)")


@app.command(name="eval-captioning")
@settings_command(CaptioningConfig)
def eval_captioning_command(settings: CaptioningConfig) -> None:
    """BLIP image captioning (BLEU-4, METEOR, ROUGE-L, CIDEr) clean, under PGD on the captioner's loss and under
    image attacks transferred from ATTACK_SOURCE; CKPT's vision encoder in the captioner; writes
    evals/captioning/<name>.json."""
    from pipeline.evaluation.captioning import evaluate_captioning

    try:
        record = evaluate_captioning(settings, layout())
    except _user_errors() as error:
        fail(str(error))
    typer.echo(f"{record['name']}: {record['n_images']} images, {record['seconds']:.0f} s")
    for attack, m in record["metrics"].items():
        meteor = "  n/a" if m["meteor"] is None else f"{m['meteor']:5.1f}"
        typer.echo(f"{record['name']:<32} {attack:<9} BLEU-4 {m['bleu4']:5.1f}  METEOR {meteor}  ROUGE-L "
                   f"{m['rouge_l']:5.1f}  CIDEr {m['cider']:6.1f}  ({m['setting']}, {m['seconds']:.0f} s)")
    for note in record["notes"]:
        typer.echo(f"  note: {note}")


@app.command()
def report(dataset: Dataset = "synth") -> None:
    """Gather MANIFESTS_DIR/<dataset>/evals/*.json into report.md, report.png and report.json; print the table."""
    from pipeline.evaluation.report import build_report

    result = _run(build_report, dataset, layout())
    typer.echo(result["markdown"])
    typer.echo("written: " + ", ".join(str(p) for p in result["paths"].values()))


# ------------------------------------------------------------------ the study (pipeline/study/)


@app.command()
@settings_command(StudyConfig)
def study(settings: StudyConfig) -> None:
    """The paper's comparisons as a resumable plan: defences table, augmentation table, figure, claims.

    Output: MANIFESTS_DIR/<dataset>/study/{plan.json, units/, report.md, report.json, augmentation_quality.png};
    rerun the same command after an interruption and the finished units are skipped. Settings: StudyConfig
    (pipeline/study/plan.py)."""
    from pipeline.study.failures import UnitsFailed
    from pipeline.study.run import run_study

    try:
        result = _run(run_study, settings, layout(), echo=typer.echo)
    except UnitsFailed as error:  # the work failed (exit 1); a rerun redoes only the missing units
        fail(f"{error}; rerun the same command to redo them", code=1)
    typer.echo(result["markdown"])


# ------------------------------------------------------------------ demo, bench, clean


@app.command()
@settings_command(DemoConfig)
def demo(settings: DemoConfig) -> None:
    """`make study` on the embedded `synth` dataset with small budgets: ingest, pretrain, augment, stats, study."""
    from pipeline.commands.demo import DemoError, run_demo

    folders = layout()

    def run_command(argv: list[str]) -> int:
        try:  # each phase writes into this invocation's folders
            code = typer.main.get_command(app).main(_layout_argv(folders) + argv, prog_name="mat-pipeline", standalone_mode=False)
        except typer.Exit as stop:  # raised by fail() inside a command
            code = stop.exit_code
        return code if isinstance(code, int) else 0

    try:
        run_demo(settings, run_command, folders, echo=typer.echo)
    except DemoError as error:
        fail(str(error))


@app.command()
def bench(
    only: Annotated[Optional[str], typer.Option(envvar=env("BENCH"), help="Comma-separated benchmark names (e.g. ingest,train); default all but the real-size ones, gpu and real (BENCH=gpu, BENCH=real).")] = None,
) -> None:
    """Run the package's own benchmarks/bench_*.py (not the current directory's) and write MANIFESTS_DIR/bench.json."""
    from pipeline.commands.bench import run_benchmarks

    figures = _run(run_benchmarks, layout().manifests_dir / "bench.json", only or None)
    typer.echo(json.dumps(figures, indent=1, sort_keys=True))


@app.command()
def clean(
    dataset: Annotated[Optional[str], typer.Option("--dataset", envvar=env("DATASET"), callback=_plain("dataset"), help="Only this dataset (default: all outputs).")] = None,
) -> None:
    """Remove what the pipeline wrote (shards, manifests, runs, models; of one dataset, or all) and list it.

    Only what the ledgers (.mat-pipeline) inside SHARDS_DIR, MANIFESTS_DIR, RUNS_DIR and MODELS_DIR record as
    written by the pipeline goes (pipeline/commands/clean.py); other files, and the folders holding them, stay.
    """
    from pipeline.commands.clean import clean as run_clean

    for line in run_clean(layout(), dataset).lines():
        typer.echo(line)


def main() -> None:
    stop_on_signals()
    app()


if __name__ == "__main__":
    main()
