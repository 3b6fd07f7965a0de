"""The one retry / progress loop (`run_pool`) that the local and ray executors share."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.core.executor import InlinePool, TaskResult, get_executor, run_pool


def _flaky(task: tuple[str, int]) -> TaskResult:
    """Fails its first `fails` calls (counted in a file), then succeeds."""
    path, fails = Path(task[0]), task[1]
    calls = int(path.read_text()) if path.exists() else 0
    path.write_text(str(calls + 1))
    if calls < fails:
        raise RuntimeError(f"failure {calls + 1}")
    return TaskResult(path.name, ok=True, stats={"input": 1})


def _dies_once(task: tuple[str, bool]) -> TaskResult:
    """With `kill`, kills its worker process the first time (a segfault, an OOM kill), then succeeds."""
    marker, kill = task
    if kill and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    return TaskResult(Path(marker).name, ok=True)


def test_failed_tasks_are_retried_then_reported_in_task_order(tmp_path):
    tasks = [(name, (str(tmp_path / name), fails)) for name, fails in (("a", 0), ("b", 1), ("c", 5))]
    results = run_pool(InlinePool(), _flaky, tasks, "test", retries=2)
    assert [r.task_id for r in results] == ["a", "b", "c"]
    assert [r.ok for r in results] == [True, True, False]
    assert "failure 3" in results[2].error  # 1 try + 2 retries, then recorded as failed
    assert [(tmp_path / n).read_text() for n in "abc"] == ["1", "2", "3"]


def test_local_pool_replaces_a_dead_worker_process_and_retries(tmp_path):
    # A dead process breaks the whole pool: the other in-flight task fails with it and is retried too.
    tasks = [(name, (str(tmp_path / name), name == "x")) for name in ("x", "y", "z")]
    assert [(r.task_id, r.ok) for r in get_executor("local")(_dies_once, tasks, 2, "test", 1)] == [
        ("x", True), ("y", True), ("z", True)]
    tasks = [("w", (str(tmp_path / "w"), True)), ("v", (str(tmp_path / "v"), False))]
    failed = get_executor("local")(_dies_once, tasks, 2, "test", 0)
    assert not failed[0].ok and "worker process died" in failed[0].error  # no retry left
