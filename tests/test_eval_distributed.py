"""`eval` across processes (torchrun; here 2 gloo processes on CPU started with torch.multiprocessing, each
with torchrun's environment, calling `evaluate` as the CLI does): the same metrics and embedding digests as one
process; a killed rank's finished batches are resumed by a rerun with the same number of processes; a rerun with
another number of processes is refused."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.core.paths import Layout
from pipeline.evaluation.evaluate import EvalConfig, eval_path, evaluate
from pipeline.evaluation.resume import PartialStore

# 10 images in batches of 3: global batches 0-3 (the last of 1 image); rank 0 of 2 attacks 0 and 2, rank 1 1 and 3.
# pgd: random start from the batch seed; sga: text-to-image map within the batch, the batch seed's noise.
N_IMAGES = 10
SETTINGS = {"batch_size": 3, "attacks": ("pgd", "sga"), "steps": 2, "top_k": 3, "device": "cpu",
            "report_to": ()}
CRASH_RANK, CRASH_AT = 1, 3  # rank 1 dies right after storing its 3rd batch: pgd 1, pgd 3, sga 1


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Layout:
    root = tmp_path_factory.mktemp("eval_dist")
    return Layout(shards_dir=root / "shards", manifests_dir=root / "manifests", runs_dir=root / "runs",
                  models_dir=root / "models")


@pytest.fixture(scope="module")
def test_shard(tmp_path_factory, tiny_captions) -> str:
    """A few random images with 3 to 5 captions each (from the tiny models' vocabulary), as one base shard."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline.core.shards import write_tar

    rng, captions, samples = np.random.default_rng(0), iter(tiny_captions), []
    for i in range(N_IMAGES):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        record = {"key": f"test_000000_{i:06d}", "captions": [next(captions) for _ in range(3 + i % 3)], "primary": 0}
        samples.append({"__key__": record["key"], "jpg": buffer.getvalue(), "json": record})
    path = tmp_path_factory.mktemp("eval_dist_data") / "test-000000.tar"
    write_tar(path, samples)
    return str(path)


def _config(models: dict[str, str], data: str, name: str) -> EvalConfig:
    return EvalConfig(checkpoint=models["clip"], mlm=models["mlm"], data=data, name=name, **SETTINGS)


def _metrics(record: dict) -> dict:
    return {attack: {k: v for k, v in row.items() if not k.startswith("seconds")}
            for attack, row in record["metrics"].items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: EvalConfig, layout: Layout, out: str, crash: bool) -> None:
    """One rank as torchrun starts it (its environment), noting each batch it stores in `out`.<rank>.saves."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    save, saves = PartialStore.save_batch, Path(f"{out}.{rank}.saves")

    def save_and_note(self, attack, index, *args):
        save(self, attack, index, *args)
        with saves.open("a") as handle:
            handle.write(f"{attack} {index}\n")
        if crash and rank == CRASH_RANK and len(saves.read_text().splitlines()) == CRASH_AT:
            os._exit(9)  # as a SIGKILL: no cleanup, no unwinding

    PartialStore.save_batch = save_and_note
    try:
        record = evaluate(cfg, layout)
        Path(f"{out}.{rank}.json").write_text(json.dumps(record))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _launch(cfg: EvalConfig, layout: Layout, out: Path, crash: bool = False, world: int = 2) -> None:
    """The ranks as forked copies of this process (torch and the models' libraries already imported: a spawned
    process would spend most of this test importing them again; each rank sets one thread first, as DataLoader
    workers do); one that dies ends the others, as torchrun does."""
    from tqdm import tqdm

    if tqdm.monitor is not None:  # no thread may hold tqdm's lock at the fork
        tqdm.monitor.exit()
        tqdm.monitor = None
    mp.start_processes(_worker, args=(world, _free_port(), cfg, layout, str(out), crash), nprocs=world, join=True,
                       start_method="fork")


def _saves(out: Path, rank: int) -> list[tuple[str, int]]:
    path = Path(f"{out}.{rank}.saves")
    lines = path.read_text().splitlines() if path.is_file() else []
    return [(attack, int(index)) for attack, index in (line.split() for line in lines)]


def _partials(layout: Layout, name: str) -> list[str]:
    folder = eval_path(layout, "synth", name).parent / "partial"
    return sorted(p.name for p in folder.glob(f"{name}.*.json")) if folder.is_dir() else []


def test_two_processes_give_one_process_metrics_and_a_killed_rank_resumes(layout, tiny_model_dirs, test_shard,
                                                                        tmp_path, monkeypatch):
    monkeypatch.setattr("tqdm.tqdm.monitor_interval", 0)  # no monitor thread in the process the ranks fork from
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: on a CPU the float sums depend on the thread count
    try:
        single = evaluate(_config(tiny_model_dirs, test_shard, "one"), layout)
    finally:
        torch.set_num_threads(threads)
    assert single["n_images"] == N_IMAGES
    cfg = _config(tiny_model_dirs, test_shard, "two")
    # 1. Rank 1 dies after its first sga batch (torch.multiprocessing then ends rank 0, as torchrun would).
    with pytest.raises(mp.ProcessExitedException):
        _launch(cfg, layout, tmp_path / "killed", crash=True)
    left = _partials(layout, "two")
    assert any(n.endswith(".pgd.done.json") for n in left), left
    assert any(n.endswith(".sga.r1of2.b000001.json") for n in left), left
    assert not any(".r0of2." in n and ".b000001." in n or ".r1of2." in n and ".b000002." in n for n in left), left
    assert not eval_path(layout, "synth", "two").exists()
    # 2. Another number of processes: refused, the files kept.
    with pytest.raises(ValueError, match=r"run of 2 process\(es\).*this run of 1 does not read.*rm .*sga\.r\*of2\."):
        evaluate(cfg, layout)
    assert _partials(layout, "two") == left
    # 3. The same number: each rank attacks only what it had not stored; the result is the single process's.
    _launch(cfg, layout, tmp_path / "rerun")
    killed_saves = [_saves(tmp_path / "killed", rank) for rank in range(2)]
    rerun_saves = [_saves(tmp_path / "rerun", rank) for rank in range(2)]
    assert killed_saves[1] == [("pgd", 1), ("pgd", 3), ("sga", 1)]
    assert rerun_saves[1] == [("sga", 3)]  # pgd from its stored row, sga 1 from rank 1's batch file
    assert sorted(killed_saves[0][2:] + rerun_saves[0]) == [("sga", 0), ("sga", 2)]  # nothing attacked twice
    records = [json.loads(Path(f"{tmp_path / 'rerun'}.{rank}.json").read_text()) for rank in range(2)]
    assert records[0] == records[1]  # every rank returns rank 0's record
    written = json.loads(eval_path(layout, "synth", "two").read_text())
    assert _metrics(written) == _metrics(records[0]) == _metrics(single)  # embeddings_sha256 and per_query included
    assert written["settings"] == json.loads(json.dumps({**single["settings"], "name": "two"}))
    assert written["provenance"]["processes"] == 2 and single["provenance"]["processes"] == 1
    assert not _partials(layout, "two")
    ledger = (eval_path(layout, "synth", "two").parent / ".mat-pipeline").read_text().splitlines()
    assert sum(json.loads(line).get("wrote") == "two.json" for line in ledger) == 1  # rank 0 wrote it, once


def test_rank_files_are_named_by_rank_and_world_size(tmp_path):
    emb = torch.zeros(1, 4)
    stores = {(r, w): PartialStore(tmp_path, "ev", "0123456789abcdef" * 4, r, w) for r, w in ((0, 1), (0, 2), (1, 2))}
    for (rank, world), store in stores.items():
        store.save_batch("pgd", rank, emb, emb, 0.5)
    names = sorted(p.name for p in tmp_path.glob("ev.*.json"))
    assert names == ["ev.0123456789abcdef.pgd.b000000.json", "ev.0123456789abcdef.pgd.r0of2.b000000.json",
                     "ev.0123456789abcdef.pgd.r1of2.b000001.json"]
    assert stores[(1, 2)].load_batch("pgd", 1) is not None and stores[(0, 2)].load_batch("pgd", 1) is None
    assert stores[(0, 1)].load_batch("pgd", 1) is None  # another world size's batch 1 is never read
    assert set(stores[(0, 2)].other_world_sizes()) == {1} and set(stores[(0, 1)].other_world_sizes()) == {2}
    for store, world in ((stores[(0, 2)], 1), (stores[(0, 1)], 2)):
        patterns = store.batch_patterns(store.other_world_sizes()[world])
        matched = {n for n in names if any(fnmatch.fnmatch(str(tmp_path / n), p) for p in patterns)}
        assert matched == {n for n in names if (".r" in n) == (world == 2)}, patterns
    stores[(0, 2)].drop_batches("pgd")  # its own files only
    assert sorted(p.name for p in tmp_path.glob("ev.*.json")) == [names[0], names[2]]
    with pytest.raises(ValueError):
        PartialStore(tmp_path, "ev", "0" * 64, 2, 2)


def test_itm_reranking_is_refused_across_processes(monkeypatch, tiny_model_dirs, test_shard, layout):
    from pipeline.train.distributed import DistEnv

    monkeypatch.setattr("pipeline.evaluation.evaluate.init_distributed",
                        lambda device, timeout=None: DistEnv(rank=0, world_size=2))
    with pytest.raises(ValueError, match="ITM re-ranking.*one process"):
        evaluate(dataclasses.replace(_config(tiny_model_dirs, test_shard, "itm"), itm_k=4), layout)
