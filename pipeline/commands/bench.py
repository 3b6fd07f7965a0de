"""`make bench`: run the package's own benchmarks and merge their figures into one flat JSON object.

The benchmarks are the ``bench_*.py`` files of the ``benchmarks/`` folder beside the ``pipeline`` package (the
source checkout that ``pip install -e .`` points at), found from this file's location, never from the current
directory: running ``make bench`` from elsewhere must not execute whatever ``benchmarks/`` lies there. Each
module's ``run()`` returns a dict of named figures; the file also holds this run's ``provenance``. ``BENCH=name1,name2`` runs only those (and updates the
existing file); benchmarks in ``ON_REQUEST`` (``gpu``: real-size models, minutes on a GPU, hours on a CPU;
``real``: real-size training step ratios on the CPU, minutes) run only when named.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.core.fileio import atomic_write_json
from pipeline.core.provenance import PROVENANCE_KEY, provenance
from pipeline.models.device import resolve_device

log = logging.getLogger(__name__)

BENCHMARKS_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
ON_REQUEST = frozenset({"gpu", "real"})


def available(directory: Path | None = None) -> dict[str, Path]:
    """Benchmark name -> file, from the package's benchmarks folder (or ``directory``)."""
    directory = directory or BENCHMARKS_DIR
    if not directory.is_dir():
        raise FileNotFoundError(f"no benchmarks folder at {directory}: the benchmarks ship with the source "
                                f"checkout; install it with `pip install -e .` (make setup) to run them")
    return {path.stem.removeprefix("bench_"): path for path in sorted(directory.glob("bench_*.py"))}


def select(names: dict[str, Path], only: str | None) -> list[str]:
    """The benchmarks to run: the comma-separated ``only``, or every one not in ON_REQUEST."""
    if not only:
        return [name for name in names if name not in ON_REQUEST]
    wanted = list(dict.fromkeys(name.strip() for name in only.split(",") if name.strip()))
    unknown = [name for name in wanted if name not in names]
    if unknown or not wanted:
        raise ValueError(f"BENCH={only!r}: unknown benchmark(s) {unknown}; choose from {sorted(names)}")
    return wanted


def load_benchmark(name: str, path: Path) -> Any:
    """The benchmark file `path` as the module `_mat_benchmarks.bench_<name>` (also for one benchmark using another's
    builders)."""
    module_name = f"_mat_benchmarks.bench_{name}"  # private: never shadows or reuses an importable module
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses in a benchmark look their module up here
    spec.loader.exec_module(module)
    return module


def run_benchmarks(output: Path, only: str | None = None, directory: Path | None = None) -> dict[str, Any]:
    names = available(directory)
    chosen = select(names, only)
    figures: dict[str, Any] = json.loads(output.read_text()) if output.exists() and only else {}
    threads = torch.get_num_threads()
    for name in chosen:
        log.info("benchmark %s ...", name)
        started = time.perf_counter()
        try:
            results = load_benchmark(name, names[name]).run()
        except Exception as error:  # one broken benchmark must not hide the others' figures
            log.exception("benchmark %s failed", name)
            results = {f"{name}_error": f"{type(error).__name__}: {error}"}
        finally:
            torch.set_num_threads(threads)  # several benchmarks time on one thread; the next gets the default back
        figures.update(results)
        log.info("benchmark %s: %.1f s", name, time.perf_counter() - started)
    figures[PROVENANCE_KEY] = provenance(resolve_device("auto"))  # of this run, also when it updates older figures
    atomic_write_json(output, figures)
    return figures
