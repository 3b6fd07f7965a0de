"""i2t-internvl: new captions for each image, written by an InternVL vision-language model.

Backends (`backend`): `transformers` (InternVL "-hf" checkpoints, runs anywhere, used by the tests) and `lmdeploy`
(TurboMind / PyTorch engine on an NVIDIA GPU, from its own environment). See pipeline/augment/captioning.py.
lmdeploy loads InternVL checkpoints with `trust_remote_code=True` internally (the checkpoint's own Python code
runs), so that backend takes only a local checkpoint directory unless `trust_remote_code` is set
(`--trust-remote-code` / TRUST_REMOTE_CODE=1 on `augment`).

Each image gets `captions_per_image` sampled captions; caption n is sampled with seed `seed_for(key, n)`, and the
sampling of a row depends only on that seed (not on the batch), so reruns and resumes give the same text. All
(image, n) rows of a batch go through one model call. A generated caption describes the image, so its
`caption_index` is None (it pairs with the image, not with one human caption). Raw outputs are cleaned
(first sentence, `max_words`), and empty / too short / repetitive / prompt-echo outputs are not emitted but
recorded in `skipped` with the reason and the raw text.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline.augment.captioning import (
    CAPTIONERS,
    DEFAULT_PROMPT,
    DTYPES,
    LmdeployCaptioner,
    CaptionSettings,
    checkpoint_problem,
    checkpoint_revision,
    clean_caption,
    remote_code_problem,
    resolve_checkpoint,
)
from pipeline.core.config import check_choice, check_device, check_non_negative, check_positive, check_range
from pipeline.augment.stage import BaseSample, SampleResult, Stage, StageContext, Variant

DEFAULT_MODEL = "OpenGVLab/InternVL3-1B-hf"


@dataclass(frozen=True)
class InternVLCaptionConfig:
    model: str = DEFAULT_MODEL  # the CLI passes I2T_MODEL
    backend: str = "transformers"
    engine: str = "turbomind"  # lmdeploy only: turbomind | pytorch
    prompt: str = DEFAULT_PROMPT
    captions_per_image: int = 2
    max_new_tokens: int = 40
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    max_dynamic_patch: int = 1
    max_words: int = 30
    min_words: int = 3
    batch_size: int = 16
    dtype: str = "auto"
    device: str = "auto"
    # lmdeploy only: accept a non-local checkpoint whose code lmdeploy runs (trust_remote_code=True). Says whom
    # to trust, not what to compute: left out of the settings fingerprint.
    trust_remote_code: bool = field(default=False, metadata={"fingerprint": False})

    def __post_init__(self) -> None:
        check_choice("backend", self.backend, CAPTIONERS)
        check_choice("engine", self.engine, LmdeployCaptioner.ENGINES)
        if not self.prompt.strip():
            raise ValueError("prompt: must be a non-empty prompt")
        check_positive(self, "captions_per_image", "max_new_tokens", "temperature", "top_p", "max_dynamic_patch",
                       "min_words", "batch_size")
        check_range("temperature", self.temperature, 0.0, 2.0)
        check_range("top_p", self.top_p, 0.0, 1.0)
        check_non_negative(self, "top_k")  # 0 = off
        if self.max_words < self.min_words:
            raise ValueError(f"max_words={self.max_words!r}: must be >= min_words ({self.min_words})")
        check_choice("dtype", self.dtype, DTYPES)
        check_device("device", self.device)

    def settings(self) -> CaptionSettings:
        return CaptionSettings(
            prompt=self.prompt, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k, max_dynamic_patch=self.max_dynamic_patch,
        )


class InternVLCaptionStage(Stage):
    name: ClassVar[str] = "i2t-internvl"
    modality: ClassVar[str] = "text"
    Config = InternVLCaptionConfig

    def __init__(self, config: InternVLCaptionConfig, context: StageContext):
        super().__init__(config, context)
        self.captioner: Any = None

    @classmethod
    def availability(cls, config: InternVLCaptionConfig) -> tuple[bool, str]:
        if config.backend == "lmdeploy":
            refused = None if config.trust_remote_code else remote_code_problem(config.model)
            if refused:
                return False, refused
            try:
                importlib.metadata.version("lmdeploy")
            except importlib.metadata.PackageNotFoundError:
                return False, "backend lmdeploy needs `pip install lmdeploy` in its own environment on a GPU node"
            import torch

            if not torch.cuda.is_available():
                return False, "backend lmdeploy needs an NVIDIA GPU; use backend=transformers on this machine"
            # lmdeploy resolves hub ids itself; only a missing local directory is caught here
            problem = checkpoint_problem(config.model, "I2T_MODEL", "config.json") if "/" in config.model else None
        else:
            problem = checkpoint_problem(config.model, "I2T_MODEL", "config.json")
        return (problem is None), (problem or "")

    def setup(self) -> None:
        c = self.config
        device = self.context.device if c.device == "auto" else c.device
        self.captioner = CAPTIONERS[c.backend](
            resolve_checkpoint(c.model, "I2T_MODEL", "config.json"), c.settings(),
            device=device, dtype=c.dtype, engine=c.engine, max_batch_size=c.batch_size * c.captions_per_image,
            trust_remote_code=c.trust_remote_code,
        )

    def augment_batch(self, samples: list[BaseSample]) -> list[SampleResult]:
        if self.captioner is None:
            self.setup()
        n = self.config.captions_per_image
        rows = [(sample, v) for sample in samples for v in range(n)]
        seeds = [self.seed_for(sample.key, v) for sample, v in rows]
        raw = self.captioner([s.image() for s, _ in rows], [s.image_bytes for s, _ in rows], seeds)
        results = [SampleResult() for _ in samples]
        for i, ((_, v), seed, text) in enumerate(zip(rows, seeds, raw)):
            result = results[i // n]
            caption, reason = clean_caption(text, self.config.prompt, self.config.max_words, self.config.min_words)
            if caption is None:
                result.skipped.append({"caption_index": None, "variant": v, "reason": reason, "raw": text[:200]})
            elif any(caption == earlier.text for earlier in result.variants):
                result.skipped.append({"caption_index": None, "variant": v, "reason": "duplicate"})
            else:
                result.variants.append(Variant(seed=seed, op=f"internvl-{self.config.backend}", caption_index=None,
                                               text=caption, extra={"variant": v}))
        return results

    def describe(self) -> dict[str, Any]:
        c = self.config
        info: dict[str, Any] = {
            "model": c.model, "backend": c.backend, "prompt": c.prompt,
            "generation": {"captions_per_image": c.captions_per_image, "max_new_tokens": c.max_new_tokens,
                           "temperature": c.temperature, "top_p": c.top_p, "top_k": c.top_k,
                           "max_dynamic_patch": c.max_dynamic_patch, "sampler": "per-row seeded Gumbel-max"
                           if c.backend == "transformers" else "lmdeploy random_seed per request"},
            "revision": checkpoint_revision(c.model, "config.json"),
        }
        for package in ("transformers", "torch", "lmdeploy"):
            try:
                info[f"{package}_version"] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                pass
        if self.captioner is not None:
            info.update(self.captioner.describe())
        return info

