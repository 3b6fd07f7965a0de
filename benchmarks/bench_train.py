"""Training step costs on the demo model and batch (small CLIP preset, batch 128, 64 px, CPU, precision
"auto": bf16 autocast only on a CPU with native bf16, see pipeline.models.resolve_precision).

* ``mat_over_ft_step``: MAT step time (BERT-Attack on the texts, 2-step PGD on the images, forward/backward)
  over FT step time (forward/backward), same model and batch. Target <= 2.5.
* ``text_attack_share``: BERT-Attack's share of the MAT step (training's default, the ``reference`` variant).
* ``mat_fast_over_ft_step``: the same with ``--set attack.text.variant=fast`` (the earlier training default,
  which always replaces a word and never attacks words of several pieces).
* ``bert_reference_over_fast``: the ``reference`` BERT-Attack over the ``fast`` one, same batch, goal and
  precision (the reference also embeds the clean captions for its importance scores, keeps walking when no
  candidate helps, and CLIP reads re-tokenised strings instead of edited token ids).
* ``loader_over_train``: samples/s of the shard loader (zip base + one text and one image stage, draw, decode,
  collate) over samples/s consumed by the FT step (the fastest mode, so the most demanding). Target >= 5.
  Measured in ONE process (no loader workers; `make train` runs two), so it is a lower bound.

Times are process CPU seconds, best of `repeats` (the machine is shared: wall time mostly measures neighbours).
Models: MODELS_DIR/synth/{clip,mlm} when `make pretrain` made them, else a random small CLIP and a masked LM
trained for a few steps here (a random masked LM proposes no candidates, which would make the text attack free).
Captions come from the synth dataset's generator, so word counts match the demo.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import torch

from pipeline.core.config import apply_overrides
from pipeline.curate.pairs import base_shard_urls
from pipeline.attacks import BERTAttack, image_similarity_goal
from pipeline.models.device import autocast, resolve_precision
from pipeline.models.hf import build_clip, build_mlm, load_clip, load_mlm, train_tokenizers
from pipeline.core.paths import Layout
from pipeline.data.sources.synth import captions_for, sample_params
from pipeline.train import data
from pipeline.train.config import PretrainConfig, TrainConfig
from pipeline.train.loop import train_step
from pipeline.train.modes import DualEncoder, build_mode
from pipeline.train.pretrain import train_mlm
from pipeline.train.toy import write_toy_shards

BATCH = 128


def _captions(n: int) -> list[str]:
    rng = random.Random(0)
    return [captions_for(sample_params(rng), seed=i)[0] for i in range(n)]


def _models(captions: list[str]):
    layout = Layout.from_env()
    clip_dir, mlm_dir = layout.model_dir("synth", "clip"), layout.model_dir("synth", "mlm")
    if clip_dir.is_dir() and mlm_dir.is_dir():
        return load_clip(clip_dir), load_mlm(mlm_dir), 1.0
    clip_tok, bert_tok = train_tokenizers(captions, 1000)
    mlm = build_mlm("small", bert_tok)
    train_mlm(mlm, captions, PretrainConfig(mlm_steps=60, mlm_batch_size=64), torch.device("cpu"))
    return build_clip("small", clip_tok), mlm, 0.0


def _best_step(mode, net, batch: dict, repeats: int) -> tuple[float, dict[str, float]]:
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5)
    best, timings = float("inf"), {}
    for index in range(repeats + 1):
        start = time.process_time()
        optimizer.zero_grad(set_to_none=True)
        row = train_step(net, mode, [batch], bf16=resolve_precision("auto", "cpu") == "bf16", device=torch.device("cpu"))
        optimizer.step()
        seconds = time.process_time() - start
        if index and seconds < best:  # the first step warms up allocators and tokenizer caches
            best, timings = seconds, {k: v for k, v in row.items() if k.endswith("_s")}
    return best, timings


def _text_attack_s(clip, mlm, batch: dict, variant: str, repeats: int) -> float:
    attack = BERTAttack(variant=variant)
    best = float("inf")
    with torch.no_grad(), autocast(torch.device("cpu"), resolve_precision("auto", "cpu")):
        goal = image_similarity_goal(clip.encode_images(batch["images"]).float())
        for _ in range(repeats):
            start = time.process_time()
            attack(clip, mlm, batch["texts"], goal)
            best = min(best, time.process_time() - start)
    return best


def _loader_samples_per_s(image_size: int, batches: int = 6) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        base = write_toy_shards(Path(tmp), shards=2, per_shard=2 * BATCH, image_size=image_size,
                                text_stage="txt", image_stage="img")
        urls = base_shard_urls(base, "train", ("txt", "img"))
        pipeline = data.build_pipeline(urls, batch_size=BATCH, image_size=image_size, stages=("txt", "img"),
                                       shuffle_buffer=BATCH)
        stream = iter(pipeline)
        next(stream)
        start = time.process_time()
        for _ in range(batches):
            next(stream)
        return batches * BATCH / (time.process_time() - start)


def run(repeats: int = 3) -> dict[str, float]:
    torch.manual_seed(0)
    captions = _captions(2000)
    clip, mlm, pretrained = _models(captions)
    batch = {"images": torch.rand(BATCH, 3, clip.image_size, clip.image_size), "texts": captions[:BATCH]}
    net = DualEncoder(clip).train()
    ft_s, _ = _best_step(build_mode(TrainConfig(mode="ft"), clip), net, batch, repeats)
    mat = build_mode(TrainConfig(mode="mat"), clip, mlm)
    mat.clock = time.process_time
    mat_s, timings = _best_step(mat, net, batch, repeats)
    mat_fast = build_mode(apply_overrides(TrainConfig(mode="mat"), ["attack.text.variant=fast"]), clip, mlm)
    mat_fast_s, _ = _best_step(mat_fast, net, batch, repeats)
    loader = _loader_samples_per_s(clip.image_size)
    fast_s, reference_s = (_text_attack_s(clip, mlm, batch, v, repeats) for v in ("fast", "reference"))
    return {
        "mat_over_ft_step": mat_s / ft_s,
        "mat_fast_over_ft_step": mat_fast_s / ft_s,
        "text_attack_share": timings["text_attack_s"] / max(mat_s, 1e-9) if timings else 0.0,
        "bert_reference_over_fast": reference_s / fast_s,
        "loader_over_train": loader / (BATCH / ft_s),
        "ft_step_cpu_s": ft_s,
        "mat_step_cpu_s": mat_s,
        "train_pretrained_models": pretrained,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
