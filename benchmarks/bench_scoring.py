"""Scoring throughput relative to the bare CLIP encoder forward at the same batch size (small CLIP, synth).

An image stage's shard is scored end to end (`Scorer.score_shard`: JPEG decode, resize, encode base images,
variant images and captions, cosines, Mahalanobis shift, float64 feature sums) and compared with the encoder
forward alone on the same images and captions already turned into tensors, under the same bf16 autocast.
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

import torch
from PIL import ImageOps

from pipeline.data.ingest import IngestConfig, run_ingest
from pipeline.models.device import autocast
from pipeline.models.hf import build_clip, train_tokenizers
from pipeline.core.paths import Layout
from pipeline.augment.scoring import Scorer, ScorerConfig
from pipeline.core.shards import list_shards, read_tar
from pipeline.augment.stage import BaseSample, SampleResult, Variant
from pipeline.core.executor import RunOptions
from pipeline.core.schema import read_captions

IMAGES = 512
BATCH = 64


def _best_of_interleaved(first, second, repeats: int = 5) -> tuple[float, float]:
    """Best time of each, alternating runs so that load from other processes hits both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, bucket in zip((first, second), times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def _flipped(sample: BaseSample) -> bytes:
    buffer = io.BytesIO()
    ImageOps.mirror(sample.image()).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def run() -> dict[str, float]:
    # One intra-op thread: on shared 2-core machines two OpenMP threads per process made timings swing ~15x.
    # The scorer's batch-preparing thread then has the other core, as a DataLoader worker would.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure()
    finally:
        torch.set_num_threads(threads)


def _measure() -> dict[str, float]:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        layout = Layout(shards_dir=Path(tmp) / "shards", manifests_dir=Path(tmp) / "manifests")
        run_ingest(IngestConfig(dataset="synth", synth_size=IMAGES), layout, RunOptions(workers=1))
        base_dir = layout.base_dir("synth")
        tokenizer, _ = train_tokenizers(read_captions(base_dir), vocab_size=300)
        model_dir = build_clip("small", tokenizer).save(Path(tmp) / "clip")
        scorer = Scorer(ScorerConfig(model=str(model_dir), batch_size=BATCH, device="cpu"), layout.dataset_manifests("synth"))
        scorer.prepare(base_dir)
        samples = [BaseSample.from_tar_sample(s) for tar in list_shards(base_dir) for s in read_tar(tar)]
        results = [SampleResult([Variant(0, "flip", None, image_jpeg=_flipped(s))]) for s in samples]

        bundle = scorer.bundle
        images = [s.image() for s in samples] + [ImageOps.mirror(s.image()) for s in samples]
        pixels = [bundle.preprocess(images[i : i + BATCH]) for i in range(0, len(images), BATCH)]
        texts = [s.captions[0] for s in samples]
        tokens = [bundle.tokenize(texts[i : i + BATCH]) for i in range(0, len(texts), BATCH)]

        def bare() -> None:
            with torch.inference_mode(), autocast("cpu"):
                for batch in pixels:
                    bundle.image_features(batch)
                for batch in tokens:
                    bundle.text_features(batch)

        scored, encoder = _best_of_interleaved(lambda: scorer.score_shard(samples, results, "image"), bare)
    return {
        "scoring_vs_encoder": round(encoder / scored, 3),
        "scoring_pairs_per_s": round(len(samples) / scored, 1),
    }


if __name__ == "__main__":
    print(run())
