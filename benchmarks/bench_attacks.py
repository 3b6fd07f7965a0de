"""Attack throughput at the evaluation defaults, small CLIP on synth.

A random-init `small` CLIP and masked LM (the demo's sizes) with tokenizers trained on the synth captions; one
evaluation batch (the default ``EvalConfig.batch_size`` test images, 5 captions each, normalised) attacked the
way `make eval` does it (:func:`pipeline.evaluation.evaluate.attacked_embeddings`: the attack with its published defaults,
then the adversarial images and captions embedded), at the evaluation's default precision (fp32). The cost of an
attack does not depend on the weights being trained. Figures: attacked images per second for each attack, and
its cost per image relative to one clean forward (embedding the images and their captions).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from pipeline.evaluation.config import DEFAULT_ATTACKS
from pipeline.evaluation.evaluate import EvalConfig, attacked_embeddings, embed, load_test_set
from pipeline.data.ingest import IngestConfig, run_ingest
from pipeline.models.device import autocast
from pipeline.models.hf import build_clip, build_mlm, train_tokenizers
from pipeline.core.paths import Layout
from pipeline.core.executor import RunOptions
from pipeline.core.schema import read_captions


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run() -> dict[str, float]:
    torch.manual_seed(0)
    cfg = EvalConfig(checkpoint="random-init small", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        layout = Layout(shards_dir=Path(tmp) / "shards", manifests_dir=Path(tmp) / "manifests")
        run_ingest(IngestConfig(dataset="synth", synth_size=cfg.batch_size * 10), layout, RunOptions(workers=1))
        clip_tok, bert_tok = train_tokenizers(read_captions(layout.base_dir("synth")), vocab_size=300)
        clip, mlm = build_clip("small", clip_tok), build_mlm("small", bert_tok)
        data = load_test_set(layout.base_dir("synth"), "test", clip, cfg.batch_size, cfg.normalise_captions)
    n = len(data.keys)
    texts = [c for group in data.captions for c in group]
    with autocast("cpu", cfg.precision):
        clean = _best_of(lambda: embed(clip, data.images, texts, cfg.batch_size), repeats=3)
    figures = {"attack_clean_forward_ms_per_image": round(1000 * clean / n, 2)}
    for attack in DEFAULT_ATTACKS:
        seconds = _best_of(lambda: attacked_embeddings(clip, mlm, data, attack, cfg), repeats=1)
        figures[f"attack_images_per_s_{attack}"] = round(n / seconds, 2)
        figures[f"attack_cost_{attack}"] = round(seconds / clean, 1)
    return figures
