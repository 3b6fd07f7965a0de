"""A command's workers end with it: a real command that spawns worker processes (the training loader's, the
ingest process pool) is sent SIGTERM or SIGKILL, to the command only, mid-run. SIGTERM must end it as an exit
(status 143, its `finally` blocks run), and none of the worker processes recorded while it ran may outlive it by
more than a few seconds, whichever the signal (a loader worker once ran on for 19 minutes with PPID 1)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.train.toy import write_toy_shards

ROOT = Path(__file__).resolve().parents[1]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for child in _children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its new parent, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# Seconds a worker may take to end after its command: the kernel kills it at once (PR_SET_PDEATHSIG); without
# that, a loader worker notices its parent gone only at its 5 s status check, a pool worker after its shard.
GRACE = 3.0


def _signal_mid_run(argv: list[str], cwd: Path, started, sig: int) -> tuple[int, set[int], str]:
    """Start the command, wait until `started()` and it has 2+ worker processes, send it (only it) `sig`, wait for
    it to end; return its exit code, the workers alive GRACE seconds later, and its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAT_")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", SHARDS_DIR=str(cwd / "shards"),
               MANIFESTS_DIR=str(cwd / "manifests"), RUNS_DIR=str(cwd / "runs"), MODELS_DIR=str(cwd / "models"))
    log_path = cwd / "command.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", *argv], cwd=cwd, env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            workers |= _descendants(proc.pid)
            if len(workers) >= 2 and started():
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the command ended before it was stopped:\n{log_path.read_text()[-2000:]}"
        assert len(workers) >= 2, f"no worker processes seen:\n{log_path.read_text()[-2000:]}"
        workers |= _descendants(proc.pid)
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
        deadline = time.monotonic() + GRACE
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        return code, {pid for pid in workers if _alive(pid)}, log_path.read_text()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the test's own process group
        except ProcessLookupError:
            pass
        proc.wait()


def test_a_sigterm_training_leaves_no_loader_worker(tiny_model_dirs, tmp_path):
    write_toy_shards(tmp_path / "shards", "toy", shards=4, per_shard=16)
    run_dir = tmp_path / "runs" / "run"
    argv = ["train", "--dataset", "toy", "--mode", "ft", "--clip", tiny_model_dirs["clip"], "--steps", "100000",
            "--batch-size", "4", "--log-every", "1", "--save-every", "100000", "--data-workers", "2",
            "--shuffle-buffer", "8", "--precision", "fp32", "--device", "cpu", "--report-to", "none",
            "--run-dir", str(run_dir)]
    code, survivors, output = _signal_mid_run(argv, tmp_path, (run_dir / "metrics.csv").is_file, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, output[-2000:]
    assert not survivors, f"worker processes {sorted(survivors)} outlived the command"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_ingest_leaves_no_pool_worker(tmp_path, sig):
    argv = ["ingest", "--dataset", "synth", "--synth-size", "4000", "--shard-size", "20", "--workers", "2"]
    base = tmp_path / "shards" / "synth" / "base"
    code, survivors, output = _signal_mid_run(argv, tmp_path, lambda: any(base.glob("*.stats.json")), sig)
    assert code == (128 + sig if sig == signal.SIGTERM else -sig), output[-2000:]
    assert not survivors, f"worker processes {sorted(survivors)} outlived the command"
    shards_done = len(list(base.glob("*.stats.json")))
    assert shards_done < 150, f"{shards_done} of 201 shards done: the command went on after the signal"
