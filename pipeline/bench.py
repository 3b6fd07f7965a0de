"""`make bench`: run every benchmarks/bench_*.py `run()` and merge the figures into one flat JSON object."""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

from pipeline.shards import atomic_write_json

log = logging.getLogger(__name__)


def run_benchmarks(directory: Path, output: Path, only: str | None = None) -> dict[str, Any]:
    wanted = {name.strip() for name in only.split(",")} if only else None
    figures: dict[str, Any] = json.loads(output.read_text()) if output.exists() and wanted else {}
    for path in sorted(directory.glob("bench_*.py")):
        name = path.stem.removeprefix("bench_")
        if wanted and name not in wanted:
            continue
        spec = importlib.util.spec_from_file_location(f"benchmarks.{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        log.info("benchmark %s ...", name)
        started = time.perf_counter()
        try:
            results = module.run()
        except Exception as error:  # one broken benchmark must not hide the others' figures
            log.exception("benchmark %s failed", name)
            results = {f"{name}_error": f"{type(error).__name__}: {error}"}
        figures.update(results)
        log.info("benchmark %s: %.1f s", name, time.perf_counter() - started)
    atomic_write_json(output, figures)
    return figures
