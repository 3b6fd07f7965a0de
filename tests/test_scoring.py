"""The CLIP scorer on a tiny CLIP trained for a few seconds on a toy colour world built here.

Planted bad variants (a caption of another image, a noise image, a garbled caption) must score worse than
genuine ones, and the filter must drop them; the feature stats must give the same FD as the raw features.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPTokenizer

from pipeline.core.metrics import RunningGaussian, frechet_from_stats, frechet_summary, merge_feature_stats
from pipeline.core.paths import Layout
from pipeline.augment.scoring import Scorer, ScorerConfig, load_scorer
from pipeline.models.errors import ModelNotFoundError
from pipeline.core.shards import sample_key, shard_name, write_stats, write_tar

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "purple": (140, 30, 170), "cyan": (30, 210, 210), "white": (240, 240, 240), "black": (15, 15, 15)}
TEMPLATES = ["a {} picture", "the colour {}", "a plain {} image", "something {}"]
SIZE = 32
GARBLED = "zq xv wk blorp fnord"


def word_tokenizer(words: set[str]) -> CLIPTokenizer:
    """A CLIP BPE tokenizer where each word is one token, built deterministically (BPE training is not)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[tuple[str, str]] = []
    for word in sorted(words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        while len(pieces) > 1:
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    special = "<|endoftext|>"
    return CLIPTokenizer(vocab=vocab, merges=merges, unk_token=special, bos_token="<|startoftext|>",
                         eos_token=special, pad_token=special)


def toy_image(colour: str, rng: np.random.Generator) -> Image.Image:
    """A smooth image: the colour under a random brightness ramp, with slight pixel noise."""
    ramp = np.linspace(-1, 1, SIZE)[:, None] * rng.uniform(-1, 1) + np.linspace(-1, 1, SIZE)[None, :] * rng.uniform(-1, 1)
    pixels = np.array(COLOURS[colour], dtype=np.float32) * (1 + 0.15 * ramp[..., None])
    pixels += rng.normal(0, 3, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def train_toy_clip(directory: Path, seed: int = 0, steps: int = 80) -> str:
    """A tiny CLIP (models.py 'tiny' preset) trained a few seconds to match colour words with colour images."""
    from pipeline.models.hf import build_clip

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    words = {word for c in COLOURS for t in TEMPLATES for word in t.format(c).split()} | set(GARBLED.split())
    bundle = build_clip("tiny", word_tokenizer(words), image_size=SIZE)
    model = bundle.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    names = list(COLOURS)
    for _ in range(steps):
        pixels = bundle.preprocess([toy_image(c, rng) for c in names])
        texts = [TEMPLATES[rng.integers(len(TEMPLATES))].format(c) for c in names]
        logits = bundle.logit_scale * bundle.encode_images(pixels) @ bundle.encode_texts(texts).T
        target = torch.arange(len(names))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return str(bundle.save(directory))


@pytest.fixture(scope="module")
def toy_clip_dir(tmp_path_factory) -> str:
    return train_toy_clip(tmp_path_factory.mktemp("toy") / "clip")


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory) -> tuple[Layout, list[dict]]:
    """A base dataset of 2 shards x 24 colour images with 3 of the 4 caption templates each."""
    root = tmp_path_factory.mktemp("toy_data")
    layout = Layout(shards_dir=root / "shards", manifests_dir=root / "manifests", models_dir=root / "models")
    rng = np.random.default_rng(1)
    names = list(COLOURS)
    records = []
    for shard in range(2):
        samples = []
        for index in range(24):
            colour = names[(index + shard) % len(names)]
            key = sample_key("train", shard, index)
            captions = [TEMPLATES[j].format(colour) for j in range(len(TEMPLATES)) if j != index % len(TEMPLATES)]
            meta = {"key": key, "captions": captions, "primary": 0, "split": "train", "colour": colour}
            samples.append({"__key__": key, "jpg": jpeg(toy_image(colour, rng)), "txt": captions[0], "json": meta})
            records.append(meta)
        tar = layout.base_dir("toy") / shard_name("train", shard)
        sha = write_tar(tar, samples)
        write_stats(tar, {"sha256": sha, "samples": len(samples), "keys": [s["__key__"] for s in samples]})
    return layout, records


@pytest.fixture(scope="module")
def scorer(toy_clip_dir, toy_base) -> Scorer:
    layout, _ = toy_base
    scorer = Scorer(ScorerConfig(model=toy_clip_dir, batch_size=16), layout.dataset_manifests("toy"))
    scorer.prepare(layout.base_dir("toy"))
    return scorer


def _planted_stage_results(records: list[dict], rng: np.random.Generator):
    """Per sample: genuine text variants, a caption of another colour, a garbled caption; image variants likewise."""
    from pipeline.augment.stage import BaseSample, SampleResult, Variant

    names = list(COLOURS)
    samples, text_results, image_results = [], [], []
    for meta in records[:24]:
        colour = meta["colour"]
        other = names[(names.index(colour) + 3) % len(names)]
        unused = next(j for j, t in enumerate(TEMPLATES) if t.format(colour) not in meta["captions"])
        samples.append(BaseSample(meta["key"], jpeg(toy_image(colour, rng)), meta["captions"], meta))
        text_results.append(SampleResult([
            Variant(0, "genuine", 0, text=TEMPLATES[unused].format(colour)),  # the template its captions lack
            Variant(1, "other-image", 0, text=TEMPLATES[unused].format(other)),
            Variant(2, "garbled", 0, text=GARBLED),
        ]))
        noise = Image.fromarray(rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8))
        image_results.append(SampleResult([
            Variant(0, "genuine", None, image_jpeg=jpeg(toy_image(colour, rng))),
            Variant(1, "noise", None, image_jpeg=jpeg(noise)),
        ]))
    return samples, text_results, image_results


def _by_op(results, score: str) -> dict[str, np.ndarray]:
    out: dict[str, list[float]] = {}
    for result in results:
        for variant in result.variants:
            out.setdefault(variant.op, []).append(variant.extra[score])
    return {op: np.array(values) for op, values in out.items()}


def test_planted_bad_variants_score_worse(scorer: Scorer, toy_base) -> None:
    samples, text_results, image_results = _planted_stage_results(toy_base[1], np.random.default_rng(2))
    scorer.score_shard(samples, text_results, "text")
    scorer.score_shard(samples, image_results, "image")
    align, shift = _by_op(text_results, "alignment"), _by_op(text_results, "shift")
    src_sim = _by_op(text_results, "src_sim")
    # a caption of another image is an ordinary caption: lower alignment, but no distribution shift
    assert np.mean(align["genuine"] > align["other-image"]) >= 0.9
    assert np.mean(align["genuine"] > align["garbled"]) >= 0.9
    assert shift["garbled"].min() > np.median(shift["genuine"])
    assert src_sim["genuine"].mean() > src_sim["other-image"].mean()
    img_align, img_shift = _by_op(image_results, "alignment"), _by_op(image_results, "shift")
    assert np.mean(img_align["genuine"] > img_align["noise"]) >= 0.9
    assert img_shift["noise"].min() > img_shift["genuine"].max()
    for result in text_results + image_results:
        for variant in result.variants:
            assert -1.0 <= variant.extra["alignment"] <= 1.0 and -1.0 <= variant.extra["src_sim"] <= 1.0


def test_shard_feature_stats_match_raw_features(scorer: Scorer, toy_base) -> None:
    samples, _, image_results = _planted_stage_results(toy_base[1], np.random.default_rng(3))
    halves = [(samples[:10], image_results[:10]), (samples[10:], image_results[10:])]
    per_shard = [json.loads(json.dumps(scorer.score_shard(s, r, "image"))) for s, r in halves]
    assert set(per_shard[0]) == {"image"}
    summary = frechet_summary(merge_feature_stats(per_shard))
    originals = scorer.embed_images([s.image_bytes for s in samples])
    variants = scorer.embed_images([v.image_jpeg for r in image_results for v in r.variants])
    direct = frechet_from_stats(RunningGaussian(scorer.dim).update(variants),
                                RunningGaussian(scorer.dim).update(originals))
    assert summary["n_image_variant"] == 48 and summary["fd_text"] is None
    assert summary["fd_image"] == pytest.approx(direct, rel=1e-6)


def test_embeddings_are_normalised_and_batch_independent(scorer: Scorer, toy_base) -> None:
    texts = [c for meta in toy_base[1][:20] for c in meta["captions"]]
    one_batch = Scorer(ScorerConfig(model=scorer.config.model, batch_size=64), scorer.cache_dir).embed_texts(texts)
    small_batches = scorer.embed_texts(texts)
    assert np.allclose(np.linalg.norm(small_batches, axis=1), 1.0, atol=1e-3)
    assert np.allclose(one_batch, small_batches, atol=2e-2)  # bf16 autocast: same up to rounding


def test_scorer_pickles_without_model_and_reuses_cached_reference(scorer: Scorer, toy_base) -> None:
    _ = scorer.bundle
    clone = pickle.loads(pickle.dumps(scorer))
    assert clone._bundle is None and set(clone.references) == {"image", "text"}
    layout, _ = toy_base
    cached = list(layout.dataset_manifests("toy").glob("reference-*.npz"))
    assert len(cached) == 1
    fresh = Scorer(scorer.config, scorer.cache_dir)
    fresh.prepare(layout.base_dir("toy"))  # loads the cache: identical arrays
    assert np.array_equal(fresh.references["text"].precision, scorer.references["text"].precision)
    description = fresh.describe()
    assert description["revision"].startswith("sha256:") and description["path"] == str(Path(scorer.config.model))


def test_the_model_loads_once_per_process_not_once_per_shard(toy_clip_dir, tmp_path, monkeypatch) -> None:
    """Each shard's job carries an unpickled Scorer: each loaded the model (and printed "Loading weights") again."""
    import os
    import shutil

    from pipeline.augment import scoring
    from pipeline.models import loading

    calls = []
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda spec, **kwargs: calls.append(spec) or real(spec, **kwargs))
    model = shutil.copytree(toy_clip_dir, tmp_path / "clip")
    scorer = Scorer(ScorerConfig(model=str(model)), tmp_path)
    for _ in range(3):  # three shards in one worker process
        pickle.loads(pickle.dumps(scorer)).embed_texts(["a red picture"])
    assert calls == [str(model)]
    os.utime(model / "config.json", ns=(0, 0))  # the model saved again in the same folder: loaded again
    pickle.loads(pickle.dumps(scorer)).embed_texts(["a red picture"])
    assert calls == [str(model)] * 2


def test_load_scorer_defaults_and_errors(toy_clip_dir, toy_base) -> None:
    layout, _ = toy_base
    assert load_scorer(None, "toy", layout) is None
    assert load_scorer("none", "toy", layout) is None
    with pytest.raises(ModelNotFoundError, match=r"^scorer '.*/missing' not found: no such folder"):
        load_scorer(str(layout.models_dir / "missing"), "toy", layout)
    (layout.models_dir / "not-a-model").mkdir(parents=True)
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_scorer(str(layout.models_dir / "not-a-model"), "toy", layout)
    default = layout.model_dir("toy", "clip")
    default.parent.mkdir(parents=True, exist_ok=True)
    default.symlink_to(toy_clip_dir)
    scorer = load_scorer(None, "toy", layout, batch_size=8)
    assert scorer is not None and scorer.config.model == str(default) and scorer.config.batch_size == 8
    with pytest.raises(ValueError, match="batch_size"):
        load_scorer(toy_clip_dir, "toy", layout, batch_size=0)


def _small_base(root: Path, colours: list[str], captions) -> Layout:
    """One base shard of an image per colour, each with `captions(colour)`."""
    layout = Layout(shards_dir=root / "shards", manifests_dir=root / "manifests", models_dir=root / "models")
    rng = np.random.default_rng(0)
    samples = []
    for index, colour in enumerate(colours):
        key = sample_key("train", 0, index)
        meta = {"key": key, "captions": captions(colour), "primary": 0, "split": "train"}
        samples.append({"__key__": key, "jpg": jpeg(toy_image(colour, rng)), "txt": meta["captions"][0], "json": meta})
    tar = layout.base_dir("small") / shard_name("train", 0)
    write_stats(tar, {"sha256": write_tar(tar, samples), "samples": len(samples), "keys": [s["__key__"] for s in samples]})
    return layout


def test_a_reference_without_variance_says_how_many_images_it_needs(toy_clip_dir, tmp_path) -> None:
    """An 11-image dataset: a bare "reference features have zero variance" before."""
    one_caption = _small_base(tmp_path / "a", ["red", "green", "blue"], lambda colour: ["a picture"] * 2)
    scorer = Scorer(ScorerConfig(model=toy_clip_dir), one_caption.dataset_manifests("small"))
    with pytest.raises(ValueError, match=r"^the scorer's reference of the original captions has zero variance: the 3 "
                                         r"base image\(s\) give 6 captions, all with the same features\. It needs at "
                                         r"least 2 different captions, and about 33 \(the feature dimension \+ 1\) for "
                                         r"shift scores that mean something: add images, or run without scores "
                                         r"\(SCORER=none\)$"):
        scorer.prepare(one_caption.base_dir("small"))
    one_image = _small_base(tmp_path / "b", ["red"], lambda colour: [f"a {colour} picture", f"the colour {colour}"])
    scorer = Scorer(ScorerConfig(model=toy_clip_dir), one_image.dataset_manifests("small"))
    with pytest.raises(ValueError, match=r"original images has zero variance: the 1 base image\(s\) give 1 image\. "
                                         r"It needs at least 2 different images"):
        scorer.prepare(one_image.base_dir("small"))


def test_the_reference_progress_counts_the_images_there(toy_clip_dir, tmp_path, monkeypatch, caplog) -> None:
    """The bar said 0/20000 (reference_samples) on an 11-image dataset."""
    import tqdm

    totals = []

    class Recorder(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            totals.append(kwargs.get("total"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", Recorder)
    layout = _small_base(tmp_path, list(COLOURS)[:5], lambda colour: [f"a {colour} picture", f"the colour {colour}"])
    Scorer(ScorerConfig(model=toy_clip_dir), layout.dataset_manifests("small")).prepare(layout.base_dir("small"))
    Scorer(ScorerConfig(model=toy_clip_dir, reference_samples=3), tmp_path / "other").prepare(layout.base_dir("small"))
    assert totals == [5, 3]
    assert "scorer reference of the images: 5 for 32 feature dimensions; shift scores are rough below 33" in caplog.text


class _PlantedStage:
    """Stage mixin for the end-to-end test: emits the planted variants of `_planted_stage_results`."""

    def augment_batch(self, samples):
        rng = np.random.default_rng(len(samples))
        records = [dict(s.meta) for s in samples]
        _, text_results, image_results = _planted_stage_results(records, rng)
        return text_results if self.modality == "text" else image_results


def test_runner_scores_and_filter_drops_planted_variants(scorer: Scorer, toy_base) -> None:
    from pipeline.curate.filters import FilterConfig, load_filter, filter_path, run_filter
    from pipeline.augment.stage import Stage, StageContext, run_stage
    from pipeline.core.executor import RunOptions

    layout, _ = toy_base
    stages = [type(f"Planted{m}", (_PlantedStage, Stage), {"name": f"planted-{m}", "modality": m}) for m in ("text", "image")]
    for stage_cls in stages:
        manifest = run_stage(stage_cls, Stage.Config(batch_size=24), StageContext("toy"), layout, RunOptions(), scorer)
        features = manifest["stats"]["features"]
        side = stage_cls.modality
        assert features[f"n_{side}_variant"] == manifest["stats"]["variants"] and features[f"fd_{side}"] > 0
        assert manifest["config"]["scorer"]["revision"].startswith("sha256:")
    # Generic criteria: pairs with a clearly positive cosine, no farther out than 99% of the originals themselves.
    run_filter("toy", FilterConfig(name="clean", min_alignment=0.5, shift_percentile=99), layout)
    keep = load_filter(filter_path(layout, "toy", "clean"))
    kept_ops: dict[str, list[str]] = {}
    for stage_cls in stages:
        from pipeline.curate.stats import read_stage_scores

        scores = read_stage_scores(stage_cls.name, layout.stage_dir("toy", stage_cls.name))
        for key, index, op in zip(scores.keys, scores.index, scores.ops):
            kept_ops.setdefault(op, []).append(keep.keeps(stage_cls.name, key, int(index)))
    assert not any(kept_ops["garbled"]) and not any(kept_ops["noise"])
    assert np.mean(kept_ops["other-image"]) < 0.1
    assert np.mean(kept_ops["genuine"]) > 0.9
