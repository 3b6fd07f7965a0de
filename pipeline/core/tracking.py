"""Experiment tracking: scalars of training, pretraining and evaluation to TensorBoard and / or Weights & Biases.

``report_to`` names the backends (``tensorboard``, ``wandb``; ``none`` for neither), as transformers' Trainer
and open_clip's ``--report-to`` do. W&B is optional: asking for it without the package installed is a clear
error before any work starts. Its ``mode`` defaults to ``offline`` (runs are written under the log folder and can
be uploaded later with ``wandb sync``), so tracking works on machines without network; ``online`` needs a login.

Every tracker logs the run's resolved config as the run's config (W&B's config, TensorBoard's text "config").
"""

from __future__ import annotations
from pipeline.core.ledger import own_tree

import importlib.util
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPORTERS = ("tensorboard", "wandb")
WANDB_MODES = ("offline", "online", "disabled")


def parse_report_to(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """"tensorboard,wandb" / ["wandb"] / "none" -> a checked tuple of backend names."""
    items = spec.split(",") if isinstance(spec, str) else list(spec or ())
    names = tuple(dict.fromkeys(item.strip().lower() for item in items if item.strip()))
    if names in ((), ("none",)):
        return ()
    unknown = [name for name in names if name not in REPORTERS]
    if unknown:
        raise ValueError(f"report_to={unknown}: unknown; choose from {', '.join(REPORTERS)} or none")
    return names


def check_reporters(report_to: tuple[str, ...], wandb_mode: str = "offline") -> None:
    """Raise before any work when a backend cannot run here."""
    parse_report_to(report_to)
    if wandb_mode not in WANDB_MODES:
        raise ValueError(f"wandb_mode={wandb_mode!r}: choose one of {WANDB_MODES}")
    if "wandb" in report_to and importlib.util.find_spec("wandb") is None:
        raise ValueError("report_to includes 'wandb' but the wandb package is not installed: "
                         "pip install wandb (or `pip install -e '.[tracking]'`), or drop wandb from REPORT_TO")


class Tracker:
    """One run's scalars, written to each backend of ``report_to`` under ``log_dir``.

    ``log_dir`` holds ``tensorboard/`` and ``wandb/``; ``name`` is the run's name in W&B; ``project`` its W&B
    project. A disabled tracker (non-main ranks) does nothing.
    """

    def __init__(self, log_dir: Path, report_to: tuple[str, ...], config: dict[str, Any], name: str,
                 project: str = "mat-pipeline", wandb_mode: str = "offline", enabled: bool = True):
        check_reporters(report_to, wandb_mode)
        self.enabled = enabled
        self._tensorboard = None
        self._wandb = None
        if not enabled:
            return
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(own_tree(log_dir / "tensorboard")))
            self._tensorboard.add_text("config", f"```\n{json.dumps(config, indent=1, default=str)}\n```")
        if "wandb" in report_to:
            import wandb

            own_tree(log_dir / "wandb")
            self._wandb = wandb.init(project=project, name=name, dir=str(log_dir), config=config, mode=wandb_mode,
                                     reinit="create_new")
            log.info("W&B run %s (%s) in %s", name, wandb_mode, log_dir / "wandb")

    def log(self, step: int, values: dict[str, float], prefix: str) -> None:
        if not self.enabled:
            return
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(f"{prefix}/{key}", value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{key}": value for key, value in values.items()}, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
