"""Caption generation for `i2t-internvl`: checkpoint resolution, the two backends, and output clean-up.

Backends (registry `CAPTIONERS`) take a batch of images and one seed per requested caption and return raw texts:

- `transformers`: InternVL "-hf" checkpoints through AutoModelForImageTextToText + the processor's chat template,
  left padding, one batched `generate` over all (image, caption) rows. Sampling is done by `RowSeededSampler`, so
  each row's caption depends only on its own seed, not on the batch it happens to share (resume with another batch
  size gives the same captions).
- `lmdeploy`: `lmdeploy.pipeline` with a TurboMind or PyTorch engine, one request per row with its own
  `GenerationConfig(random_seed=...)`. lmdeploy is imported lazily (it pins an older torch and lives in its own
  environment); the real engine needs an NVIDIA GPU, so here it is exercised only against a stand-in in the tests.
"""

from __future__ import annotations

import base64
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from PIL import Image

from pipeline.models.device import resolve_device
from pipeline.models.errors import ModelNotFoundError, looks_like_path

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Describe this image in one short factual sentence, like a photo caption."

_TRUE = {"1", "on", "yes", "true"}


# --- checkpoints, device, dtype (shared with t2i-sd) -------------------------------------------------------------


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def checkpoint_problem(model: str, env_var: str, marker: str) -> str | None:
    """Why `model` cannot be loaded here (None when it can). `marker` is a file every checkpoint of the kind has."""
    how = (
        f"set {env_var} to a local directory holding the checkpoint (save_pretrained layout), or to a hub id "
        f"already in the Hugging Face cache (HF_HOME, now {os.environ.get('HF_HOME', '~/.cache/huggingface')})"
    )
    if not model:
        return f"no model given: {how}"
    path = Path(model).expanduser()
    if path.is_dir():
        return None if (path / marker).is_file() else f"{path} has no {marker}: {how}"
    if looks_like_path(model):
        return f"model directory {model} does not exist: {how}"
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, marker), str):
            return f"{model} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it: {how}"
    return None


class RemoteCodeRefused(ValueError):
    """A checkpoint whose own Python code would run, refused because it was not reviewed (not a local folder)."""


def remote_code_problem(model: str) -> str | None:
    """Why the lmdeploy backend refuses `model` without --trust-remote-code (None for a local directory).

    lmdeploy builds InternVL pipelines with `trust_remote_code=True` internally: the modelling code that ships
    with the checkpoint runs in this process. A local directory is code the user has in hand and can read; a hub
    id is fetched code nobody here looked at.
    """
    if Path(model).expanduser().is_dir():
        return None
    return (f"backend lmdeploy loads InternVL checkpoints with trust_remote_code=True (the checkpoint's own Python "
            f"code runs here), and {model!r} is not a local directory: download it, review its *.py files and set "
            "I2T_MODEL to the folder, or accept its code with --trust-remote-code (TRUST_REMOTE_CODE=1)")


def resolve_checkpoint(model: str, env_var: str, marker: str) -> str:
    problem = checkpoint_problem(model, env_var, marker)
    if problem:
        raise ModelNotFoundError(problem)
    path = Path(model).expanduser()
    return str(path) if path.is_dir() else model


def checkpoint_revision(model: str, marker: str) -> str | None:
    """The hub commit of a cached hub checkpoint (None for a local directory or one not in the cache)."""
    if Path(model).expanduser().is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(model, marker)
    except ValueError:  # not a valid repo id
        return None
    parts = Path(path).parts if isinstance(path, str) else ()
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" is bf16 on CUDA (fp16 where bf16 is missing) and fp32 on CPU."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


DTYPES = ("auto", "float32", "float16", "bfloat16")


# --- generation settings and clean-up ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionSettings:
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 40
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    max_dynamic_patch: int = 1  # InternVL tiles per image (+ thumbnail when > 1): the main cost knob


_SENTENCE_END = re.compile(r"(?<=[.!?])\s|\n")
_WORD = re.compile(r"[a-z0-9']+")
_GARBLED = re.compile("[\ufffd\x00-\x08\x0b-\x1f\x7f]")  # broken byte decoding, control characters


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _is_repetitive(words: list[str]) -> bool:
    if any(a == b == c for a, b, c in zip(words, words[1:], words[2:])):
        return True
    if len(words) >= 6:
        bigrams = list(zip(words, words[1:]))
        return len(set(bigrams)) <= len(bigrams) // 2
    return False


def clean_caption(raw: str, prompt: str, max_words: int = 30, min_words: int = 3) -> tuple[str | None, str]:
    """(caption, "") or (None, reason): strip, keep the first sentence, cap the length, reject degenerate text."""
    text = re.sub(r"^[\s\"'`]*(caption|answer)\s*:\s*", "", raw, flags=re.IGNORECASE)
    text = _SENTENCE_END.split(text.strip(), maxsplit=1)[0]
    text = re.sub(r"\s+", " ", text).strip(" \"'`")
    words = text.split(" ") if text else []
    if len(words) > max_words:
        text = " ".join(words[:max_words]).rstrip(",;:")
    lowered = _words(text)
    if not lowered:
        return None, "empty"
    if _GARBLED.search(text):
        return None, "garbled"
    if len(lowered) < min_words:
        return None, "too_short"
    if _is_repetitive(lowered):
        return None, "repetition"
    prompt_words = _words(prompt)
    if " ".join(lowered) in " ".join(prompt_words) or (
        len(lowered) >= 3 and sum(w in set(prompt_words) for w in lowered) >= 0.8 * len(lowered)
    ):
        return None, "prompt_echo"
    return text, ""


# --- transformers backend ------------------------------------------------------------------------------------------


class RowSeededSampler:
    """Logits processor that samples each row with its own torch.Generator (Gumbel-max trick).

    generate() runs greedy (do_sample=False); this processor applies temperature / top-k / top-p and adds Gumbel noise
    drawn from the row's generator, so argmax picks a sample from the warped distribution. Each generator advances once
    per step whatever the other rows do, so a row's text depends only on its seed and its own inputs.
    """

    def __init__(self, seeds: list[int], settings: CaptionSettings, device: torch.device):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(settings.temperature)])
        if settings.top_k > 0:
            self.warpers.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(settings.top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = self.warpers(input_ids, scores.float())
        vocab = scores.shape[-1]
        u = torch.stack([torch.rand(vocab, generator=g, device=scores.device) for g in self.generators])
        return scores - torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


class TransformersCaptioner:
    name: ClassVar[str] = "transformers"

    def __init__(self, model: str, settings: CaptionSettings, device: str = "auto", dtype: str = "auto", **_: Any):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.settings = settings
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        offline = hub_offline()
        self.processor = AutoProcessor.from_pretrained(model, local_files_only=offline)
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=self.dtype, local_files_only=offline)
        self.model.to(self.device).eval()
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": settings.prompt}]}]
        self.chat_prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def prepare(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Processor inputs for rows of (image, prompt), left padded, on the device.

        Consecutive rows showing the same image object (the captions of one image) are processed once and the
        row repeated: the same tensors as processing every row (same padding, same patches), less work."""
        unique: list[Image.Image] = []
        repeats: list[int] = []
        for image in images:
            if unique and image is unique[-1]:
                repeats[-1] += 1
            else:
                unique.append(image)
                repeats.append(1)
        batch = self.processor(
            images=unique, text=[self.chat_prompt] * len(unique), padding=True, return_tensors="pt",
            max_patches=self.settings.max_dynamic_patch,
        )
        if len(unique) < len(images):
            counts = torch.tensor(repeats)
            # pixel_values holds each image's patches in row order; the image tokens of a row tell how many.
            patches = (batch["input_ids"] == self.processor.image_token_id).sum(1) // self.processor.image_seq_length
            chunks = batch["pixel_values"].split(patches.tolist())
            batch["pixel_values"] = torch.cat([chunk for chunk, r in zip(chunks, repeats) for _ in range(r)])
            for name in batch.keys() - {"pixel_values"}:  # the per-row tensors: input_ids, attention_mask
                batch[name] = batch[name].repeat_interleave(counts, 0)
        batch = batch.to(self.device)
        batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        return dict(batch)

    @torch.inference_mode()
    def generate_raw(self, inputs: dict[str, torch.Tensor], seeds: list[int]) -> list[str]:
        from transformers import LogitsProcessorList

        out = self.model.generate(
            **inputs, do_sample=False, num_beams=1, max_new_tokens=self.settings.max_new_tokens,
            logits_processor=LogitsProcessorList([RowSeededSampler(seeds, self.settings, self.device)]),
            pad_token_id=self.processor.tokenizer.pad_token_id,
        )
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    def __call__(self, images: list[Image.Image], image_bytes: list[bytes], seeds: list[int]) -> list[str]:
        return self.generate_raw(self.prepare(images), seeds)

    def describe(self) -> dict[str, Any]:
        return {"dtype": str(self.dtype).removeprefix("torch."), "device": self.device.type}


# --- lmdeploy backend ----------------------------------------------------------------------------------------------


def jpeg_data_url(image_bytes: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(image_bytes).decode("ascii")


class LmdeployCaptioner:
    """lmdeploy VLM pipeline. Runs only on an NVIDIA GPU node (lmdeploy refuses to build a pipeline without one);
    the tests drive this glue with a stand-in module of the same call signature. lmdeploy loads the checkpoint with
    trust_remote_code=True, so a checkpoint that is not a local directory needs `trust_remote_code`."""

    name: ClassVar[str] = "lmdeploy"
    ENGINES: ClassVar[dict[str, str]] = {"turbomind": "TurbomindEngineConfig", "pytorch": "PytorchEngineConfig"}

    def __init__(
        self, model: str, settings: CaptionSettings, device: str = "auto", dtype: str = "auto",
        engine: str = "turbomind", max_batch_size: int = 64, session_len: int = 4096, trust_remote_code: bool = False,
        **_: Any,
    ):
        import importlib

        problem = None if trust_remote_code else remote_code_problem(model)
        if problem:
            raise RemoteCodeRefused(problem)

        lmdeploy = importlib.import_module("lmdeploy")  # lazy: only GPU nodes with the lmdeploy env have it
        self.settings = settings
        self.generation_config: Callable[..., Any] = lmdeploy.GenerationConfig
        engine_config = getattr(lmdeploy, self.ENGINES[engine])(
            dtype=dtype if dtype in ("float16", "bfloat16") else "auto",
            max_batch_size=max_batch_size, session_len=session_len,
        )
        self.pipe = lmdeploy.pipeline(model, backend_config=engine_config)
        self.engine = engine

    def __call__(self, images: list[Image.Image], image_bytes: list[bytes], seeds: list[int]) -> list[str]:
        s = self.settings
        requests = [
            [{"role": "user", "content": [
                {"type": "text", "text": s.prompt},
                {"type": "image_url", "image_url": {"max_dynamic_patch": s.max_dynamic_patch, "url": jpeg_data_url(b)}},
            ]}]
            for b in image_bytes
        ]
        configs = [
            self.generation_config(
                do_sample=True, random_seed=int(seed), temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                max_new_tokens=s.max_new_tokens,
            )
            for seed in seeds
        ]
        responses = self.pipe(requests, gen_config=configs)
        return [r.text for r in responses]

    def describe(self) -> dict[str, Any]:
        return {"engine": self.engine}


CAPTIONERS: dict[str, type] = {c.name: c for c in (TransformersCaptioner, LmdeployCaptioner)}
