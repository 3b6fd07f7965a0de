"""i2t-internvl on a tiny random InternVL saved with save_pretrained (transformers backend), the clean-up rules,
and the lmdeploy glue against a stand-in module with lmdeploy's call signature (the real engine needs a GPU)."""

from __future__ import annotations

import base64
import io
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.augment.captioning import LmdeployCaptioner, RemoteCodeRefused, clean_caption
from pipeline.models.errors import ModelNotFoundError
from pipeline.augment.stage import BaseSample, StageContext
from pipeline.augment.tiny_models import build_tiny_internvl
from stages.i2t_internvl import InternVLCaptionConfig, InternVLCaptionStage

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini" / "val2017"
PROMPT = "Describe this image in one short factual sentence."


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def synth_samples(n: int) -> list[BaseSample]:
    rng = np.random.RandomState(0)
    return [
        BaseSample(key=f"val_000000_{i:06d}", image_bytes=_jpeg((rng.rand(40 + 8 * i, 56, 3) * 255).astype("uint8")),
                   captions=[f"a red square number {i}"], meta={"primary": 0})
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def internvl_dir(tmp_path_factory) -> str:
    return str(build_tiny_internvl(tmp_path_factory.mktemp("tiny") / "internvl"))


def make_stage(model: str, **overrides) -> InternVLCaptionStage:
    settings = dict(model=model, captions_per_image=2, max_new_tokens=12, min_words=1, prompt=PROMPT)
    stage = InternVLCaptionStage(InternVLCaptionConfig(**{**settings, **overrides}), StageContext("synth", seed=3))
    stage.setup()
    return stage


def outputs(results) -> list:
    return [([(v.text, v.seed, v.caption_index) for v in r.variants], r.skipped) for r in results]


def test_same_seeds_same_captions_across_instances(internvl_dir):
    samples = synth_samples(3)
    first = outputs(make_stage(internvl_dir).augment_batch(samples))
    second = outputs(make_stage(internvl_dir).augment_batch(samples))
    assert first == second
    texts = [t for variants, _ in first for t, _, _ in variants]
    assert len(texts) >= 4 and len(set(texts)) == len(texts)  # sampled, not one greedy string repeated


def test_caption_of_a_sample_does_not_depend_on_its_batch(internvl_dir):
    stage = make_stage(internvl_dir)
    samples = synth_samples(4)
    batched = outputs(stage.augment_batch(samples))
    singles = [outputs(stage.augment_batch([s]))[0] for s in samples]
    assert batched == singles
    shuffled = outputs(stage.augment_batch(samples[::-1]))
    assert shuffled == batched[::-1]


def test_variants_describe_the_image_and_use_per_variant_seeds(internvl_dir):
    stage = make_stage(internvl_dir, captions_per_image=3)
    sample = synth_samples(1)[0]
    (result,) = stage.augment_batch([sample])
    assert len(result.variants) + len(result.skipped) == 3
    for v in result.variants:
        assert v.caption_index is None and v.seed == stage.seed_for(sample.key, v.extra["variant"])
    assert stage.describe()["prompt"] == PROMPT


@pytest.mark.skipif(not COCO.is_dir(), reason="coco-mini not present")
def test_real_photos(internvl_dir):
    files = sorted(COCO.glob("*.jpg"))[:3]
    samples = [BaseSample(key=f"val_000000_{i:06d}", image_bytes=f.read_bytes(), captions=["x"], meta={})
               for i, f in enumerate(files)]
    stage = make_stage(internvl_dir, max_dynamic_patch=4)  # real aspect ratios: several tiles, unequal lengths
    results = stage.augment_batch(samples)
    assert outputs(results) == [outputs(stage.augment_batch([s]))[0] for s in samples]
    assert all(len(r.variants) + len(r.skipped) == 2 for r in results)


@pytest.mark.parametrize("raw, expected", [
    ("  A dog runs on the beach. It is sunny.  ", ("A dog runs on the beach.", "")),
    ('"Caption: two cats sleep on a bed"\nSecond line', ("two cats sleep on a bed", "")),
    ("a man " + "riding a horse " * 2 + "near " * 1 + "the sea with many friends and dogs today", None),
    ("", (None, "empty")),
    ("   ...  ", (None, "empty")),
    ("cat", (None, "too_short")),
    ("the the the dog", (None, "repetition")),
    ("a dog on a dog on a dog on a dog on", (None, "repetition")),
    ("Describe this image in one short factual sentence", (None, "prompt_echo")),
    ("one short factual sentence", (None, "prompt_echo")),
    ("a cat \ufffd on a mat", (None, "garbled")),
])
def test_clean_caption(raw, expected):
    got = clean_caption(raw, PROMPT, max_words=12, min_words=3)
    if expected is None:  # length cap
        assert got[1] == "" and len(got[0].split()) == 12
    else:
        assert got == expected


def test_rejected_outputs_are_recorded_with_reasons(internvl_dir):
    stage = make_stage(internvl_dir, captions_per_image=3, min_words=3)
    raw = iter(["A dog on grass.", "a dog on grass", "dog dog dog", "", "Two cats on a sofa.", "Two cats on a sofa."])
    stage.captioner = lambda images, blobs, seeds: [next(raw) for _ in seeds]
    first, second = stage.augment_batch(synth_samples(2))
    assert [v.text for v in first.variants] == ["A dog on grass.", "a dog on grass"]
    assert [(s["variant"], s["reason"]) for s in first.skipped] == [(2, "repetition")]
    assert [v.text for v in second.variants] == ["Two cats on a sofa."]
    assert [(s["variant"], s["reason"]) for s in second.skipped] == [(0, "empty"), (2, "duplicate")]


# --- lmdeploy stand-in: same names and call signature as lmdeploy >= 0.7 (pipeline(model, backend_config=...),
# pipe(prompts, gen_config=[...]) -> [Response(text=...)]); the real engine runs only on an NVIDIA GPU node.


@dataclass
class _GenerationConfig:
    n: int = 1
    max_new_tokens: int = 512
    do_sample: bool = False
    top_p: float = 1.0
    top_k: int = 50
    temperature: float = 0.8
    random_seed: int | None = None


@dataclass
class _EngineConfig:
    dtype: str = "auto"
    tp: int = 1
    session_len: int | None = None
    max_batch_size: int | None = None


@dataclass
class _Response:
    text: str


@dataclass
class _Pipeline:
    model_path: str
    backend_config: object = None
    calls: list = field(default_factory=list)

    def __call__(self, prompts, gen_config=None, **kwargs):
        self.calls.append((prompts, gen_config))
        return [_Response(text=f"A photo number {g.random_seed % 1000} of a street.") for g in gen_config]


@pytest.fixture()
def fake_lmdeploy(monkeypatch):
    module = types.ModuleType("lmdeploy")
    module.GenerationConfig = _GenerationConfig
    module.TurbomindEngineConfig = type("TurbomindEngineConfig", (_EngineConfig,), {})
    module.PytorchEngineConfig = type("PytorchEngineConfig", (_EngineConfig,), {})
    module.pipelines = []

    def pipeline(model_path, backend_config=None, **kwargs):
        module.pipelines.append(_Pipeline(model_path, backend_config))
        return module.pipelines[-1]

    module.pipeline = pipeline
    monkeypatch.setitem(sys.modules, "lmdeploy", module)
    return module


@pytest.mark.parametrize("engine", ["turbomind", "pytorch"])
def test_lmdeploy_glue_passes_batched_requests_and_seeds(internvl_dir, fake_lmdeploy, engine):
    stage = make_stage(internvl_dir, backend="lmdeploy", engine=engine, dtype="bfloat16", max_dynamic_patch=6,
                       temperature=0.5, max_new_tokens=30)
    samples = synth_samples(2)
    results = stage.augment_batch(samples)
    (pipe,) = fake_lmdeploy.pipelines
    assert pipe.model_path == internvl_dir
    assert type(pipe.backend_config).__name__ == {"turbomind": "TurbomindEngineConfig",
                                                   "pytorch": "PytorchEngineConfig"}[engine]
    assert pipe.backend_config.dtype == "bfloat16" and pipe.backend_config.max_batch_size == 2 * 16
    ((requests, configs),) = pipe.calls  # the whole batch in one call
    seeds = [stage.seed_for(s.key, v) for s in samples for v in range(2)]
    assert [g.random_seed for g in configs] == seeds
    assert all(g.do_sample and g.temperature == 0.5 and g.max_new_tokens == 30 for g in configs)
    for request, sample in zip(requests, [s for s in samples for _ in range(2)]):
        (message,) = request
        text, image = message["content"]
        assert message["role"] == "user" and text == {"type": "text", "text": PROMPT}
        assert image["image_url"]["max_dynamic_patch"] == 6
        url = image["image_url"]["url"]
        assert base64.b64decode(url.split(",", 1)[1]) == sample.image_bytes
    assert [v.text for v in results[0].variants] == [f"A photo number {s % 1000} of a street." for s in seeds[:2]]


def test_lmdeploy_refuses_a_hub_checkpoint_unless_its_code_is_trusted(fake_lmdeploy):
    hub_id = "OpenGVLab/InternVL3-1B"
    config = InternVLCaptionConfig(model=hub_id, backend="lmdeploy")
    ok, why = InternVLCaptionStage.availability(config)
    assert not ok and "trust_remote_code=True" in why and "--trust-remote-code" in why and hub_id in why
    with pytest.raises(RemoteCodeRefused, match="not a local directory"):  # a worker building the pipeline
        LmdeployCaptioner(hub_id, config.settings())
    assert not fake_lmdeploy.pipelines  # lmdeploy never got the id
    LmdeployCaptioner(hub_id, config.settings(), trust_remote_code=True)
    assert [p.model_path for p in fake_lmdeploy.pipelines] == [hub_id]
    _, why = InternVLCaptionStage.availability(InternVLCaptionConfig(model=hub_id, backend="lmdeploy", trust_remote_code=True))
    assert "trust_remote_code" not in why  # trusted: what is left is lmdeploy's own needs (its package, a GPU)


def test_augment_cli_needs_trust_remote_code_for_a_hub_checkpoint_on_lmdeploy(tmp_path):
    from typer.testing import CliRunner

    from pipeline.commands.cli import app

    env = {"MAT_SHARDS_DIR": str(tmp_path / "s"), "MAT_MANIFESTS_DIR": str(tmp_path / "m"), "MAT_TRUST_REMOTE_CODE": ""}
    argv = ["augment", "--stages", "i2t-internvl", "--set", "i2t-internvl.backend=lmdeploy",
            "--set", "i2t-internvl.model=OpenGVLab/InternVL3-1B"]
    refused = CliRunner().invoke(app, argv, env=env)
    assert refused.exit_code == 2 and "--trust-remote-code" in " ".join(refused.output.split())
    trusted = CliRunner().invoke(app, argv, env={**env, "MAT_TRUST_REMOTE_CODE": "1"})
    assert trusted.exit_code == 2 and "trust_remote_code=True" not in " ".join(trusted.output.split())
    assert not (tmp_path / "s").exists()  # refused before any work


def test_lmdeploy_is_imported_lazily(internvl_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmdeploy", None)  # import fails like on a machine without it
    make_stage(internvl_dir)  # transformers backend never touches lmdeploy
    with pytest.raises(ImportError):
        make_stage(internvl_dir, backend="lmdeploy")


def test_missing_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    missing = str(tmp_path / "no-such-model")
    ok, why = InternVLCaptionStage.availability(InternVLCaptionConfig(model=missing))
    assert not ok and missing in why and "I2T_MODEL" in why
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        InternVLCaptionStage(InternVLCaptionConfig(model=missing), StageContext("synth")).setup()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ok, why = InternVLCaptionStage.availability(InternVLCaptionConfig(model="OpenGVLab/InternVL3-1B-hf"))
    assert not ok and "HF_HUB_OFFLINE=1" in why and "OpenGVLab/InternVL3-1B-hf" in why


def test_model_comes_from_the_config_not_the_environment(monkeypatch, internvl_dir):
    # I2T_MODEL is read by the CLI (`augment --i2t-model`, tests/test_cli.py), which passes it as the model option.
    monkeypatch.setenv("MAT_I2T_MODEL", internvl_dir)
    assert InternVLCaptionConfig().model == "OpenGVLab/InternVL3-1B-hf"
    assert InternVLCaptionStage.availability(InternVLCaptionConfig(model=internvl_dir)) == (True, "")


@pytest.mark.parametrize("bad", [{"backend": "vllm"}, {"captions_per_image": 0}, {"top_p": 0.0},
                                 {"dtype": "float8"}, {"max_words": 1, "min_words": 3}])
def test_config_rejects_bad_values(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        InternVLCaptionConfig(**bad)


@pytest.mark.parametrize("max_dynamic_patch", [1, 4])
def test_rows_of_one_image_are_processed_once_with_the_same_inputs(internvl_dir, max_dynamic_patch):
    captioner = make_stage(internvl_dir, max_dynamic_patch=max_dynamic_patch).captioner
    images = [Image.fromarray((np.random.RandomState(i).rand(40 + 30 * i, 56, 3) * 255).astype("uint8"))
              for i in range(3)]
    rows = [images[0], images[0], images[1], images[2], images[2], images[2]]
    deduplicated = captioner.prepare(rows)
    # Copies are distinct objects, so this processes every row: what prepare did before it deduplicated.
    each_row = captioner.prepare([image.copy() for image in rows])
    assert deduplicated.keys() == each_row.keys()
    for name, tensor in each_row.items():
        assert torch.equal(deduplicated[name], tensor), name
    if max_dynamic_patch > 1:
        assert each_row["pixel_values"].shape[0] > len(rows)  # several patches per image: the split is exercised
