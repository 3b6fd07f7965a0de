"""Resumable evaluation: SIGKILL at random moments then a rerun gives the uninterrupted metrics; stale partials
(other settings) are never reused; the fingerprint follows every setting that changes the numbers."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.evaluation.resume import PartialStore
from pipeline.evaluation.evaluate import EvalConfig, eval_path, evaluate, load_test_set, resume_fingerprint
from pipeline.core.paths import Layout

SIZE, BATCH = 20, 4  # 5 batches per attack in the kill test
QUICK = {"size": 12, "steps": 2, "top_k": 3}  # the in-process tests: 3 batches per attack, cheap attacks


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Layout:
    """synth (200 images, 20 test) and random-init tiny CLIP / masked LM with tokenizers of its captions."""
    from pipeline.data.ingest import IngestConfig, run_ingest
    from pipeline.models.hf import build_clip, build_mlm, train_tokenizers
    from pipeline.core.executor import RunOptions
    from pipeline.core.schema import read_captions

    root = tmp_path_factory.mktemp("eval_resume")
    layout = Layout(shards_dir=root / "shards", manifests_dir=root / "manifests", runs_dir=root / "runs",
                    models_dir=root / "models")
    run_ingest(IngestConfig(dataset="synth", synth_size=200, shard_size=1000), layout, RunOptions(workers=1))
    torch.manual_seed(0)
    clip_tok, bert_tok = train_tokenizers(read_captions(layout.base_dir("synth")), vocab_size=300)
    build_clip("tiny", clip_tok).save(layout.model_dir("synth", "clip"))
    build_mlm("tiny", bert_tok).save(layout.model_dir("synth", "mlm"))
    return layout


def _config(layout: Layout, name: str, **change) -> EvalConfig:
    settings = {"size": SIZE, "batch_size": BATCH, "device": "cpu", **change}
    return EvalConfig(checkpoint=str(layout.model_dir("synth", "clip")), name=name, **settings)


def _metrics(record: dict) -> dict:
    """The metrics without the timings (which no two runs share)."""
    return {attack: {k: v for k, v in row.items() if not k.startswith("seconds")}
            for attack, row in record["metrics"].items()}


def _partial_files(layout: Layout, name: str) -> set[str]:
    folder = eval_path(layout, "synth", name).parent / "partial"
    return {p.name for p in folder.glob(f"{name}.*.json")} if folder.is_dir() else set()


# ------------------------------------------------------------------------------------------- kill test


def _cli(layout: Layout, name: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "eval", "--ckpt", str(layout.model_dir("synth", "clip")),
            "--name", name, "--size", str(SIZE), "--batch-size", str(BATCH), "--device", "cpu"]


def _run_to_end(layout: Layout, name: str) -> dict:
    done = subprocess.run(_cli(layout, name), env=_env(layout), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(eval_path(layout, "synth", name).read_text())


def _env(layout: Layout) -> dict[str, str]:
    return {**os.environ, "MAT_SHARDS_DIR": str(layout.shards_dir), "MAT_MANIFESTS_DIR": str(layout.manifests_dir),
            "MAT_RUNS_DIR": str(layout.runs_dir), "MAT_MODELS_DIR": str(layout.models_dir), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_gives_the_uninterrupted_metrics(layout):
    """Three SIGKILLs, each at a random delay after the restarted process wrote a new partial file, then a rerun
    to the end: the JSON metrics, with the digest of every attack's adversarial embeddings, equal those of an
    uninterrupted run (a separate process, same settings)."""
    env, rng = _env(layout), random.Random()
    whole = _run_to_end(layout, "whole")
    seen: set[str] = set()
    kills = []
    for _ in range(3):
        proc = subprocess.Popen(_cli(layout, "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and not _partial_files(layout, "killed") - seen and time.monotonic() < deadline:
            time.sleep(0.02)
        delay = rng.uniform(0.0, 1.0)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills.append(round(delay, 2))
        proc.wait()
        seen = _partial_files(layout, "killed")
    assert len(kills) == 3, f"a run ended before its kill (delays {kills})"
    assert not eval_path(layout, "synth", "killed").exists() and seen, "the kills left no partial results"
    killed = _run_to_end(layout, "killed")
    assert _metrics(killed) == _metrics(whole), f"kill delays {kills}, partials before the rerun {sorted(seen)}"
    assert not _partial_files(layout, "killed")


# ------------------------------------------------------------------------------------ in-process tests


class Crash(RuntimeError):
    pass


def _crash_after(monkeypatch, batches: int) -> None:
    """Make the evaluation die right after it stored its n-th batch."""
    save, count = PartialStore.save_batch, {"n": 0}

    def save_then_crash(self, *args, **kwargs):
        save(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] == batches:
            raise Crash

    monkeypatch.setattr(PartialStore, "save_batch", save_then_crash)


def _tamper(layout: Layout, name: str) -> None:
    """Overwrite batch 0's stored adversarial images with batch 1's (what a reuse would show in the digest)."""
    folder = eval_path(layout, "synth", name).parent / "partial"
    path = next(folder.glob(f"{name}.*.b000000.json"))
    blob = json.loads(path.read_text())
    blob["image"] = json.loads(next(folder.glob(f"{name}.*.b000001.json")).read_text())["image"]
    path.write_text(json.dumps(blob))


def test_resume_uses_partials_of_the_same_settings_and_never_stale_ones(layout, monkeypatch):
    quick = {**QUICK, "attacks": ("pgd",)}
    reference = {seed: _metrics(evaluate(_config(layout, f"ref{seed}", seed=seed, **quick), layout))
                 for seed in (0, 1)}
    assert reference[0]["pgd"]["embeddings_sha256"] != reference[1]["pgd"]["embeddings_sha256"]
    # Same settings: the stored (tampered) batches are taken, so the tampering shows in the result.
    with monkeypatch.context() as patch:
        _crash_after(patch, 2)
        with pytest.raises(Crash):
            evaluate(_config(layout, "resume", seed=0, **quick), layout)
    assert len(_partial_files(layout, "resume")) == 2
    _tamper(layout, "resume")
    assert _metrics(evaluate(_config(layout, "resume", seed=0, **quick), layout)) != reference[0]
    assert not _partial_files(layout, "resume")
    # Another seed under the same name: the stale batches are dropped, not used.
    with monkeypatch.context() as patch:
        _crash_after(patch, 2)
        with pytest.raises(Crash):
            evaluate(_config(layout, "resume", seed=0, **quick), layout)
    _tamper(layout, "resume")
    assert _metrics(evaluate(_config(layout, "resume", seed=1, **quick), layout)) == reference[1]
    assert not _partial_files(layout, "resume")


def test_finished_attacks_are_skipped_on_resume(layout, monkeypatch):
    """A crash in the second attack keeps the first one's row: the rerun does not attack its batches again."""
    quick = {**QUICK, "attacks": ("pgd", "bert")}
    with monkeypatch.context() as patch:
        _crash_after(patch, 3 + 1)
        with pytest.raises(Crash):
            evaluate(_config(layout, "skip", **quick), layout)
    assert any(name.endswith(".pgd.done.json") for name in _partial_files(layout, "skip"))
    assert not any(".pgd.b" in name for name in _partial_files(layout, "skip"))
    attacked, save = [], PartialStore.save_batch

    def save_and_note(self, attack, *args):
        attacked.append(attack)
        save(self, attack, *args)

    monkeypatch.setattr(PartialStore, "save_batch", save_and_note)
    record = evaluate(_config(layout, "skip", **quick), layout)
    assert attacked == ["bert"] * 2  # bert's batches 1 and 2; pgd came from its stored row
    assert _metrics(record) == _metrics(evaluate(_config(layout, "skip-whole", **quick), layout))


def test_fingerprint_follows_every_setting_that_changes_the_numbers(layout):
    from pipeline.models.hf import load_clip

    clip_dir = str(layout.model_dir("synth", "clip"))
    mlm_dir = str(layout.model_dir("synth", "mlm"))
    clip = load_clip(clip_dir, device="cpu")
    data = load_test_set(layout.base_dir("synth"), "test", clip, SIZE)
    base = _config(layout, "fp")

    def key(cfg: EvalConfig = base, precision: str = "fp32", test_set=data) -> str:
        return resume_fingerprint(cfg, "cpu", precision, clip_dir, mlm_dir, test_set)

    changed = [dataclasses.replace(base, **change) for change in (
        {"seed": 1}, {"size": SIZE - 1}, {"batch_size": BATCH + 1}, {"eps": 4 / 255}, {"top_k": 3},
        {"normalise_captions": False}, {"attacks": ("pgd",)}, {"split": "val"})]
    keys = [key(cfg) for cfg in changed] + [key(precision="bf16")]
    raw = load_test_set(layout.base_dir("synth"), "test", clip, SIZE, normalise=False)
    keys.append(key(test_set=raw))
    assert len(set(keys + [key()])) == len(keys) + 1
    assert key(dataclasses.replace(base, name="other", mode="label")) == key()  # labels only
    before, weights = key(), next(Path(clip_dir).glob("*.safetensors"))
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # the same folder, other weights
        after = key()
    finally:
        weights.write_bytes(original)
    assert after != before and key() == before


def test_clean_removes_interrupted_evaluations(tmp_path):
    from pipeline.commands.clean import clean

    layout = Layout(shards_dir=tmp_path / "shards", manifests_dir=tmp_path / "manifests", runs_dir=tmp_path / "runs",
                    models_dir=tmp_path / "models")
    from pipeline.core import ledger
    from pipeline.core.fileio import atomic_write_json

    partial = eval_path(layout, "synth", "x").parent / "partial"
    written = [partial / "x.0123456789abcdef.pgd.b000000.json", eval_path(layout, "synth", "y")]
    for path in written:
        atomic_write_json(path, {})
    written.append(ledger.temp_path(partial / "x.0123456789abcdef.pgd.done.json"))  # left by a killed write
    clean(layout, "synth")
    assert not any(path.exists() for path in written) and not partial.parent.exists()
