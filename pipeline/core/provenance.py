"""Provenance of a result file: what made it (source commit, library versions, device, precision, command line).

Every writer of a result (evaluation JSON, study and `make report` report.json, bench.json, manifests, stats and
filters) stores :func:`provenance` under the one key :data:`PROVENANCE_KEY`, outside every fingerprint, so that
two runs' results can be compared without it (``python -m pipeline.study.compare``).

It is cheap (git runs once per process) and never fails a run: a source that is not a git checkout (installed
from a wheel), a missing git or a missing library give "unknown" / None instead.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PROVENANCE_KEY = "provenance"
#: Reported name -> distribution name (versions read from the installed metadata: nothing is imported).
PACKAGES = {"torch": "torch", "transformers": "transformers", "open_clip": "open_clip_torch",
            "diffusers": "diffusers", "webdataset": "webdataset"}
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the `pipeline` package


@functools.lru_cache(maxsize=4)
def source_commit(root: Path = SOURCE_ROOT) -> tuple[str, bool | None]:
    """(commit, dirty) of the git checkout whose top level is ``root``; ("unknown", None) otherwise.

    Dirty means tracked files differ from the commit (untracked files do not count, as in `git describe
    --dirty`). The top level must be ``root`` itself: a package installed into a virtual environment that lies
    inside some other checkout must not report that checkout's commit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}  # GIT_DIR etc. would point elsewhere

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                              timeout=30, env=env).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return "unknown", None
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name, dist in PACKAGES.items():
        try:
            versions[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_fields(device: Any = None) -> dict[str, Any]:
    """The device a run used (None where the writer did not run a model), the CPU's capability as torch sees
    it (AVX2, AVX512, ...), for a CUDA device the GPU's name, and the CUDA version torch was built with (None
    for a CPU build: the package version does not say)."""
    out: dict[str, Any] = {"device": None if device is None else str(device), "cpu_capability": None, "gpu": None,
                           "cuda": None}
    try:
        import torch

        out["cuda"] = torch.version.cuda
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        if device is not None and torch.device(device).type == "cuda":
            out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    except Exception:  # noqa: BLE001 - provenance must never fail the run it describes
        pass
    return out


def provenance(device: Any = None, precision: str | None = None) -> dict[str, Any]:
    """What to store under :data:`PROVENANCE_KEY`: ``device`` and ``precision`` as the run resolved them."""
    commit, dirty = source_commit()
    return {"commit": commit, "dirty": dirty, "versions": package_versions(), **device_fields(device),
            "precision": precision, "python": platform.python_version(), "argv": list(sys.argv)}
