"""Real-size figures for GPU users: `make bench BENCH=gpu` on whatever device is present (CUDA when there is one).

Architectures are built from their configs with random weights (costs do not depend on the weights):
CLIP ViT-B/16 (224 px, 77-token text tower, 49,408-token vocabulary), a bert-base masked LM (30,522 tokens),
Stable Diffusion 1.5's UNet + VAE with its CLIP ViT-L/14 text encoder at 512 px, and InternVL3-1B
(InternViT-300M at 448 px + a Qwen2.5-0.5B-sized language model with tied embeddings, transformers' InternVL
classes): 149.6 M, 109.5 M, 859.5 M + 83.7 M + 123.1 M and 802 M parameters. Tokenizers are trained offline on
synth captions (a few hundred tokens; the embedding tables keep the real sizes).

Everything runs through the project's own code: `pipeline.train.loop.train_step` with `build_mode` (ft, tecoa,
mat), `pipeline.attacks.build_attack` (pgd, coattack, sga), `stages.t2i_sd.StableDiffusionStage` and
`stages.i2t_internvl.InternVLCaptionStage` (transformers backend) loading checkpoints saved here.

Figures (``gpu_`` prefix): per mode, step time and peak memory at ``batch`` (128 real), and the largest batch
that fits (doubling from ``batch`` until out of memory, at most ``max_batch``); attacked images/s per attack
(fp32 and the attacks' evaluation settings, as `make eval` runs them); SD images/s at 20 steps; InternVL
captions/s (random weights rarely stop early, so every caption is
``max_new_tokens`` long: a lower bound on a trained model's rate). Times are wall seconds, synchronised, best of
``repeats`` after a warm-up. Peak memory is torch's allocator peak on CUDA; on a CPU it is the process's peak
resident set so far (an upper bound).

``GPU_BENCH_SIZE=tiny|real`` (make forwards it as ``MAT_GPU_BENCH_SIZE``, as ``DEVICE``) (default: real on CUDA, tiny elsewhere). The tiny size (small models, batch 8, one
PGD step in the attacks, 2 SD steps) runs in the test suite on CPU, so this script cannot rot; its figures
measure nothing. The real size is meant for a GPU: on a CPU it would take hours and the doubling search for
the largest batch would end in the kernel's out-of-memory killer, not in an exception.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertTokenizer, CLIPConfig, CLIPModel

from pipeline.attacks import build_attack
from pipeline.core.images import encode_jpeg
from pipeline.models.device import autocast, resolve_device, resolve_precision
from pipeline.models.hf import CLIPBundle, MLMBundle, train_tokenizers
from pipeline.data.sources.synth import captions_for, sample_params
from pipeline.augment.stage import BaseSample, StageContext
from pipeline.augment.tiny_models import INTERNVL_CHAT_TEMPLATE, build_tiny_internvl
from pipeline.train.config import TrainConfig
from pipeline.train.loop import train_step
from pipeline.train.modes import DualEncoder, build_mode
from stages.i2t_internvl import InternVLCaptionConfig, InternVLCaptionStage
from stages.t2i_sd import StableDiffusionConfig, StableDiffusionStage

log = logging.getLogger(__name__)

MODES = ("ft", "tecoa", "mat")
ATTACKS = ("pgd", "coattack", "sga")

_VIT_B16 = {
    "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   patch_size=16, image_size=224),
    "text": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                 max_position_embeddings=77, vocab_size=49408),
    "projection_dim": 512,
}
_TINY_CLIP = {
    "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   patch_size=8, image_size=32),
    "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, vocab_size=2000),
    "projection_dim": 32,
}
SIZES: dict[str, dict[str, Any]] = {
    "real": {
        "clip": _VIT_B16,
        "mlm": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    max_position_embeddings=512, vocab_size=30522),
        "batch": 128, "max_batch": 4096, "attack_images": 128, "attack_options": {}, "repeats": 3,
        "sd": {"unet": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                            attention_head_dim=8, sample_size=64),
               "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
                           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
               "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            projection_dim=768, hidden_act="quick_gelu", vocab_size=49408),
               "pixels": 512, "batch": 8, "steps": 20},
        "internvl": {"text": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                  num_key_value_heads=2, vocab_size=151674, rope_theta=1e6),
                     "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                    num_attention_heads=16, image_size=[448, 448], patch_size=[14, 14]),
                     "tile": 448, "image_seq_length": 256, "images": 32, "max_new_tokens": 40},
    },
    "tiny": {
        "clip": _TINY_CLIP,
        "mlm": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, vocab_size=2000),
        "batch": 8, "max_batch": 16, "attack_images": 4, "attack_options": {"steps": 1}, "repeats": 1,
        "sd": {"unet": dict(block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=32, sample_size=8,
                            attention_head_dim=2, norm_num_groups=4,
                            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
               "vae": dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=32, norm_num_groups=4,
                           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
               "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            projection_dim=32, hidden_act="quick_gelu", vocab_size=2000),
               "pixels": 32, "batch": 2, "steps": 2},
        "internvl": {"text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=1000),
                     "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=[32, 32], patch_size=[4, 4]),
                     "tile": 32, "image_seq_length": 16, "images": 2, "max_new_tokens": 8},
    },
}


def expected_figures() -> list[str]:
    """The numeric figures `run()` reports (the test checks each is present and positive)."""
    train = [f"gpu_{m}_{what}" for m in MODES for what in ("step_s", "peak_mem_gb", "max_batch")]
    return [*train, *(f"gpu_attack_{a}_images_per_s" for a in ATTACKS), "gpu_sd_images_per_s",
            "gpu_internvl_captions_per_s"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, optimiser state
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return best


def _peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _captions(n: int) -> list[str]:
    rng = random.Random(0)
    return [captions_for(sample_params(rng), seed=i)[0] for i in range(n)]


def _models(size: dict[str, Any], device: torch.device) -> tuple[CLIPBundle, MLMBundle]:
    clip_tok, bert_tok = train_tokenizers(_captions(500), vocab_size=300)
    spec = size["clip"]
    text = dict(spec["text"], bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                pad_token_id=clip_tok.pad_token_id)
    clip_tok.model_max_length = text["max_position_embeddings"]
    config = CLIPConfig(text_config=text, vision_config=spec["vision"], projection_dim=spec["projection_dim"])
    clip = CLIPBundle(model=CLIPModel(config), tokenizer=clip_tok, image_size=spec["vision"]["image_size"])
    # The masked LM proposes ids from its whole vocabulary: give each a token, as BERT's [unusedN] ones.
    vocab = bert_tok.get_vocab()
    vocab.update({f"[unused{i}]": i for i in range(len(vocab), size["mlm"]["vocab_size"])})
    bert_tok = BertTokenizer(vocab=vocab)
    mlm = MLMBundle(model=BertForMaskedLM(BertConfig(**size["mlm"], pad_token_id=bert_tok.pad_token_id)).eval(),
                    tokenizer=bert_tok)
    return clip.to(device), mlm.to(device)


def _train_figures(size: dict[str, Any], clip: CLIPBundle, mlm: MLMBundle, device: torch.device) -> dict[str, Any]:
    bf16 = resolve_precision("auto", device) == "bf16"
    captions = _captions(size["max_batch"])
    net = DualEncoder(clip).train()
    figures: dict[str, Any] = {"gpu_train_precision": "bf16" if bf16 else "fp32"}
    for name in MODES:
        for param in net.parameters():
            param.requires_grad_(True)
        mode = build_mode(TrainConfig(mode=name), clip, mlm)
        mode.prepare(clip.model)  # as training does: freeze what the mode does not train
        optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)

        def step(batch: int) -> None:
            images = torch.rand(batch, 3, clip.image_size, clip.image_size)
            optimizer.zero_grad(set_to_none=True)
            train_step(net, mode, [{"images": images, "texts": captions[:batch]}], bf16, device)
            optimizer.step()

        _free(device)
        figures[f"gpu_{name}_step_s"] = _best_seconds(lambda: step(size["batch"]), device, size["repeats"])
        figures[f"gpu_{name}_peak_mem_gb"] = _peak_gb(device)
        figures[f"gpu_{name}_max_batch"] = _largest_batch(step, size["batch"], size["max_batch"], device)
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()  # free the Adam moments before the next mode (`step` still refers to the optimizer)
    net.eval()
    return figures


def _largest_batch(step: Callable[[int], None], start: int, cap: int, device: torch.device) -> int:
    fits, batch = 0, start
    while batch <= cap:
        try:
            step(batch)
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            _free(device)
        fits, batch = batch, batch * 2
    return fits


def _attack_figures(size: dict[str, Any], clip: CLIPBundle, mlm: MLMBundle, device: torch.device) -> dict[str, float]:
    n = size["attack_images"]
    groups = [_captions(5 * n)[5 * i: 5 * i + 5] for i in range(n)]
    images = torch.rand(n, 3, clip.image_size, clip.image_size, device=device)
    figures = {}
    with autocast(device, "fp32"):
        for name in ATTACKS:
            attack = build_attack(name, **size["attack_options"])
            seconds = _best_seconds(lambda: attack(clip, mlm, images, groups), device, size["repeats"])
            figures[f"gpu_attack_{name}_images_per_s"] = n / seconds
    return figures


def _samples(n: int, height: int, width: int) -> list[BaseSample]:
    rng = np.random.RandomState(0)
    captions = _captions(n)
    pixels = [(rng.rand(height, width, 3) * 255).astype("uint8") for _ in range(n)]
    return [BaseSample(f"bench_{i:06d}", encode_jpeg(Image.fromarray(p), 95), [captions[i]], {"primary": 0})
            for i, p in enumerate(pixels)]


def _save_sd(spec: dict[str, Any], out: Path) -> Path:
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = train_tokenizers(_captions(500), vocab_size=300)[0]
    tokenizer.model_max_length = 77
    text = CLIPTextModel(CLIPTextConfig(**spec["text"], max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **spec["vae"]), text_encoder=text,
        tokenizer=tokenizer, unet=UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"]),
        scheduler=DPMSolverMultistepScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(out)  # half the disk; the stage loads in its own dtype
    return out


def _sd_figures(size: dict[str, Any], root: Path, device: torch.device) -> dict[str, float]:
    spec = size["sd"]
    config = StableDiffusionConfig(model=str(_save_sd(spec, root / "sd")), steps=spec["steps"], height=spec["pixels"],
                                   width=spec["pixels"], safety_checker=False, batch_size=spec["batch"],
                                   device=device.type)
    stage = StableDiffusionStage(config, StageContext("bench", device=device.type))
    stage.setup()
    samples = _samples(spec["batch"], 64, 64)
    seconds = _best_seconds(lambda: stage.augment_batch(samples), device, size["repeats"])
    return {"gpu_sd_images_per_s": len(samples) / seconds}


def _save_internvl(spec: dict[str, Any], root: Path) -> Path:
    from transformers import (GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLProcessor, InternVLVideoProcessor)

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_internvl(root / "internvl-tokenizer"))
    tile = {"height": spec["tile"], "width": spec["tile"]}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=tile, crop_to_patches=True, max_patches=12), tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=tile), image_seq_length=spec["image_seq_length"],
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = InternVLConfig(
        text_config=dict(model_type="qwen2", max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=pad, eos_token_id=eos, pad_token_id=pad, **spec["text"]),
        vision_config=spec["vision"], image_token_id=tokenizer.context_image_token_id,
        image_seq_length=spec["image_seq_length"], downsample_ratio=0.5,
    )
    model = InternVLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = pad, eos
    out = root / "internvl"
    model.to(torch.bfloat16).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _internvl_figures(size: dict[str, Any], root: Path, device: torch.device) -> dict[str, float]:
    spec = size["internvl"]
    config = InternVLCaptionConfig(model=str(_save_internvl(spec, root)), captions_per_image=2, min_words=1,
                                   max_new_tokens=spec["max_new_tokens"], batch_size=spec["images"], device=device.type)
    stage = InternVLCaptionStage(config, StageContext("bench", device=device.type))
    stage.setup()
    samples = _samples(spec["images"], 480, 640)
    seconds = _best_seconds(lambda: stage.augment_batch(samples), device, size["repeats"])
    return {"gpu_internvl_captions_per_s": 2 * len(samples) / seconds}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return device.type
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    return f"cpu: {model} ({torch.backends.cpu.get_cpu_capability()})"


def run() -> dict[str, Any]:
    device = resolve_device(os.environ.get("MAT_DEVICE", "auto"))
    name = os.environ.get("MAT_GPU_BENCH_SIZE") or ("real" if device.type == "cuda" else "tiny")
    if name not in SIZES:
        raise ValueError(f"GPU_BENCH_SIZE={name!r}: choose one of {sorted(SIZES)}")
    size = SIZES[name]
    log.info("gpu bench: %s size on %s", name, _device_name(device))
    torch.manual_seed(0)
    figures: dict[str, Any] = {"gpu_bench_size": name, "gpu_device": _device_name(device)}
    clip, mlm = _models(size, device)
    figures.update(_train_figures(size, clip, mlm, device))
    figures.update(_attack_figures(size, clip, mlm, device))
    del clip, mlm
    _free(device)
    with tempfile.TemporaryDirectory() as tmp:
        figures.update(_sd_figures(size, Path(tmp), device))
        _free(device)
        figures.update(_internvl_figures(size, Path(tmp), device))
    return figures


if __name__ == "__main__":
    import json

    logging.basicConfig(level=logging.INFO)
    print(json.dumps(run(), indent=1))
