from __future__ import annotations

import os

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from pipeline.models.hf import CLIP_PRESETS, ModelNotFoundError, build_clip, load_clip, load_mlm, projected, train_tokenizers


def test_tokenizers_are_word_level_on_the_caption_vocabulary(tiny_captions):
    clip_tok, bert_tok = train_tokenizers(tiny_captions, vocab_size=300)
    for caption in tiny_captions[:10]:
        words = caption.split()
        assert len(clip_tok.tokenize(caption)) == len(words)
        assert len(bert_tok.tokenize(caption)) == len(words)
    # unseen words split into pieces rather than vanishing into [UNK]
    assert bert_tok.unk_token not in bert_tok.tokenize("zebra")
    assert clip_tok.eos_token_id != 2 and clip_tok.pad_token_id == clip_tok.eos_token_id


def test_model_dir_is_a_standard_hf_directory(tiny_model_dirs):
    path = tiny_model_dirs["clip"]
    model = CLIPModel.from_pretrained(path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    proc = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
    assert model.config.text_config.vocab_size == len(tok)
    assert model.config.text_config.eos_token_id == tok.eos_token_id
    assert proc.crop_size["height"] == CLIP_PRESETS["tiny"]["vision"]["image_size"]


def test_save_load_round_trip_gives_identical_embeddings(tiny_captions, tmp_path):
    clip_tok, _ = train_tokenizers(tiny_captions, vocab_size=300)
    bundle = build_clip("tiny", clip_tok)
    images = torch.rand(3, 3, bundle.image_size, bundle.image_size)
    texts = tiny_captions[:5]
    loaded = load_clip(str(bundle.save(tmp_path / "clip")))
    with torch.no_grad():
        assert torch.equal(bundle.encode_images(images), loaded.encode_images(images))
        assert torch.equal(bundle.encode_texts(texts), loaded.encode_texts(texts))
    assert loaded.image_size == bundle.image_size and loaded.mean == pytest.approx(bundle.mean)


def test_embeddings_are_normalised_and_padding_does_not_change_them(tiny_clip, tiny_images, tiny_captions):
    with torch.no_grad():
        img = tiny_clip.encode_images(tiny_images)
        batch = tiny_clip.encode_texts(["a red star", tiny_captions[0]])
        alone = tiny_clip.encode_texts(["a red star"])
    assert torch.allclose(img.norm(dim=-1), torch.ones(len(img)), atol=1e-5)
    assert torch.allclose(batch[0], alone[0], atol=1e-5)


def test_encode_images_normalises_inside_and_is_differentiable(tiny_clip, tiny_images):
    x = tiny_images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(tiny_clip.encode_images(x).sum(), x)  # leaves the shared model's .grad alone
    assert grad.abs().sum() > 0
    expected = (tiny_images[:, 0] - tiny_clip.mean[0]) / tiny_clip.std[0]
    assert torch.allclose(tiny_clip.normalize(tiny_images)[:, 0], expected, atol=1e-6)


def test_preprocess_resizes_and_crops_to_unnormalised_pixels(tiny_clip):
    wide = Image.new("RGB", (100, 50), (255, 0, 0))
    out = tiny_clip.preprocess([wide, Image.new("L", (40, 40), 128)])
    assert out.shape == (2, 3, tiny_clip.image_size, tiny_clip.image_size)
    assert torch.allclose(out[0, 0], torch.ones_like(out[0, 0]), atol=1e-2) and out[0, 1].abs().max() < 1e-2
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_tokenize_truncates_to_max_length(tiny_clip):
    batch = tiny_clip.tokenize(["red " * 200, "a star"])
    assert batch["input_ids"].shape[1] == tiny_clip.max_length
    assert batch["attention_mask"][1].sum() < tiny_clip.max_length


def test_mlm_round_trip(tiny_model_dirs):
    mlm = load_mlm(tiny_model_dirs["mlm"])
    assert mlm.tokenizer.mask_token_id is not None
    assert mlm.model.config.vocab_size == len(mlm.tokenizer)


@pytest.mark.parametrize("loader", [load_clip, load_mlm])
def test_missing_dir_raises_model_not_found_naming_it(loader, tmp_path):
    (tmp_path / "clip-a").mkdir()
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(ModelNotFoundError, match="no_such_model") as info:
        loader(missing)
    assert str(info.value) == f"model {missing!r} not found: no such folder ({tmp_path} holds clip-a, newest first)"
    assert isinstance(info.value, FileNotFoundError)


@pytest.fixture
def hub_online_but_unreachable(monkeypatch):
    """The hub not offline, and any hub or file lookup of transformers fails the test: a spec that does reach
    transformers spent 38 s retrying the hub before."""
    import huggingface_hub
    import transformers

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def no_hub(*args, **kwargs):
        raise AssertionError(f"asked transformers / the hub for {args[:2]}")

    for name in ("AutoConfig", "CLIPModel", "BertForMaskedLM", "AutoTokenizer"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", no_hub)
    monkeypatch.setattr(transformers.utils.hub, "cached_files", no_hub)


@pytest.mark.parametrize("spec", ["runs/nope", "./nope", "../nope", "runs/nope/clip", "~/surely-no-such-folder-here"])
def test_a_missing_folder_is_refused_at_once_without_the_hub(spec, tmp_path, monkeypatch, hub_online_but_unreachable):
    """`eval --ckpt runs/nope`: 38 s of hub retries, then a hint to `make pretrain`, before."""
    from pipeline.models.loading import load_model

    (tmp_path / "runs" / "mat-synth-1").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for loader in (load_model, load_clip, load_mlm):
        with pytest.raises(ModelNotFoundError, match=rf"^model '{spec}' not found: no such folder") as info:
            loader(spec)
    if spec.startswith("runs/"):
        assert str(info.value).endswith("(runs holds mat-synth-1, newest first)")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ModelNotFoundError, match=r"^model 'a-file' is a file, not a model folder$"):
        load_model("a-file")


def test_which_specs_look_like_folders(tmp_path, monkeypatch):
    from pipeline.models.errors import looks_like_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for spec in ("runs/nope", "./x", "../x", "/x", "~/x", "a/b/c", ".hidden", "runs"):
        assert looks_like_path(spec), spec
    for spec in ("openai/clip-vit-base-patch16", "bert-base-uncased", "org/name"):
        assert not looks_like_path(spec), spec
    (tmp_path / "openai").mkdir()  # a folder of that name here: the spec means it
    assert looks_like_path("openai/clip-vit-base-patch16")


def test_offline_hub_id_raises_model_not_found(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="nobody/no-such-clip"):
        load_clip("nobody/no-such-clip")


def test_unknown_preset_is_a_value_error(tiny_captions):
    clip_tok, _ = train_tokenizers(tiny_captions[:4], vocab_size=100)
    with pytest.raises(ValueError, match="huge"):
        build_clip("huge", clip_tok)




def _v4_and_v5_features(model: CLIPModel, tower: str, projection: str):
    """What ``get_<tower>_features`` returns in transformers 4.x (the projected tensor) and in 5.x (the tower's
    output with ``pooler_output`` replaced by the projection), computed from the tower and projection modules."""

    def v4(**inputs):
        return getattr(model, projection)(getattr(model, tower)(**inputs).pooler_output)

    def v5(**inputs):
        out = getattr(model, tower)(**inputs)
        return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state,
                                          pooler_output=getattr(model, projection)(out.pooler_output))

    return {"4.x": v4, "5.x": v5}


def test_encode_path_accepts_what_either_transformers_major_returns(tiny_clip, tiny_images, tiny_captions, monkeypatch):
    model, texts = tiny_clip.model, tiny_captions[:3]
    with torch.no_grad():
        installed = tiny_clip.encode_images(tiny_images), tiny_clip.encode_texts(texts)
    images = _v4_and_v5_features(model, "vision_model", "visual_projection")
    words = _v4_and_v5_features(model, "text_model", "text_projection")
    for major in ("4.x", "5.x"):
        monkeypatch.setattr(model, "get_image_features", images[major])
        monkeypatch.setattr(model, "get_text_features", words[major])
        with torch.no_grad():
            image_emb, text_emb = tiny_clip.encode_images(tiny_images), tiny_clip.encode_texts(texts)
        assert torch.allclose(image_emb, installed[0], atol=1e-6), major
        assert torch.allclose(text_emb, installed[1], atol=1e-6), major


def test_an_unknown_features_return_type_is_named():
    with pytest.raises(TypeError, match="tuple"):
        projected((torch.zeros(1, 2), torch.zeros(1, 2)))


def test_training_tokenizers_on_transformers_4_is_refused_by_name(tiny_captions, monkeypatch):
    monkeypatch.setattr("pipeline.models.hf.TRANSFORMERS_VERSION", "4.57.6")
    with pytest.raises(RuntimeError, match="transformers>=5; installed: 4.57.6"):
        train_tokenizers(tiny_captions, vocab_size=100)


def test_loading_leaves_the_global_rng_as_it_was(tiny_model_dirs, monkeypatch):
    """transformers 4.x draws random initial weights while loading; a seeded run must not see that."""
    original = CLIPModel.from_pretrained.__func__

    def like_v4(cls, *args, **kwargs):
        torch.rand(1000)  # what 4.x's weight initialisation does to the global generator
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(CLIPModel, "from_pretrained", classmethod(like_v4))
    torch.manual_seed(0)
    load_clip(tiny_model_dirs["clip"])
    after_load = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after_load, torch.rand(3))


_VOCAB_DIGEST = """
import hashlib, json, sys
from pipeline.models.hf import train_tokenizers
clip_tok, bert_tok = train_tokenizers(json.loads(sys.argv[1]), vocab_size=300)
vocabs = [sorted(clip_tok.get_vocab().items()), sorted(bert_tok.get_vocab().items())]
print(hashlib.sha256(json.dumps(vocabs).encode()).hexdigest())
"""


def test_tokenizers_are_the_same_in_every_process(tiny_captions):
    # The tokenizers library's trainers gave each process its own alphabet order, hence other ids (issue 21).
    import json
    import subprocess
    import sys

    digests = {subprocess.run([sys.executable, "-c", _VOCAB_DIGEST, json.dumps(tiny_captions)], check=True,
                              capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": str(seed)}
                              ).stdout for seed in (1, 2, 3)}
    assert len(digests) == 1


def test_merges_take_the_most_frequent_pair_and_break_ties_by_order():
    from collections import Counter

    from pipeline.models.vocab import learn_merges

    words = Counter({("b", "##a", "##d"): 2, ("a", "##d"): 2, ("c", "##a", "##b"): 1})
    # ("##a", "##d") and ("a", "##d") both occur twice: the smaller pair ("##a" < "a") goes first
    assert learn_merges(words, budget=2, prefix="##") == [("##a", "##d"), ("a", "##d")]
    assert learn_merges(Counter({("x", "y</w>"): 1}), budget=5) == [("x", "y</w>")]  # stops when no pair is left
