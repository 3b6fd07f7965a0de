"""The training loader: zips base and stage shards, draws 1:1 / 1:N / N:1 / N:N pairs, honours a filter."""

from __future__ import annotations

import itertools
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from pipeline.curate.pairs import base_shard_urls
from pipeline.core.shards import read_tar
from pipeline.train import data
from pipeline.train.config import DataConfig
from pipeline.train.toy import write_toy_shards


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory):
    return write_toy_shards(tmp_path_factory.mktemp("shards"), shards=2, per_shard=12, text_stage="txt",
                            image_stage="img")


def _draw(base, stages, keep=None, batches=6, resampled=True, seed=0, batch_size=8, captions="primary"):
    urls = base_shard_urls(base, "train", stages)
    pipeline = data.build_pipeline(urls, batch_size=batch_size, image_size=32, stages=stages, keep=keep,
                                   shuffle_buffer=16, resampled=resampled, seed=seed, captions=captions)
    return list(itertools.islice(iter(pipeline), batches))


def _shard_captions(base) -> dict[str, tuple[list[str], int]]:
    """key -> (all captions, primary index), read from the base shards."""
    out = {}
    for url in base_shard_urls(base, "train"):
        for sample in read_tar(Path(url)):
            meta = json.loads(sample["json"])
            out[sample["__key__"]] = (meta["captions"], meta["primary"])
    return out


def test_without_stages_every_pair_is_the_primary_caption(toy_base):
    for batch in _draw(toy_base, ()):
        assert batch["images"].shape == (8, 3, 32, 32)
        assert 0 <= float(batch["images"].min()) and float(batch["images"].max()) <= 1
        assert set(batch["image_sources"]) == set(batch["text_sources"]) == {"base"}
        assert all(t.startswith("a ") and t.endswith(" picture") for t in batch["texts"])


def test_draws_from_every_chosen_stage(toy_base):
    batches = _draw(toy_base, ("txt", "img"), batches=8)
    images = Counter(s for b in batches for s in b["image_sources"])
    texts = Counter(s for b in batches for s in b["text_sources"])
    assert set(images) == {"base", "img"} and set(texts) == {"base", "txt"}


def test_pairs_respect_what_an_image_variant_depicts():
    """v0 depicts caption 2 (no text variant of it loaded): it pairs with caption 2; others pair with any text."""
    sample = {
        "__key__": "train_000000_000000", "jpg": b"base",
        "json": json.dumps({"captions": ["c0", "c1", "c2"], "primary": 0}).encode(),
        "txt": {"json": json.dumps({"variants": [{"text": "p1", "caption_index": 1}]}).encode()},
        "img": {"v0.jpg": b"v0", "v1.jpg": b"v1", "json": json.dumps({"variants": [
            {"file": "v0.jpg", "caption_index": 2}, {"file": "v1.jpg", "caption_index": None}]}).encode()},
    }
    drawer = data.PairDrawer(("txt", "img"), keep=None, seed=0)
    pairs = Counter((p.image, p.text) for p in (drawer(sample) for _ in range(400)))
    assert set(pairs) == {(b"v0", "c2")} | {(i, t) for i in (b"base", b"v1") for t in ("c0", "p1")}


def test_filter_drops_variants(toy_base):
    calls = []

    def keep(stage: str, key: str, index: int) -> bool:
        calls.append((stage, key, index))
        return stage != "txt"  # drop every text variant

    batches = _draw(toy_base, ("txt", "img"), keep=keep)
    assert {s for b in batches for s in b["text_sources"]} == {"base"}
    assert {s for b in batches for s in b["image_sources"]} >= {"img"}
    assert {c[0] for c in calls} == {"txt", "img"}


def test_same_seed_same_stream_and_epoch_mode_covers_each_sample_once(toy_base):
    first = [b["texts"] for b in _draw(toy_base, ("txt",), seed=3)]
    again = [b["texts"] for b in _draw(toy_base, ("txt",), seed=3)]
    assert first == again
    epoch = _draw(toy_base, (), resampled=False, batches=100)
    keys = [k for b in epoch for k in b["keys"]]
    assert len(keys) == len(set(keys)) == 24  # 2 shards x 12 samples, 3 full batches


def test_missing_or_misaligned_stage_is_named(toy_base, tmp_path):
    with pytest.raises(FileNotFoundError, match="stage 'nope'"):
        base_shard_urls(toy_base, "train", ("nope",))
    root = tmp_path / "toy"
    shutil.copytree(toy_base.parent, root)
    # Same names, different keys: swap the stage's two shards.
    a, b = sorted((root / "txt").glob("*.tar"))
    tmp = a.with_suffix(".swap")
    a.rename(tmp), b.rename(a), tmp.rename(b)
    with pytest.raises(ValueError, match="not aligned"):
        _draw(root / "base", ("txt",), batches=1, resampled=False)


def test_a_filter_is_found_by_name_where_make_filter_writes_it(tmp_path):
    from dataclasses import replace

    from pipeline.core.paths import Layout
    from pipeline.train.config import TrainConfig
    from pipeline.train.main import load_keep_fn

    layout = Layout(tmp_path / "shards", tmp_path / "manifests")
    path = layout.dataset_manifests("synth") / "filters" / "clean.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"name": "clean", "stages": {"eda": {"keep": {"k1": [0, 2]}}}}))
    cfg = TrainConfig(dataset="synth")
    keeps = load_keep_fn(replace(cfg, data=replace(cfg.data, filter="clean")), layout)
    assert [keeps("eda", "k1", i) for i in range(3)] == [True, False, True]
    assert not keeps("eda", "k2", 0) and keeps("randaug", "k1", 5)  # unnamed stages keep everything
    with pytest.raises(FileNotFoundError, match="make filter"):
        load_keep_fn(replace(cfg, data=replace(cfg.data, filter="nope")), layout)


@pytest.mark.parametrize("captions", ["primary", "all"])
def test_an_epoch_yields_each_image_caption_pair_once(toy_base, captions):
    """`primary`: one pair per image, its primary caption; `all`: every human caption of every image, once."""
    truth = _shard_captions(toy_base)
    epoch = _draw(toy_base, (), resampled=False, batches=1000, batch_size=1, captions=captions)
    pairs = Counter((k, t) for b in epoch for k, t in zip(b["keys"], b["texts"]))
    if captions == "all":
        expected = {(key, c) for key, (caps, _) in truth.items() for c in caps}
    else:
        expected = {(key, caps[primary]) for key, (caps, primary) in truth.items()}
    assert set(pairs) == expected and set(pairs.values()) == {1}
    assert len(expected) == (72 if captions == "all" else 24)  # 24 images x 3 captions


def test_all_captions_keep_two_captions_of_one_image_out_of_a_batch(toy_base):
    batches = _draw(toy_base, (), resampled=False, batches=1000, batch_size=8, captions="all")
    pairs = [(k, t) for b in batches for k, t in zip(b["keys"], b["texts"])]
    assert all(len(set(b["keys"])) == len(b["keys"]) == 8 for b in batches)
    # The end drops what cannot fill a batch of 8 distinct images: fewer than 8 images, 3 captions each.
    assert len(set(pairs)) == len(pairs) >= 72 - 7 * 3


def test_distinct_batches_defer_a_repeated_key_and_lose_nothing_but_the_tail():
    stream = [data.Pair(b"", f"{key} {i}", "base", "base", key) for key in "abcdef" for i in range(3)]
    batches = list(data.distinct_batches(3, lambda pairs: pairs)(iter(stream)))
    assert all(len({p.key for p in b}) == 3 for b in batches)
    assert len(batches) == 6 and Counter(p.text for b in batches for p in b) == Counter(p.text for p in stream)


def test_an_endless_stream_of_fewer_images_than_a_batch_still_yields_batches():
    stream = (data.Pair(b"", str(i), "base", "base", "only") for i in itertools.count())
    batches = list(itertools.islice(data.distinct_batches(4, lambda pairs: pairs)(stream), 3))
    assert [len(b) for b in batches] == [4, 4, 4]


def test_bad_captions_or_augment_or_all_with_stages_are_named():
    with pytest.raises(ValueError, match="'every'"):
        DataConfig(captions="every")
    with pytest.raises(ValueError, match="'crop'"):
        DataConfig(augment="crop")
    with pytest.raises(ValueError, match="i2t-human"):
        DataConfig(captions="all", stages=("i2t-human",))


def test_captions_and_train_augment_reach_the_config_from_env_and_options(monkeypatch):
    from typer.testing import CliRunner

    from pipeline.commands.cli import app

    seen = []

    def capture(cfg, layout, **options):
        seen.append(cfg.data)
        raise SystemExit(0)

    import pipeline.train.pretrain  # noqa: F401  (imported first: it binds main.train, which must stay the real one)

    monkeypatch.setattr("pipeline.train.main.train", capture)
    runner = CliRunner()
    runner.invoke(app, ["train"], env={"MAT_CAPTIONS": "all", "MAT_TRAIN_AUGMENT": "rrc"})
    runner.invoke(app, ["train", "--captions", "primary"], env={"MAT_CAPTIONS": "all"})
    runner.invoke(app, ["train"], env={"MAT_CAPTIONS": "", "MAT_TRAIN_AUGMENT": ""})
    assert [(d.captions, d.augment) for d in seen] == [("all", "rrc"), ("primary", "none"), ("primary", "none")]


@pytest.mark.parametrize("cut", ["member boundary", "inside a member"])
def test_a_truncated_base_shard_is_named(toy_base, tmp_path, cut):
    import tarfile

    root = tmp_path / "toy"
    shutil.copytree(toy_base.parent, root)
    shard = sorted((root / "base").glob("train-*.tar"))[0]
    with tarfile.open(shard) as tar:
        last_json = [m for m in tar.getmembers() if m.name.endswith(".json")][-1]
    key = last_json.name.split(".")[0]
    with open(shard, "r+b") as handle:  # before the last json member: a tar that reads cleanly; inside it: one that does not
        handle.truncate(last_json.offset if cut == "member boundary" else last_json.offset_data + last_json.size // 2)
    message = (rf"base shard {shard}: sample '{key}' has no json member" if cut == "member boundary"
               else rf"^corrupt or truncated shard {shard}: unexpected end of data$")
    with pytest.raises(ValueError, match=message):
        _draw(root / "base", (), batches=10, resampled=False, batch_size=1)
