"""Ingest throughput (images/s) on the coco-mini fixture and on the embedded synth dataset."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from pipeline.data.ingest import IngestConfig, run_ingest
from pipeline.core.paths import Layout
from pipeline.core.executor import RunOptions

COCO_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-mini"


def _images_per_s(config: IngestConfig, workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        layout = Layout(Path(tmp) / "shards", Path(tmp) / "manifests")
        started = time.perf_counter()
        manifest = run_ingest(config, layout, RunOptions(workers=workers))
        return manifest["counts"]["written"] / (time.perf_counter() - started)


def run() -> dict[str, float]:
    figures = {"ingest_images_per_s_synth": round(_images_per_s(IngestConfig(dataset="synth", synth_size=2000), 2), 1)}
    if COCO_MINI.exists():
        figures["ingest_images_per_s_coco"] = round(_images_per_s(IngestConfig(dataset="coco", data_root=COCO_MINI), 1), 1)
    return figures
