"""A command's worker processes end with it.

`stop_on_signals` (the CLI installs it) turns SIGTERM into SystemExit, as Ctrl-C (SIGINT) is KeyboardInterrupt
already: the command unwinds, so its pools shut down in their `finally` (Ray actors are killed) and
multiprocessing's exit handler ends the daemonic loader workers. `die_with_parent`, called first thing in every
worker process, makes the kernel kill the worker when its parent ends however it ends (SIGKILL included,
where nothing of the parent runs): a pool worker busy with a shard, or a loader worker blocked on a full queue,
would otherwise run on with PPID 1.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from types import FrameType

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when its parent (`parent_pid`, which started it) exits; elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this worker may outlive its parent", ctypes.get_errno())
        return
    if os.getppid() != parent_pid:  # the parent ended before the request was in place
        os._exit(1)


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def stop_on_signals() -> None:
    """SIGTERM ends the command as SystemExit(143) does: `finally` blocks and exit handlers run."""
    signal.signal(signal.SIGTERM, _exit_on_signal)
