"""Weakly supervised grounding: the box rule (oracle and constant maps, IoU >= 0.5), the synth referring
expressions, the RefCOCO+ JSON reader, Grad-CAM on a tiny BLIP and the end-to-end evaluation."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from pipeline.core.paths import Layout
from pipeline.data.grounding import (
    ATTRIBUTES,
    SPLITS,
    GroundingItem,
    first_per_split,
    read_refcoco_json,
    synth_grounding,
)
from pipeline.data.sources.synth import COLORS, POSITIONS, SHAPES, SIZES, render
from pipeline.evaluation.config import GroundingConfig
from pipeline.evaluation.grounding import (
    box_iou,
    box_scores,
    check_groundable,
    gradcam,
    grounding_path,
    is_right,
    predicted_box,
    split_accuracy,
)


def _oracle_map(item: GroundingItem, size: int = 64) -> torch.Tensor:
    heatmap = torch.zeros(size, size)
    x, y, w, h = item.referred_box
    heatmap[int(y):int(y + h), int(x):int(x + w)] = 1.0
    return heatmap


def test_an_oracle_map_grounds_every_synth_expression():
    items = synth_grounding(30)
    correct = [is_right(_oracle_map(item), item) for item in items]
    assert split_accuracy(items, correct) == {"val": 100.0, "testA": 100.0, "testB": 100.0, "all": 100.0}


def test_a_constant_map_is_at_chance_with_ties_to_the_first_candidate():
    # Four equal, disjoint candidates, the referred one cycling: a constant map ties them all, the first wins.
    boxes = ((0.0, 0.0, 10.0, 10.0), (20.0, 0.0, 10.0, 10.0), (0.0, 20.0, 10.0, 10.0), (20.0, 20.0, 10.0, 10.0))
    items = [GroundingItem(f"e{i}", None, "img", "x", boxes, boxes[i % 4], SPLITS[i % 3]) for i in range(12)]
    flat = torch.full((32, 32), 0.7)
    assert {predicted_box(flat, boxes)} == {0}
    correct = [is_right(flat, item) for item in items]
    assert split_accuracy(items, correct)["all"] == 25.0  # 1 / 4 candidates, exactly


def test_a_constant_map_picks_the_largest_synth_box_first():
    # ALBEF's score (sum / area ** 0.5) of a constant map grows with the box: the first of the largest wins.
    items = synth_grounding(30)
    flat = torch.ones(64, 64)
    largest = [max(range(len(i.boxes)), key=lambda k: (i.boxes[k][2], -k)) for i in items]
    expected = 100.0 * sum(i.referred_index == k for i, k in zip(items, largest)) / len(items)
    assert split_accuracy(items, [is_right(flat, i) for i in items])["all"] == pytest.approx(expected)
    assert 0 < expected < 100


def test_a_box_scores_the_map_inside_it_over_the_root_of_its_area():
    heatmap = torch.zeros(16, 16)
    heatmap[:4, :4] = 1.0
    tight, loose, elsewhere = (0.0, 0.0, 4.0, 4.0), (0.0, 0.0, 8.0, 8.0), (8.0, 8.0, 4.0, 4.0)
    assert box_scores(heatmap, (tight, loose, elsewhere)).tolist() == [4.0, 2.0, 0.0]  # 16 / 4, 16 / 8, 0
    assert predicted_box(heatmap, (loose, tight)) == 1


def test_right_means_iou_at_least_one_half():
    referred = (0.0, 0.0, 10.0, 10.0)
    assert box_iou(referred, referred) == 1.0
    assert box_iou(referred, (10.0, 0.0, 10.0, 10.0)) == 0.0
    assert box_iou(referred, (5.0, 0.0, 10.0, 10.0)) == pytest.approx(1 / 3)
    flat = torch.ones(20, 20)
    for height, right in ((5.0, True), (4.9, False)):  # IoU 0.5 and 0.49 with the referred box
        only = (0.0, 0.0, 10.0, height)
        assert is_right(flat, GroundingItem("e", None, "i", "x", (only,), referred, "val")) is right


def _matching(description: dict, shapes: tuple) -> list[int]:
    """The shapes a structured expression fits, checked apart from the generator's own code."""
    def fits(attrs, shape):
        return all(shape[ATTRIBUTES[k]] == v for k, v in attrs.items())

    found = [i for i, s in enumerate(shapes) if fits(description["attributes"], s)]
    if "position" in description:
        found = [i for i in found if shapes[i][3] == description["position"]]
    if "relation" in description:
        landmarks = [j for j, s in enumerate(shapes) if fits(description["landmark"], s)]
        assert len(landmarks) == 1, description
        (lx, ly) = POSITIONS[shapes[landmarks[0]][3]][0]
        side = {"left": lambda x, y: x < lx, "right": lambda x, y: x > lx, "above": lambda x, y: y < ly,
                "below": lambda x, y: y > ly}[description["relation"]]
        found = [i for i in found if i != landmarks[0] and side(*POSITIONS[shapes[i][3]][0])]
    return found


def test_synth_expressions_single_out_their_box():
    items = synth_grounding(60)
    assert {i.split for i in items} == set(SPLITS)
    words = {"size": {k: v[1] for k, v in SIZES.items()}, "colour": {k: v[1] for k, v in COLORS.items()},
             "kind": SHAPES}
    for item in items:
        shapes = item.image.params[3]
        assert 2 <= len(shapes) <= 4 and len(item.boxes) == len(shapes)
        assert _matching(item.meaning, shapes) == [item.referred_index], (item.expression, shapes)
        for name, value in item.meaning["attributes"].items():
            assert any(w in item.expression for w in words[name][value]), item.expression
        if item.split == "testA":
            assert set(item.meaning) == {"attributes"}
        if item.split == "testB":
            assert "relation" in item.meaning or "position" in item.meaning
    # every pair of candidate boxes is told apart by the IoU rule
    assert all(box_iou(a, b) < 0.5 for i in items for a in i.boxes for b in i.boxes if a != b)


def test_synth_expressions_are_deterministic_by_seed_and_draw_the_synth_way():
    first, again, other = synth_grounding(9, seed=0), synth_grounding(9, seed=0), synth_grounding(9, seed=1)
    assert [(i.expression, i.boxes) for i in first] == [(i.expression, i.boxes) for i in again]
    assert [i.expression for i in first] != [i.expression for i in other]
    assert first[0].image.read() == render(first[0].image)
    assert len(first_per_split(synth_grounding(30), 2)) == 6


def _refcoco(root, *, dets=True, refs_name="refs(unc).json", missing_image=False):
    """A two-image RefCOCO+ in ALBEF's layout: val (ref 1: two sentences), testA (ref 2), testB (ref 3), train (4)."""
    (root / "refcoco+").mkdir(parents=True)
    (root / "images" / "train2014").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        if not (missing_image and name == "b.jpg"):
            Image.new("RGB", (40, 30), (100, 50, 0)).save(root / "images" / "train2014" / name)
    refs = [{"ref_id": 1, "ann_id": 11, "image_id": 7, "split": "val", "sentences": [{"sent": "left man"}]},
            {"ref_id": 2, "ann_id": 12, "image_id": 7, "split": "testA", "sentences": []},
            {"ref_id": 3, "ann_id": 13, "image_id": 8, "split": "testB", "sentences": []},
            {"ref_id": 4, "ann_id": 13, "image_id": 8, "split": "train", "sentences": []}]
    (root / "refcoco+" / refs_name).write_text(json.dumps(refs))
    annotations = [{"id": 11, "image_id": 7, "bbox": [0, 0, 10, 10]}, {"id": 12, "image_id": 7, "bbox": [20, 0, 10, 10]},
                   {"id": 13, "image_id": 8, "bbox": [5, 5, 20, 20]}]
    (root / "refcoco+" / "instances.json").write_text(json.dumps({"images": [], "annotations": annotations}))
    boxes = {"7": [[0, 0, 10, 10, 0.9], [20, 0, 10, 10, 0.8]]}
    if dets:
        boxes["8"] = [[4, 4, 20, 20, 0.5]]
    (root / "refcoco+" / "dets.json").write_text(json.dumps(boxes))
    val = [{"image": "train2014/a.jpg", "text": "left man", "ref_id": 1},
           {"image": "train2014/a.jpg", "text": "man on the left", "ref_id": 1}]
    test = [{"image": "train2014/a.jpg", "text": "right guy", "ref_id": 2},
            {"image": "train2014/b.jpg", "text": "the cup", "ref_id": 3},
            {"image": "train2014/b.jpg", "text": "a train one", "ref_id": 4}]
    (root / "refcoco+_val.json").write_text(json.dumps(val))
    (root / "refcoco+_test.json").write_text(json.dumps(test))
    return root


def test_refcoco_json_reader(tmp_path):
    items = read_refcoco_json(_refcoco(tmp_path))
    assert [(i.item_id, i.split, i.expression) for i in items] == [
        ("1-0", "val", "left man"), ("1-1", "val", "man on the left"), ("2-0", "testA", "right guy"),
        ("3-0", "testB", "the cup")]  # the train ref is not scored
    assert items[0].boxes == ((0.0, 0.0, 10.0, 10.0), (20.0, 0.0, 10.0, 10.0)) and items[0].referred_index == 0
    assert items[3].referred_box == (5.0, 5.0, 20.0, 20.0) and items[3].referred_index is None
    assert items[3].image.read() == (tmp_path / "images" / "train2014" / "b.jpg").read_bytes()


@pytest.mark.parametrize("case, error, words", [
    ("pickle", ValueError, "a pickle"),
    ("no dets", ValueError, "no candidate boxes for image 8"),
    ("no image", FileNotFoundError, "the image of ref_id 3 is missing"),
])
def test_refcoco_bad_input_is_one_line(tmp_path, case, error, words):
    root = _refcoco(tmp_path, dets=case != "no dets", missing_image=case == "no image",
                    refs_name="refs(unc).p" if case == "pickle" else "refs(unc).json")
    with pytest.raises(error, match=words) as caught:
        read_refcoco_json(root)
    assert "\n" not in str(caught.value)


def test_config_refuses_a_retrieval_only_attack_and_a_missing_dataset():
    with pytest.raises(ValueError, match="unknown for grounding"):
        GroundingConfig(attacks=("bert",))
    with pytest.raises(ValueError, match="GROUNDING_DATA: required"):
        GroundingConfig(checkpoint="x", dataset="coco").check_runnable()


@pytest.fixture(scope="module")
def blip_dirs(tmp_path_factory, tiny_model_dirs) -> dict[str, str]:
    from transformers import AutoTokenizer

    from conftest import tiny_blip

    torch.manual_seed(0)
    blip = tiny_blip(AutoTokenizer.from_pretrained(tiny_model_dirs["mlm"]))
    return {"blip": str(blip.save(tmp_path_factory.mktemp("grounding") / "blip")), "mlm": tiny_model_dirs["mlm"]}


def test_gradcam_is_a_patch_grid_map_with_a_gradient(blip_dirs):
    from pipeline.models.loading import load_model

    model = load_model(blip_dirs["blip"])
    images = torch.rand(3, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
    cams = gradcam(model, images, ["the red circle", "a small blue square at the top", "the cross"], layer=1)
    grid = model.image_size // model.model.config.vision_config.patch_size
    assert cams.shape == (3, grid, grid)
    assert (cams >= 0).all() and (cams.flatten(1).sum(1) > 0).all()
    assert all(p.grad is None for p in model.model.parameters())


def test_only_a_blip_with_its_itm_head_grounds(tiny_clip):
    with pytest.raises(ValueError, match="needs a BLIP model"):
        check_groundable(tiny_clip, "models/x")

    class NoHead:
        family, has_itm = "blip", False

    with pytest.raises(ValueError, match="no itm_head"):
        check_groundable(NoHead(), "models/y")


def test_end_to_end_on_a_tiny_blip_writes_per_split_accuracy(tmp_path, blip_dirs, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.commands.cli import app

    monkeypatch.setenv("MAT_MANIFESTS_DIR", str(tmp_path / "manifests"))
    result = CliRunner().invoke(app, [
        "eval-grounding", "--ckpt", blip_dirs["blip"], "--mlm", blip_dirs["mlm"], "--synth-images", "6",
        "--size", "3", "--steps", "2", "--batch-size", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    printed = re.findall(r"blip +(\w+) +val +[\d.]+ +testA +[\d.]+ +testB +[\d.]+ +all", result.output)
    assert printed == ["clean", "pgd", "coattack", "sga"], result.output  # one line per attack
    record = json.loads(grounding_path(Layout(manifests_dir=tmp_path / "manifests"), "synth", "blip").read_text())
    assert record["splits"] == {"val": 3, "testA": 3, "testB": 3} and record["n_expressions"] == 9
    for attack in ("clean", "pgd", "coattack", "sga"):
        row = record["metrics"][attack]
        assert set(row["accuracy"]) == {"val", "testA", "testB", "all"}
        assert len(row["correct"]) == 9 and set(row["correct"]) <= {0, 1}
        for split in ("val", "testA", "testB", "all"):
            hits = [c for c, e in zip(row["correct"], record["expressions"]) if split in ("all", e["split"])]
            assert row["accuracy"][split] == pytest.approx(100 * sum(hits) / len(hits))
    assert sorted(e["split"] for e in record["expressions"]) == ["testA"] * 3 + ["testB"] * 3 + ["val"] * 3
    assert record["provenance"]["device"] == "cpu" and record["layer"] == 1
    # clean correctness, one expression at a time, lines up with the record's expressions
    from pipeline.evaluation.grounding import load_batch, load_items, upsample
    from pipeline.models.loading import load_model

    model = load_model(blip_dirs["blip"])
    items, _ = load_items(GroundingConfig(synth_images=6, size=3))
    assert [i.item_id for i in items] == [e["id"] for e in record["expressions"]]
    alone = []
    for item in items:
        pixels, [shape] = load_batch([item], model.image_size)
        alone.append(int(is_right(upsample(gradcam(model, pixels, [item.expression], 1)[0], *shape), item)))
    assert alone == record["metrics"]["clean"]["correct"]
