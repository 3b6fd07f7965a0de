"""`make pretrain FAMILY=blip`: the stand-in BLIP retrieval model trained from scratch on toy shards (tiny preset,
a few steps): it loads as a BLIP with its ITM head, and its ITM head has learned to tell pairs apart."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.paths import Layout
from pipeline.train.config import PRETRAIN_FAMILIES, PretrainConfig
from pipeline.train.toy import write_toy_shards


@pytest.fixture(scope="module")
def pretrained_blip(tmp_path_factory):
    from pipeline.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("pretrain_blip")
    write_toy_shards(root / "shards", "toy", shards=2, per_shard=32)
    layout = Layout(shards_dir=root / "shards", runs_dir=root / "runs", models_dir=root / "models",
                    manifests_dir=root / "manifests")
    cfg = PretrainConfig(dataset="toy", family="blip", clip_preset="tiny", mlm_preset="tiny", vocab_size=200,
                         steps=60, batch_size=8, lr=2e-3, warmup=4, mlm_steps=3, mlm_batch_size=8, num_workers=0,
                         precision="fp32", report_to=(), caption_steps=20, caption_batch_size=8)
    return layout, pretrain(cfg, layout)


def test_pretrain_blip_saves_a_blip_with_its_itm_head_and_the_masked_lms_tokenizer(pretrained_blip):
    from pipeline.models.hf import load_mlm
    from pipeline.models.loading import FAMILIES, load_model

    layout, out = pretrained_blip
    assert set(PRETRAIN_FAMILIES) <= set(FAMILIES)
    assert out["blip"] == str(layout.model_dir("toy", "blip")) and not layout.model_dir("toy", "clip").exists()
    blip, mlm = load_model(out["blip"]), load_mlm(out["mlm"])
    assert blip.family == "blip" and blip.has_itm and blip.image_size == 32
    assert blip.tokenizer.get_vocab() == mlm.tokenizer.get_vocab()


def test_pretrain_blip_saves_a_captioner_on_the_blips_vision_encoder(pretrained_blip):
    """The stand-in captioner: BLIP's captioner whose vision encoder is the saved BLIP's, its decoder trained."""
    from pipeline.models.blip_captioning import load_captioner
    from pipeline.models.loading import load_model

    layout, out = pretrained_blip
    assert out["captioner"] == str(layout.model_dir("toy", "blip-captioning"))
    captioner, blip = load_captioner(out["captioner"]), load_model(out["blip"])
    vision, own = captioner.model.vision_model.state_dict(), blip.model.vision_model.state_dict()
    assert vision.keys() == own.keys() and all(torch.equal(vision[k], own[k]) for k in own)
    assert captioner.image_size == blip.image_size
    texts = captioner.generate(torch.rand(2, 3, captioner.image_size, captioner.image_size))
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def _toy_pairs(layout: Layout, size: int) -> tuple[torch.Tensor, list[str]]:
    """The train images at ``size`` px in [0, 1] and their primary captions."""
    from pipeline.core.images import decode_rgb, model_pixels
    from pipeline.core.shards import list_shards, read_tar

    samples = [s for tar in list_shards(layout.base_dir("toy"), "train") for s in read_tar(tar)]
    images = torch.stack([model_pixels(decode_rgb(s["jpg"]), size) for s in samples]).float() / 255
    return images, [s["txt"].decode() for s in samples]


def test_the_trained_itm_head_scores_matched_pairs_above_mismatched_ones(pretrained_blip):
    """Each image with its caption against the same image with a caption naming another colour: the ITM loss
    taught the head which is which (a head trained on the contrastive loss alone stays at its random init)."""
    from pipeline.models.loading import load_model

    layout, out = pretrained_blip
    blip = load_model(out["blip"])
    images, texts = _toy_pairs(layout, blip.image_size)
    colour = [t.split()[1] for t in texts]  # "a <colour> picture"
    others = [next(t for t, c in zip(texts[i:] + texts[:i], colour[i:] + colour[:i]) if c != colour[i])
              for i in range(len(texts))]
    with torch.no_grad():
        matched, mismatched = blip.itm_scores(images, texts), blip.itm_scores(images, others)
    assert (matched > mismatched).float().mean() >= 0.9


def test_an_unknown_family_is_a_one_line_error_listing_the_choices(tmp_path):
    from typer.testing import CliRunner

    from pipeline.commands.cli import app

    with pytest.raises(ValueError, match=r"^family='albef': choose one of clip, blip$"):
        PretrainConfig(family="albef")
    result = CliRunner().invoke(app, ["pretrain", "--family", "albef"], env={"MAT_MODELS_DIR": str(tmp_path)})
    assert result.exit_code == 2 and "family='albef': choose one of clip, blip" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not any(tmp_path.iterdir())


def test_a_study_of_the_pretrained_blip_trains_its_cells_on_study_losses(pretrained_blip, tiny_model_dirs):
    """`make study CLIP=models/<dataset>/blip STUDY_LOSSES=contrastive,itm`: every cell but FARE (its own loss)
    trains BLIP's ITM loss too, the evaluations run on the trained BLIPs; a CLIP with itm is refused up front."""
    import csv
    import dataclasses

    from pipeline.study.plan import StudyConfig
    from pipeline.study.run import build_plan, run_study

    layout, out = pretrained_blip
    write_toy_shards(layout.shards_dir, "toy", shards=1, per_shard=8, split="test", seed=1)
    cfg = StudyConfig(dataset="toy", clip=out["blip"], modes=("ft", "fare", "mat"), losses=("contrastive", "itm"),
                      steps=2, batch_size=4, precision="fp32", eval_size=4, eval_batch=4, eval_steps=2, eval_top_k=2,
                      attacks=("pgd",), augmentation=False, resamples=20, device="cpu", workers=1, data_workers=0,
                      report_to=())
    report = run_study(cfg, layout)
    assert {r["cell"] for r in report["records"]} == {"pretrained", "ft", "fare", "mat"}
    for cell, itm in (("ft", True), ("mat", True), ("fare", False)):
        with open(layout.runs_dir / "study-toy" / f"{cell}-s0" / "metrics.csv") as handle:
            assert ("itm" in next(csv.DictReader(handle))) == itm, cell
    with pytest.raises(ValueError, match=r"^losses=contrastive,itm \(the ITM loss needs BLIP.s matching head\): needs a BLIP .* fine-tunes clip; "):
        build_plan(dataclasses.replace(cfg, clip=tiny_model_dirs["clip"]), layout)
    with pytest.raises(ValueError, match=r"^losses: unknown 'itc'; choose from contrastive, itm$"):
        StudyConfig(losses=("contrastive", "itc"))
