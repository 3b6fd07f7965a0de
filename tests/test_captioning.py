"""Captioning: COCO caption metrics against hand computations, the PTB tokenizer's pure-Python equivalent, the
BLIP captioner (training, vision transplant, bad checkpoints) and `eval-captioning` end to end on synth."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from pipeline.evaluation.caption_metrics import CaptionScorer, java_available, ptb_tokenize, tokenize

# ------------------------------------------------------------------------------------------------ metrics

# Three images: one generated caption each, references already lower case without punctuation except one
# period and capital, which tokenisation removes.
CANDIDATES = ["A red circle on a square.", "the blue square", "two green stars"]
REFERENCES = [["a red circle on a blue square", "a circle"], ["the blue square", "a blue square is here"],
              ["three green stars"]]


def test_bleu4_matches_the_hand_computation():
    """Corpus BLEU-4 with the closest reference length. Clipped n-gram matches / candidate n-grams:
    1-grams 6/6 + 3/3 + 2/3 = 11/12; 2-grams 4/5 + 2/2 + 1/2 = 7/9; 3-grams 3/4 + 1/1 + 0/1 = 4/6;
    4-grams 2/3 + 0 + 0 = 2/3. Candidate length 6 + 3 + 3 = 12, closest references 7 + 3 + 3 = 13: brevity
    penalty exp(1 - 13/12)."""
    scores = CaptionScorer(REFERENCES, java=False, meteor=False).score(CANDIDATES)
    expected = math.exp(1 - 13 / 12) * (11 / 12 * 7 / 9 * 4 / 6 * 2 / 3) ** 0.25
    assert scores["bleu4"] == pytest.approx(100 * expected, rel=1e-6)


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _cider_d(candidates: list[str], references: list[list[str]], sigma: float = 6.0) -> list[float]:
    """CIDEr-D (Vedantam et al. 2015, as coco-caption computes it): tf-idf n-gram vectors (idf over the images'
    reference sets), the candidate's weights clipped at the reference's, Gaussian length penalty, mean over
    n = 1..4 and the references, times 10."""
    n_images = len(references)
    df = Counter(g for refs in references for g in {g for r in refs for n in range(1, 5) for g in _ngrams(r.split(), n)})

    def vector(words: list[str], n: int) -> dict:
        return {g: c * (math.log(n_images) - math.log(max(1.0, df[g]))) for g, c in _ngrams(words, n).items()}

    out = []
    for cand, refs in zip(candidates, references):
        total = 0.0
        for ref in refs:
            for n in range(1, 5):
                v, w = vector(cand.split(), n), vector(ref.split(), n)
                norm_v, norm_w = math.sqrt(sum(x * x for x in v.values())), math.sqrt(sum(x * x for x in w.values()))
                dot = sum(min(x, w.get(g, 0.0)) * w.get(g, 0.0) for g, x in v.items())
                cos = dot / (norm_v * norm_w) if norm_v and norm_w else dot
                total += cos * math.exp(-((len(cand.split()) - len(ref.split())) ** 2) / (2 * sigma ** 2)) / 4
        out.append(10 * total / len(refs))
    return out


def test_cider_matches_the_hand_computation():
    scores = CaptionScorer(REFERENCES, java=False, meteor=False).score(CANDIDATES)
    expected = _cider_d([ptb_tokenize(c) for c in CANDIDATES], REFERENCES)
    assert scores["per_image"]["cider"] == pytest.approx([100 * e for e in expected], rel=1e-4)
    assert scores["cider"] == pytest.approx(100 * sum(expected) / 3, rel=1e-6)
    assert scores["meteor"] is None and scores["spice"] is None


# Caption punctuation, contractions, quotes, brackets, numbers, initials, hyphens and odd spacing.
PTB_FIXTURE = ["A man's dog isn't running.", "Two (small) dogs, \"playing\" in the snow!",
               "A black-and-white photo of 3.5 cats...", "The U.S. flag; it's 1,000 feet tall: wow?",
               "A cat [sitting] on a {table} - nice -- very nice", "a woman's hat & coat/scarf", "they're 'here' `now`",
               "A man can't won't do it", "I'd we'll you've I'm", "e-mail at 5:30 p.m.", "A dog.Running fast",
               "Cats... and dogs", "The dogs' bowls are empty.", "  Two  spaces\tand a tab ",
               "Is this a cat?  Yes.", "A 2-year-old child, eating.", "people at the 'beach'."]


@pytest.mark.skipif(not java_available(), reason="no java: Stanford's PTBTokenizer cannot run")
def test_the_python_tokenizer_gives_stanfords_tokens():
    stanford = tokenize({i: [c] for i, c in enumerate(PTB_FIXTURE)}, java=True)
    assert [ptb_tokenize(c) for c in PTB_FIXTURE] == [stanford[i][0] for i in range(len(PTB_FIXTURE))]


def test_without_java_meteor_is_none_with_a_note(monkeypatch):
    import pipeline.evaluation.caption_metrics as metrics

    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    scorer = CaptionScorer(REFERENCES)
    assert not scorer.java and scorer.score(CANDIDATES)["meteor"] is None
    assert any("METEOR not computed" in n for n in scorer.notes) and any("SPICE" in n for n in scorer.notes)


@pytest.mark.slow
@pytest.mark.skipif(not java_available(), reason="no java: METEOR cannot run")
def test_meteor_of_a_reference_is_full():
    scores = CaptionScorer([["a red circle on a blue square"]]).score(["a red circle on a blue square"])
    assert scores["meteor"] == pytest.approx(100.0, abs=1e-6)


def test_spice_is_not_shipped_with_pycocoevalcap():
    """The claim of the SPICE note: the CoreNLP jars SPICE needs are downloaded at first use, not installed."""
    import importlib.util
    from pathlib import Path

    spice_dir = Path(importlib.util.find_spec("pycocoevalcap.spice").origin).parent
    assert "nlp.stanford.edu" in (spice_dir / "get_stanford_models.py").read_text()
    assert not (spice_dir / "lib" / "stanford-corenlp-3.6.0.jar").exists()


# ------------------------------------------------------------------------------------ models and evaluation


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """synth (200 images) ingested; a tiny BLIP retrieval model; a captioner on its vision encoder whose decoder
    is trained on the train split, saved as MODELS_DIR/synth/blip-captioning."""
    from conftest import tiny_blip
    from pipeline.core.executor import RunOptions
    from pipeline.core.paths import Layout
    from pipeline.core.schema import read_captions
    from pipeline.data.ingest import IngestConfig, run_ingest
    from pipeline.models.hf import train_tokenizers
    from pipeline.train.captioner import build_captioner_for, train_captioner, train_urls

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("captioning")
    layout = Layout(shards_dir=root / "shards", manifests_dir=root / "manifests", runs_dir=root / "runs",
                    models_dir=root / "models")
    run_ingest(IngestConfig(dataset="synth", synth_size=200, shard_size=1000), layout, RunOptions(workers=1))
    _, bert = train_tokenizers(read_captions(layout.base_dir("synth")), 300)
    torch.manual_seed(0)
    blip = tiny_blip(bert)
    captioner = build_captioner_for(blip)
    losses = train_captioner(captioner, train_urls(layout.base_dir("synth")), steps=120, batch_size=16, lr=5e-3,
                             seed=0, warmup=5)
    return {"layout": layout, "blip": str(blip.save(root / "blip")), "losses": losses, "captioner": captioner,
            "caption_dir": str(captioner.save(layout.model_dir("synth", "blip-captioning")))}


@pytest.fixture(scope="module")
def record(trained):
    from pipeline.evaluation.captioning import evaluate_captioning
    from pipeline.evaluation.config import CaptioningConfig

    return evaluate_captioning(CaptioningConfig(checkpoint=trained["blip"], name="tiny", size=16, batch_size=16,
                                                attacks=("pgd",), attack_source=trained["blip"], meteor=False,
                                                device="cpu"), trained["layout"])


def test_the_decoder_learns_and_the_vision_encoder_stays(trained):
    from pipeline.models.loading import load_model

    losses = trained["losses"]
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10
    blip = load_model(trained["blip"])
    for (name, a), b in zip(blip.model.vision_model.state_dict().items(),
                            trained["captioner"].model.vision_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_evaluation_writes_every_row_with_per_image_scores(trained, record):
    from pipeline.evaluation.captioning import captioning_path

    path = captioning_path(trained["layout"], "synth", "tiny")
    assert json.loads(path.read_text())["metrics"].keys() == {"clean", "pgd-lm", "pgd"}
    assert record["n_images"] == 16 and len(record["keys"]) == 16
    assert [record["metrics"][k]["setting"] for k in ("clean", "pgd-lm", "pgd")] == ["clean", "white-box", "transfer"]
    for row in record["metrics"].values():
        assert len(row["per_image"]["captions"]) == len(row["per_image"]["cider"]) == 16
        assert row["cider"] == pytest.approx(sum(row["per_image"]["cider"]) / 16, abs=1e-3)
        assert row["meteor"] is None and row["spice"] is None
    assert record["metrics"]["clean"]["cider"] > 5  # the decoder learned the synth captions
    assert any("SPICE" in note for note in record["notes"])


def test_generation_is_blips_with_the_prompt_removed(trained):
    """Beam 3, 20 / 5 tokens with the prompt: the caption is the full decoded output after the prompt's tokens."""
    captioner = trained["captioner"]
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompt = captioner.tokenizer([captioner.prompt] * 2, return_tensors="pt").input_ids
    with torch.no_grad():
        full = captioner.model.generate(pixel_values=captioner.normalize(images), input_ids=prompt, num_beams=3,
                                        max_length=20, min_length=5)
    texts = [captioner.tokenizer.decode(ids, skip_special_tokens=True) for ids in full]
    assert [f"a picture of {c}" for c in captioner.generate(images)] == texts
    assert all(len(ids[ids != captioner.tokenizer.pad_token_id]) <= 20 for ids in full)


def test_pgd_on_the_captioning_loss_lowers_cider(trained, record):
    """The white-box row: CIDEr drops, and the attack raised the loss it maximises."""
    from pipeline.evaluation.captioning import lm_pgd
    from pipeline.evaluation.config import CaptioningConfig

    assert record["metrics"]["pgd-lm"]["cider"] < record["metrics"]["clean"]["cider"]
    captioner = trained["captioner"]
    from pipeline.evaluation.evaluate import load_test_set

    data = load_test_set(trained["layout"].base_dir("synth"), "test", captioner, size=8, normalise=False)
    images, refs = data.batch(0, 8)
    texts = [[c.lower() for c in group] for group in refs]
    flat = [t for g in texts for t in g]
    owners = torch.tensor([i for i, g in enumerate(texts) for _ in g])
    adv = lm_pgd(captioner, CaptioningConfig(device="cpu"))(0, images, texts)
    with torch.no_grad():
        assert captioner.lm_loss(adv, flat, owners) > captioner.lm_loss(images, flat, owners)
    assert (adv - images).abs().max() <= 2 / 255 + 1e-6


def test_a_retrieval_checkpoint_is_no_captioner(trained):
    from pipeline.models.blip_captioning import load_captioner

    with pytest.raises(ValueError, match="no text decoder weights") as error:
        load_captioner(trained["blip"])
    assert "\n" not in str(error.value)


def test_the_cli_gives_one_line_for_a_captioner_without_decoder(trained):
    from typer.testing import CliRunner

    from pipeline.commands.cli import app

    layout = trained["layout"]
    env = {"MAT_SHARDS_DIR": str(layout.shards_dir), "MAT_MANIFESTS_DIR": str(layout.manifests_dir),
           "MAT_MODELS_DIR": str(layout.models_dir), "MAT_RUNS_DIR": str(layout.runs_dir)}
    out = CliRunner().invoke(app, ["eval-captioning", "--caption-model", trained["blip"], "--size", "2",
                                   "--device", "cpu"], env=env)
    assert out.exit_code != 0
    errors = [line for line in out.output.splitlines() if line.startswith("error:")]  # beside transformers' progress
    assert len(errors) == 1 and "no text decoder weights" in errors[0] and "Traceback" not in out.output, out.output


def test_the_vision_encoder_comes_from_the_retrieval_model(trained):
    from transformers import AutoTokenizer

    from pipeline.models.blip_captioning import build_captioner, with_vision_from
    from pipeline.models.loading import load_model

    blip = load_model(trained["blip"])
    torch.manual_seed(1)  # another draw than the retrieval model's
    captioner = build_captioner("tiny", AutoTokenizer.from_pretrained(trained["blip"]))
    mine, theirs = captioner.model.vision_model.state_dict(), blip.model.vision_model.state_dict()
    assert not torch.equal(mine["encoder.layers.0.self_attn.qkv.weight"], theirs["encoder.layers.0.self_attn.qkv.weight"])
    with_vision_from(captioner, blip)
    assert all(torch.equal(v, theirs[k]) for k, v in captioner.model.vision_model.state_dict().items())


def test_a_vision_encoder_of_another_shape_is_refused(trained):
    from transformers import AutoTokenizer, BlipConfig

    from pipeline.models.blip import build_blip
    from pipeline.models.blip_captioning import with_vision_from

    tok = AutoTokenizer.from_pretrained(trained["blip"])
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    other = build_blip(BlipConfig(text_config=dict(layers, vocab_size=len(tok)),
                                  vision_config=dict(layers, image_size=32, patch_size=16)), tok)
    with pytest.raises(ValueError, match=r"patch_size 8 vs 16") as error:
        with_vision_from(trained["captioner"], other)
    assert "\n" not in str(error.value)
