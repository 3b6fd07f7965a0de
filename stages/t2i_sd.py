"""t2i-sd: new images drawn by Stable Diffusion (diffusers) from the captions of each image.

Loads any text-to-image checkpoint (hub id or local directory) with `AutoPipelineForText2Image.from_pretrained`,
in fp16 / bf16 on GPU. The scheduler is swapped for `scheduler` (default DPM-Solver++ multistep, 20 steps).
Rows are (caption, j) for the chosen captions (`captions`: primary or all) and j < `images_per_caption`; row
variant index v = slot * images_per_caption + j gets seed `seed_for(key, v)` and its own torch.Generator, so an
image depends only on its (key, v), not on the batch (diffusers draws each latent from its own generator).
All rows of a batch go through one pipeline call, in chunks of `batch_size` rows.

Image variants are JPEG (quality `jpeg_quality`) with caption_index = the caption drawn. The safety checker's flag
is stored per variant (`extra["nsfw"]`: False, or None when the checkpoint has no checker); flagged images come
back black from diffusers and are never emitted: they are recorded in `skipped` with reason "nsfw".
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from pipeline.augment.captioning import (
    DTYPES,
    checkpoint_problem,
    checkpoint_revision,
    hub_offline,
    resolve_checkpoint,
    resolve_dtype,
)
from pipeline.core.config import check_choice, check_device, check_non_negative, check_positive, check_range
from pipeline.core.images import encode_jpeg
from pipeline.models.device import resolve_device
from pipeline.augment.stage import BaseSample, SampleResult, Stage, StageContext, Variant

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MARKER = "model_index.json"

# scheduler name -> (diffusers class, extra config); "dpm++" is DPM-Solver++(2M), diffusers' multistep default
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
}
CAPTION_CHOICES = ("primary", "all")


@dataclass(frozen=True)
class StableDiffusionConfig:
    model: str = DEFAULT_MODEL  # the CLI passes T2I_MODEL
    scheduler: str = "dpm++"
    steps: int = 20
    guidance_scale: float = 7.5
    height: int | None = None  # None: the checkpoint's native size (512 for SD 1.5)
    width: int | None = None
    negative_prompt: str = ""
    images_per_caption: int = 1
    captions: str = "primary"
    safety_checker: bool = True
    jpeg_quality: int = 95
    batch_size: int = 8
    dtype: str = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        check_positive(self, "steps", "images_per_caption", "batch_size")
        check_non_negative(self, "guidance_scale")  # <= 1 turns classifier-free guidance off
        for name in ("height", "width"):
            size = getattr(self, name)
            if size is not None and (size < 8 or size % 8):
                raise ValueError(f"{name}={size!r}: must be None or a multiple of 8")
        check_choice("captions", self.captions, CAPTION_CHOICES)
        check_range("jpeg_quality", self.jpeg_quality, 1, 100)
        check_choice("dtype", self.dtype, DTYPES)
        check_device("device", self.device)


def load_text_to_image(config: StableDiffusionConfig, device: torch.device) -> Any:
    """The diffusers pipeline for `config.model`, scheduler swapped, on `device` (no download when offline)."""
    import diffusers

    path = resolve_checkpoint(config.model, "T2I_MODEL", MARKER)
    dtype = resolve_dtype(config.dtype, device)
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": hub_offline()}
    if not config.safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = diffusers.AutoPipelineForText2Image.from_pretrained(path, **kwargs)
    class_name, extra = SCHEDULERS[config.scheduler]
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class StableDiffusionStage(Stage):
    name: ClassVar[str] = "t2i-sd"
    modality: ClassVar[str] = "image"
    Config = StableDiffusionConfig

    def __init__(self, config: StableDiffusionConfig, context: StageContext):
        super().__init__(config, context)
        self.pipe: Any = None
        self.device = resolve_device(context.device if config.device == "auto" else config.device)

    @classmethod
    def availability(cls, config: StableDiffusionConfig) -> tuple[bool, str]:
        problem = checkpoint_problem(config.model, "T2I_MODEL", MARKER)
        return (problem is None), (problem or "")

    def setup(self) -> None:
        self.pipe = load_text_to_image(self.config, self.device)

    def rows(self, samples: list[BaseSample]) -> list[tuple[int, int, int]]:
        """(sample index, caption index, variant index) for every image to draw."""
        out = []
        for i, sample in enumerate(samples):
            primary = int(sample.meta.get("primary", 0))
            chosen = range(len(sample.captions)) if self.config.captions == "all" else [primary]
            for slot, caption_index in enumerate(chosen):
                for j in range(self.config.images_per_caption):
                    out.append((i, caption_index, slot * self.config.images_per_caption + j))
        return out

    def draw(self, prompts: list[str], seeds: list[int]) -> tuple[list[Image.Image], list[bool | None]]:
        """One pipeline call; one generator per image. Returns the images and the safety flags."""
        c = self.config
        generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        out = self.pipe(
            prompt=prompts, negative_prompt=[c.negative_prompt] * len(prompts) if c.negative_prompt else None,
            generator=generators, num_inference_steps=c.steps, guidance_scale=c.guidance_scale,
            height=c.height, width=c.width, output_type="np",
        )
        images = [Image.fromarray(np.round(a * 255).clip(0, 255).astype(np.uint8)) for a in out.images]
        flags = getattr(out, "nsfw_content_detected", None)
        return images, list(flags) if flags is not None else [None] * len(images)

    def augment_batch(self, samples: list[BaseSample]) -> list[SampleResult]:
        if self.pipe is None:
            self.setup()
        rows = self.rows(samples)
        seeds = [self.seed_for(samples[i].key, v) for i, _, v in rows]
        prompts = [samples[i].captions[ci] for i, ci, _ in rows]
        images: list[Image.Image] = []
        flags: list[bool | None] = []
        for start in range(0, len(rows), self.config.batch_size):
            chunk_images, chunk_flags = self.draw(
                prompts[start : start + self.config.batch_size], seeds[start : start + self.config.batch_size]
            )
            images += chunk_images
            flags += chunk_flags
        results = [SampleResult() for _ in samples]
        for (i, ci, v), seed, image, flag in zip(rows, seeds, images, flags):
            if flag:
                results[i].skipped.append({"caption_index": ci, "variant": v, "reason": "nsfw"})
                continue
            results[i].variants.append(Variant(
                seed=seed, op=f"sd-{self.config.scheduler}", caption_index=ci,
                image_jpeg=encode_jpeg(image.convert("RGB"), self.config.jpeg_quality), extra={"nsfw": flag, "variant": v},
            ))
        return results

    def describe(self) -> dict[str, Any]:
        c = self.config
        info: dict[str, Any] = {
            "model": c.model, "revision": checkpoint_revision(c.model, MARKER),
            "generation": {"scheduler": c.scheduler, "steps": c.steps, "guidance_scale": c.guidance_scale,
                           "height": c.height, "width": c.width, "negative_prompt": c.negative_prompt,
                           "images_per_caption": c.images_per_caption, "captions": c.captions,
                           "safety_checker": c.safety_checker, "generator": "one torch.Generator per image"},
            "device": self.device.type, "dtype": str(resolve_dtype(c.dtype, self.device)).removeprefix("torch."),
        }
        for package in ("diffusers", "transformers", "torch"):
            info[f"{package}_version"] = importlib.metadata.version(package)
        if self.pipe is not None:
            info["pipeline_class"] = type(self.pipe).__name__
        return info
