"""Zero-shot classification: accuracy of a perfect and of a random classifier, data layouts, synth labels."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from pipeline.core.paths import Layout
from pipeline.evaluation.zeroshot import (
    ZeroShotConfig,
    class_name,
    load_imagefolder,
    load_labelled,
    run_zeroshot,
    write_synth_imagefolder,
    zeroshot_path,
)
from pipeline.models.base import ImageTextModel

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


class FakeModel(ImageTextModel):
    """Images -> a (differentiable) embedding; texts -> an embedding per class word found in them.

    ``perfect``: the image embedding is the softmax of its sharpened channel means, so a solid red image points
    at the red prompt. Otherwise a fixed random projection of the pixels: unrelated to the labels."""

    family = "fake"

    def __init__(self, perfect: bool, size: int = 8):
        self.model = torch.nn.Linear(3 * size * size, 3)
        torch.nn.init.normal_(self.model.weight, generator=torch.Generator().manual_seed(0))
        self.perfect, self.image_size, self.tokenizer = perfect, size, None
        self.mean, self.std, self._stats = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), {}

    @property
    def logit_scale(self) -> torch.Tensor:
        return torch.tensor(100.0)

    def image_features(self, pixels01):
        if self.perfect:
            return (50 * pixels01.mean(dim=(2, 3))).softmax(-1)
        return self.model(pixels01.flatten(1))

    def text_features(self, texts):
        return torch.stack([torch.tensor([float(c in t.split()[-1] or f" {c}." in t) for c in COLOURS])
                            for t in texts]) + 1e-3


def _folder(root, per_class: dict[str, int], noise: bool = False):
    g = torch.Generator().manual_seed(0)
    for name, n in per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            rgb = torch.rand(3, generator=g) if noise else torch.tensor(COLOURS.get(name, (0.5, 0.5, 0.5)))
            pixels = (rgb.view(3, 1, 1).expand(3, 8, 8) * 255).byte().permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _cfg(**kw) -> ZeroShotConfig:
    return ZeroShotConfig(checkpoint="fake", data="x", eps=(1 / 255,), pgd_steps=2, apgd=False, **kw)


def test_perfect_classifier_is_100_percent(tmp_path):
    data = load_imagefolder(_folder(tmp_path / "f", {"red": 5, "green": 5, "blue": 5}))
    assert data.classes == ["blue", "green", "red"]
    record = run_zeroshot(FakeModel(perfect=True), data, _cfg(templates=("a photo of a {}.",)))
    assert record["metrics"]["clean"]["accuracy"] == 100.0
    assert record["chance"] == pytest.approx(100 / 3) and record["images_per_class"] == [5, 5, 5]


def test_random_classifier_is_near_chance(tmp_path):
    """Random-colour images in random classes and a random projection: 3 classes, chance 33 %."""
    data = load_imagefolder(_folder(tmp_path / "f", {"red": 70, "green": 70, "blue": 70}, noise=True))
    record = run_zeroshot(FakeModel(perfect=False), data, _cfg())
    assert 20 < record["metrics"]["clean"]["accuracy"] < 47
    assert 0 <= record["metrics"]["eps1/255"]["pgd_accuracy"] <= 100


def test_pgd_lowers_accuracy_and_apgd_is_reported_or_skipped(tmp_path):
    data = load_imagefolder(_folder(tmp_path / "f", {"red": 4, "green": 4, "blue": 4, "grey": 4}, noise=True))
    model = FakeModel(perfect=False)
    record = run_zeroshot(model, data, ZeroShotConfig(checkpoint="fake", data="x", eps=(64 / 255,), pgd_steps=10,
                                                      apgd=True, apgd_steps=5))
    row = record["metrics"]["eps64/255"]
    assert row["pgd_accuracy"] < record["metrics"]["clean"]["accuracy"]
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        assert "torchattacks" in record["notes"][0] and "apgd_accuracy" not in row
    else:
        assert row["apgd_accuracy"] <= min(row["apgd_ce_accuracy"], row["apgd_t_accuracy"])


def test_empty_class_folder_is_a_clear_error(tmp_path):
    root = _folder(tmp_path / "f", {"red": 2, "green": 2})
    (root / "blue").mkdir()
    with pytest.raises(ValueError, match="class folder .*blue has no images"):
        load_imagefolder(root)


def test_folder_names_become_class_names_and_size_covers_classes(tmp_path):
    assert class_name("traffic_light") == "traffic light"
    data = load_imagefolder(_folder(tmp_path / "f", {"red_car": 3, "green": 3}), size=2)
    assert data.classes == ["green", "red car"] and sorted(data.labels.tolist()) == [0, 1]


def test_saved_datasets_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (8, 8), c) for c in ("red", "green", "red")]
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0]}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["red_thing", "green"])}))
    ds.save_to_disk(str(tmp_path / "ds"))
    data, _ = load_labelled(ZeroShotConfig(checkpoint="x", data=str(tmp_path / "ds")), Layout())
    assert data.classes == ["red thing", "green"] and data.labels.tolist() == [0, 1, 0]


@pytest.mark.parametrize("labels, classes", [("shape", {"circle", "cross", "square", "triangle"}),
                                             ("colour", None)])
def test_synth_imagefolder_labels_match_the_generator(tmp_path, labels, classes):
    root = write_synth_imagefolder(tmp_path / labels, labels, n_images=40)
    data = load_imagefolder(root)
    assert len(data.labels) == 40
    if classes:
        assert set(data.classes) <= classes and len(data.classes) >= 3
    else:
        assert all(c.endswith(" shape") for c in data.classes)


def test_end_to_end_on_a_tiny_clip_writes_the_json(tmp_path, tiny_model_dirs):
    from pipeline.evaluation.zeroshot import evaluate_zeroshot

    layout = Layout(shards_dir=tmp_path / "shards", manifests_dir=tmp_path / "manifests")
    record = evaluate_zeroshot(ZeroShotConfig(checkpoint=tiny_model_dirs["clip"], synth_labels="shape",
                                              synth_images=12, eps=(1 / 255, 4 / 255), pgd_steps=2, apgd=True,
                                              apgd_steps=2, device="cpu"), layout)
    path = zeroshot_path(layout, "synth", record["name"])
    assert json.loads(path.read_text())["metrics"]["clean"]["accuracy"] == record["metrics"]["clean"]["accuracy"]
    assert json.loads(path.read_text())["provenance"]["device"] == "cpu"
    assert set(record["metrics"]) == {"clean", "eps1/255", "eps4/255"}
    assert path.parent.name == "zeroshot" and path.parent.parent.name == "evals"


def test_cli_explains_itself_and_reports_an_empty_class_folder(tmp_path, tiny_model_dirs, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.commands.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["eval-zeroshot", "--help"]).exit_code == 0
    root = _folder(tmp_path / "f", {"red": 1, "green": 1})
    (root / "blue").mkdir()
    monkeypatch.setenv("MAT_MANIFESTS_DIR", str(tmp_path / "manifests"))
    result = runner.invoke(app, ["eval-zeroshot", "--ckpt", tiny_model_dirs["clip"], "--data", str(root),
                                 "--device", "cpu"])
    assert result.exit_code == 2 and "has no images" in result.output


def test_cli_takes_a_config_file_and_set(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import pipeline.evaluation.zeroshot as zeroshot
    from pipeline.commands.cli import app

    seen = []
    monkeypatch.setattr(zeroshot, "evaluate_zeroshot", lambda cfg, layout: seen.append(cfg) or (_ for _ in ()).throw(ValueError("stop")))
    (tmp_path / "zs.yaml").write_text("checkpoint: runs/a\nsynth_labels: colour\npgd_steps: 7\n")
    runner = CliRunner()
    result = runner.invoke(app, ["eval-zeroshot", "--config", str(tmp_path / "zs.yaml"), "--eps", "2",
                                 "--set", "apgd=false", "--set", "batch_size=8"])
    assert result.exit_code == 2 and "stop" in result.output, result.output
    cfg = seen[0]
    assert (cfg.checkpoint, cfg.synth_labels, cfg.pgd_steps, cfg.eps, cfg.apgd, cfg.batch_size) == \
        ("runs/a", "colour", 7, (2 / 255,), False, 8)
    result = runner.invoke(app, ["eval-zeroshot", "--set", "synth_labels=size"])
    assert result.exit_code == 2 and "synth_labels='size'" in result.output
    assert len(seen) == 1
