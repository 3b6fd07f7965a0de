"""`synth`: the embedded dataset, generated procedurally by our own code (deterministic by seed).

Each 64x64 image holds one or two coloured shapes on a plain, striped, checkered or noisy background. Each
image gets five genuinely different captions: different templates and word orders, and synonyms for every
attribute (a "crimson disc on the left" and a "red circle at the left side" describe the same picture), so the
one-to-many relation between an image and its captions is real, as in COCO.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from pipeline.core.images import encode_jpeg
from pipeline.data.sources import Record, Skip, SourceOptions, make_record

SIZE = 64
CAPTIONS_PER_IMAGE = 5

COLORS = {  # name -> (RGB, synonyms used in captions)
    "red": ((220, 30, 30), ["red", "crimson", "scarlet"]),
    "green": ((30, 170, 50), ["green", "emerald", "lime"]),
    "blue": ((30, 60, 220), ["blue", "navy", "azure"]),
    "yellow": ((240, 220, 30), ["yellow", "golden", "lemon"]),
    "purple": ((140, 40, 180), ["purple", "violet", "lilac"]),
    "orange": ((250, 140, 20), ["orange", "amber", "tangerine"]),
    "white": ((245, 245, 245), ["white", "snowy", "ivory"]),
    "black": ((15, 15, 15), ["black", "dark", "ebony"]),
}
SHAPES = {
    "circle": ["circle", "disc", "round shape", "dot"],
    "square": ["square", "box", "block", "tile"],
    "triangle": ["triangle", "wedge", "three-sided shape", "pyramid shape"],
    "cross": ["cross", "plus sign", "x-shaped mark", "crossing bars"],
}
SIZES = {"small": (10, ["small", "tiny", "little"]), "large": (22, ["large", "big", "huge"])}
POSITIONS = {  # name -> (centre, phrases)
    "left": ((18, 32), ["on the left", "at the left side", "to the left"]),
    "right": ((46, 32), ["on the right", "at the right side", "to the right"]),
    "top": ((32, 18), ["at the top", "near the top", "in the upper part"]),
    "bottom": ((32, 46), ["at the bottom", "near the bottom", "in the lower part"]),
    "center": ((32, 32), ["in the center", "in the middle", "at the centre"]),
}
BACKGROUNDS = {
    "plain": ["a plain background", "an empty backdrop", "a flat background"],
    "striped": ["a striped background", "stripes", "a backdrop of stripes"],
    "checkered": ["a checkered background", "a checkerboard", "a grid of squares"],
    "noisy": ["a noisy background", "a grainy backdrop", "speckled noise"],
}
BACKGROUND_TONES = [(200, 200, 200), (120, 120, 120), (170, 200, 230), (230, 210, 170)]


def sample_params(rng: random.Random) -> tuple:
    background = rng.choice(sorted(BACKGROUNDS))
    tone = rng.randrange(len(BACKGROUND_TONES))
    positions = rng.sample(sorted(POSITIONS), rng.choice([1, 1, 2]))
    shapes = tuple(
        (rng.choice(sorted(SHAPES)), rng.choice(sorted(COLORS)), rng.choice(sorted(SIZES)), position) for position in positions
    )
    return (rng.randrange(1 << 30), background, tone, shapes)


@dataclass(frozen=True)
class SynthImage:
    """A synthetic image, drawn in the worker from its parameters."""

    params: tuple

    def read(self) -> bytes:
        return render(self)


def shape_radius(size: str) -> int:
    return SIZES[size][0] // 2 + 2


def shape_box(shape: tuple) -> tuple[int, int, int, int]:
    """[x, y, w, h] in pixels of a drawn shape ``(kind, colour, size, position)``: PIL fills both ends of the
    box it is given, so a shape of radius r covers 2r + 1 pixels."""
    (cx, cy), radius = POSITIONS[shape[3]][0], shape_radius(shape[2])
    return cx - radius, cy - radius, 2 * radius + 1, 2 * radius + 1


def render(image: SynthImage) -> bytes:
    noise_seed, background, tone, shapes = image.params
    rng = np.random.default_rng(noise_seed)
    base = np.array(BACKGROUND_TONES[tone], dtype=np.float32)
    canvas = np.tile(base, (SIZE, SIZE, 1))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    if background == "striped":
        canvas[(xx // 6) % 2 == 0] *= 0.6
    elif background == "checkered":
        canvas[((xx // 8) + (yy // 8)) % 2 == 0] *= 0.6
    elif background == "noisy":
        canvas += rng.normal(0, 35, canvas.shape)
    canvas += rng.normal(0, 4, canvas.shape)  # light sensor noise on every image
    picture = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for shape, color, size, position in shapes:
        (cx, cy), radius, fill = POSITIONS[position][0], shape_radius(size), COLORS[color][0]
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
        else:
            width = max(2, radius // 2)
            draw.rectangle((cx - radius, cy - width, cx + radius, cy + width), fill=fill)
            draw.rectangle((cx - width, cy - radius, cx + width, cy + radius), fill=fill)
    return encode_jpeg(picture, quality=95)


def _describe_shape(rng: random.Random, shape: tuple) -> tuple[str, str]:
    kind, color, size, position = shape
    noun = rng.choice(SHAPES[kind])
    adjectives = [rng.choice(SIZES[size][1]), rng.choice(COLORS[color][1])]
    if rng.random() < 0.3:
        adjectives.reverse()
    return f"{' '.join(adjectives)} {noun}", rng.choice(POSITIONS[position][1])


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def captions_for(params: tuple, seed: int) -> list[str]:
    """Five different captions of the same picture (templates, word orders and synonyms all vary)."""
    rng = random.Random(seed)
    background = params[1]
    templates = [
        "{objects} on {bg}",
        "there is {objects}, with {bg} behind",
        "{bg_cap} with {objects}",
        "a picture of {objects} over {bg}",
        "{objects}; the background is {bg_bare}",
        "we see {objects} against {bg}",
    ]
    captions: list[str] = []
    for template in rng.sample(templates, CAPTIONS_PER_IMAGE):
        parts = [_describe_shape(rng, shape) for shape in params[3]]
        objects = " and ".join(f"{_article(noun)} {where}" for noun, where in parts)
        bg = rng.choice(BACKGROUNDS[background])
        caption = template.format(objects=objects, bg=bg, bg_cap=bg[0].upper() + bg[1:], bg_bare=bg.split(" ", 1)[-1])
        captions.append(caption)
    return captions


def read_synth(options: SourceOptions) -> Iterator[Record | Skip]:
    rng = random.Random(f"synth-{options.synth_seed}")
    for index in range(options.synth_size):
        params = sample_params(rng)
        image_id = f"synth{index:07d}"
        captions = captions_for(params, seed=hash_seed(options.synth_seed, index))
        yield make_record(image_id, SynthImage(params), captions, options.fractions.assign(image_id), image_id)


def hash_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index
