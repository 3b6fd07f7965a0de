"""Attack cost per image relative to one clean forward (embedding the image and its captions), small CLIP on synth.

A random-init `small` CLIP and masked LM (the demo's sizes) with tokenizers trained on the synth captions; 32
test images with their 5 captions each; the cost of an attack does not depend on the weights being trained.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from pipeline.attacks import build_attack
from pipeline.evaluate import embed, load_test_set
from pipeline.ingest import IngestConfig, run_ingest
from pipeline.models import autocast, build_clip, build_mlm, train_tokenizers
from pipeline.paths import Layout
from pipeline.stage import RunOptions
from pipeline.train.pretrain import read_captions

IMAGES = 32
NAMES = {"pgd": "attack_cost_pgd", "bert": "attack_cost_bert", "coattack": "attack_cost_coattack",
         "sga": "attack_cost_sga"}


def _best_of(fn, repeats: int = 2) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run() -> dict[str, float]:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        layout = Layout(shards_dir=Path(tmp) / "shards", manifests_dir=Path(tmp) / "manifests")
        run_ingest(IngestConfig(dataset="synth", synth_size=IMAGES * 10), layout, RunOptions(workers=1))
        clip_tok, bert_tok = train_tokenizers(read_captions(layout.base_dir("synth")), vocab_size=300)
        clip, mlm = build_clip("small", clip_tok), build_mlm("small", bert_tok)
        data = load_test_set(layout.base_dir("synth"), "test", clip, IMAGES)
    texts = [c for group in data.captions for c in group]
    with autocast("cpu"):
        clean = _best_of(lambda: embed(clip, data.images, texts, IMAGES), repeats=3)
        figures = {}
        for attack, figure in NAMES.items():
            attacker = build_attack(attack)
            cost = _best_of(lambda: attacker(clip, mlm, data.images, data.captions), repeats=1)
            figures[figure] = round(cost / clean, 1)
    figures["attack_clean_forward_ms_per_image"] = round(1000 * clean / len(data.keys), 2)
    return figures
