"""Referring-expression grounding data: :class:`GroundingItem` and its two readers.

**RefCOCO+ as JSON** (:func:`read_refcoco_json`), the files ALBEF's weakly supervised grounding evaluation reads
(salesforce/ALBEF ``Grounding.py`` with ``configs/Grounding.yaml``, ``dataset/grounding_dataset.py``,
``grounding_eval`` in ``dataset/utils.py``), in ALBEF's ``data/`` layout::

    <root>/refcoco+_val.json, refcoco+_test.json   [{"image": <path under images/>, "text": <expression>,
                                                     "ref_id": <int>}, ...]  (ALBEF's test files)
    <root>/refcoco+/refs(unc).json                 the refer toolkit's refs as JSON (or refs.json):
                                                    [{"ref_id", "ann_id", "image_id", "split": val|testA|testB|train,
                                                      "sentences": [...]}, ...]
    <root>/refcoco+/instances.json                 COCO instances: {"annotations": [{"id", "image_id", "bbox"}], ...}
    <root>/refcoco+/dets.json                      detection proposals: {"<image_id>": [[x, y, w, h, ...], ...]}
    <root>/images/<image>                          the COCO images the test files name

ALBEF reads the refs through the refer toolkit from ``refs(unc).p``, a pickle; a pickle can run code when
loaded, so this reader never unpickles: a ``.p`` file is refused with a one-line error, and the refs are read
from their JSON export (``json.dump(pickle.load(f), ...)`` once, on a machine you trust, gives it). What the
evaluation takes from them is what ALBEF's ``grounding_eval`` takes: each expression's split (``ref["split"]``),
its referred box (the annotation ``ann_id``'s ``bbox``) and the candidates (``dets[str(image_id)]``, the
proposals' first four numbers). ``cocos.json``, which ALBEF also loads, is not used by its evaluation.

**Synth** (:func:`synth_grounding`): images of 2-4 shapes drawn by the synth source's own code (its generator
knows every shape's box), every shape a candidate box, and one referring expression per shape that singles it
out among the image's shapes. Splits (our choice, standing in for RefCOCO+'s val / testA (people) / testB
(objects)): ``testA`` describes the target by its attributes (the fewest of size, colour and kind that no other
shape shares: "the small red circle"); ``testB`` by a relation to another shape ("the circle left of the blue
square"), or, where no relation singles it out, by its place ("the circle at the top"); ``val`` alternates
between the two. A target that no attributes single out (two identical shapes) has no testA expression.
Deterministic by seed; the synth base dataset's records and bytes are untouched (a separate random stream).
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.sources.synth import COLORS, POSITIONS, SHAPES, SIZES, SynthImage, sample_params, shape_box

Box = tuple[float, float, float, float]  # [x, y, w, h] in pixels of the original image
SPLITS = ("val", "testA", "testB")
REFCOCO_TEST_FILES = ("refcoco+_val.json", "refcoco+_test.json")
REFS_FILES = ("refs(unc).json", "refs.json")
PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")


@dataclass(frozen=True)
class FileImage:
    """An image file, read when the evaluation needs its bytes."""

    path: Path

    def read(self) -> bytes:
        return self.path.read_bytes()


@dataclass(frozen=True)
class GroundingItem:
    """One referring expression: its image, the candidate boxes and the box of the object it refers to.

    ``referred_box`` is the truth (a prediction is right when its IoU with it is >= 0.5); it is one of ``boxes``
    on synth, and usually none of them on RefCOCO+ (the candidates are detector proposals)."""

    item_id: str
    image: Any  # read() -> bytes
    image_id: str
    expression: str
    boxes: tuple[Box, ...]
    referred_box: Box
    split: str
    meaning: dict[str, Any] | None = field(default=None, compare=False)  # synth: what the expression says

    @property
    def referred_index(self) -> int | None:
        """The index of the referred box among the candidates (None when it is not one of them)."""
        return self.boxes.index(self.referred_box) if self.referred_box in self.boxes else None


def check_box(box: Any, where: str) -> Box:
    """[x, y, w, h] with w, h > 0 as floats (ValueError otherwise; extra numbers, such as a score, dropped)."""
    try:
        x, y, w, h = (float(v) for v in box[:4])
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"{where}: a box is [x, y, w, h] (numbers), got {box!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"{where}: box {box!r} has no area (w and h must be > 0)")
    return x, y, w, h


def first_per_split(items: Iterable[GroundingItem], size: int | None) -> list[GroundingItem]:
    """The first ``size`` items of each split, in their order (all of them for None)."""
    seen: dict[str, int] = {}
    out = []
    for item in items:
        seen[item.split] = seen.get(item.split, 0) + 1
        if size is None or seen[item.split] <= size:
            out.append(item)
    return out


# ------------------------------------------------------------------------------------------ RefCOCO+ (JSON)


def load_json(path: Path) -> Any:
    """A JSON file; a pickle is refused (never unpickled) with a one-line error."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: a pickle, which this pipeline never loads (unpickling can run code); export it "
                         f"to JSON once (json.dump(pickle.load(f), out)) and put it next to it as {REFS_FILES[0]}")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not JSON ({error})") from None


def refs_path(folder: Path) -> Path:
    """The refs' JSON export in ``folder``; a folder holding only ``refs(unc).p`` gets the pickle's error."""
    for name in REFS_FILES:
        if (folder / name).is_file():
            return folder / name
    pickles = sorted(p for p in folder.glob("refs*") if p.suffix.lower() in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        return pickles[0]  # load_json refuses it with the way out
    raise FileNotFoundError(f"no refs in {folder}: expected {' or '.join(REFS_FILES)} (the refer toolkit's refs "
                            "as JSON)")


def read_refcoco_json(root: str | Path, dataset: str = "refcoco+") -> list[GroundingItem]:
    """Every val / testA / testB expression of ALBEF's test files under ``root`` (layout: module docstring), in
    file order. FileNotFoundError for a missing file or image, ValueError for an expression without its ref,
    annotation or candidate boxes."""
    root = Path(root)
    tests = [root / name.replace("refcoco+", dataset) for name in REFCOCO_TEST_FILES]
    if not any(path.is_file() for path in tests):
        raise FileNotFoundError(f"{root}: no {' or '.join(p.name for p in tests)} (ALBEF's grounding test files)")
    folder = root / dataset
    refs = {int(ref["ref_id"]): ref for ref in load_json(refs_path(folder))}
    boxes_of_ann = {int(ann["id"]): ann["bbox"] for ann in load_json(folder / "instances.json")["annotations"]}
    dets = load_json(folder / "dets.json")
    items = []
    for path in (p for p in tests if p.is_file()):
        sentence_of: dict[int, int] = {}
        for index, entry in enumerate(load_json(path)):
            where = f"{path.name} entry {index}"
            try:
                ref_id, text, image = int(entry["ref_id"]), str(entry["text"]), str(entry["image"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{where}: needs image, text and ref_id, got {entry!r}"[:300]) from None
            ref = refs.get(ref_id)
            if ref is None:
                raise ValueError(f"{where}: ref_id {ref_id} is not in the refs")
            if ref["split"] not in SPLITS:
                continue  # ALBEF scores val, testA and testB only
            image_id = str(ref["image_id"])
            if int(ref["ann_id"]) not in boxes_of_ann:
                raise ValueError(f"{where}: annotation {ref['ann_id']} (ref_id {ref_id}) is not in instances.json")
            candidates = dets.get(image_id)
            if not candidates:
                raise ValueError(f"{where}: no candidate boxes for image {image_id} in dets.json")
            file = root / "images" / image
            if not file.is_file():
                raise FileNotFoundError(f"{where}: the image of ref_id {ref_id} is missing: {file}")
            sentence_of[ref_id] = sentence_of.get(ref_id, -1) + 1
            items.append(GroundingItem(
                item_id=f"{ref_id}-{sentence_of[ref_id]}", image=FileImage(file), image_id=image_id,
                expression=text, boxes=tuple(check_box(b, f"{where}: dets.json") for b in candidates),
                referred_box=check_box(boxes_of_ann[int(ref["ann_id"])], f"{where}: instances.json"),
                split=ref["split"]))
    return items


# ----------------------------------------------------------------------------------------------------- synth

KIND, COLOUR, SIZE, POSITION = range(4)  # the fields of a synth shape tuple
ATTRIBUTES = {"size": SIZE, "colour": COLOUR, "kind": KIND}  # the order they are said in
RELATIONS = {  # name -> (phrase, does the target (x, y) stand so to the landmark (x, y))
    "left": ("left of", lambda t, l: t[0] < l[0]),
    "right": ("right of", lambda t, l: t[0] > l[0]),
    "above": ("above", lambda t, l: t[1] < l[1]),
    "below": ("below", lambda t, l: t[1] > l[1]),
}


def centre(shape: tuple) -> tuple[int, int]:
    return POSITIONS[shape[POSITION]][0]


def fits(attributes: dict[str, str], shape: tuple) -> bool:
    return all(shape[ATTRIBUTES[name]] == value for name, value in attributes.items())


def singling_attributes(target: int, shapes: tuple, rng: random.Random) -> dict[str, str] | None:
    """The fewest attributes of shape ``target`` that no other shape shares (ties in a random order), or None."""
    for count in (1, 2, 3):
        subsets = list(itertools.combinations(ATTRIBUTES, count))
        rng.shuffle(subsets)
        for subset in subsets:
            attributes = {name: shapes[target][ATTRIBUTES[name]] for name in subset}
            if [i for i, shape in enumerate(shapes) if fits(attributes, shape)] == [target]:
                return attributes
    return None


def relation_meaning(target: int, shapes: tuple, rng: random.Random) -> dict[str, Any]:
    """Target named by its kind and a relation to a landmark (itself singled out by its attributes) such that no
    other shape of that kind stands so; else by its kind and its place (places are unique in an image)."""
    kind = {"kind": shapes[target][KIND]}
    options = [(r, l) for r in RELATIONS for l in range(len(shapes)) if l != target]
    rng.shuffle(options)
    for relation, landmark in options:
        test = RELATIONS[relation][1]
        described = singling_attributes(landmark, shapes, rng)
        same = [i for i, s in enumerate(shapes) if i != landmark and fits(kind, s)
                and test(centre(s), centre(shapes[landmark]))]
        if described is not None and same == [target]:
            return {"attributes": kind, "relation": relation, "landmark": described}
    return {"attributes": kind, "position": shapes[target][POSITION]}


def noun_phrase(attributes: dict[str, str], rng: random.Random) -> str:
    words = [rng.choice(SIZES[attributes["size"]][1])] if "size" in attributes else []
    words += [rng.choice(COLORS[attributes["colour"]][1])] if "colour" in attributes else []
    words += [rng.choice(SHAPES[attributes["kind"]]) if "kind" in attributes else "shape"]
    return "the " + " ".join(words)


def expression_text(meaning: dict[str, Any], rng: random.Random) -> str:
    text = noun_phrase(meaning["attributes"], rng)
    if "relation" in meaning:
        return f"{text} {RELATIONS[meaning['relation']][0]} {noun_phrase(meaning['landmark'], rng)}"
    if "position" in meaning:
        return f"{text} {rng.choice(POSITIONS[meaning['position']][1])}"
    return text


def synth_grounding_params(rng: random.Random) -> tuple:
    """Synth image parameters with 2-4 shapes at distinct places (the base generator draws 1-2)."""
    noise_seed, background, tone, _ = sample_params(rng)
    places = rng.sample(sorted(POSITIONS), rng.choice([2, 3, 4]))
    shapes = tuple((rng.choice(sorted(SHAPES)), rng.choice(sorted(COLORS)), rng.choice(sorted(SIZES)), place)
                   for place in places)
    return noise_seed, background, tone, shapes


def synth_grounding(n_images: int, seed: int = 0) -> list[GroundingItem]:
    """One expression per shape of ``n_images`` images (image i in split ``SPLITS[i % 3]``), in image order."""
    rng = random.Random(f"synth-grounding-{seed}")
    items = []
    for index in range(n_images):
        params = synth_grounding_params(rng)
        shapes, split = params[3], SPLITS[index % len(SPLITS)]
        image_id = f"synthgrd{index:06d}"
        boxes = tuple(tuple(float(v) for v in shape_box(shape)) for shape in shapes)
        for target in range(len(shapes)):
            by_attributes = split == "testA" or (split == "val" and target % 2 == 0)
            attributes = singling_attributes(target, shapes, rng) if by_attributes else None
            if attributes is None and split == "testA":
                continue  # an identical twin: no attributes single it out
            meaning = {"attributes": attributes} if attributes else relation_meaning(target, shapes, rng)
            items.append(GroundingItem(
                item_id=f"{image_id}-{target}", image=SynthImage(params), image_id=image_id,
                expression=expression_text(meaning, rng), boxes=boxes, referred_box=boxes[target], split=split,
                meaning=meaning))
    return items
