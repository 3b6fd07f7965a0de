"""Device and precision: "auto" device and precision resolution, the CPU's bf16 capability, autocast."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def available_devices() -> list[str]:
    """The device names this machine can run: auto, cpu, and cuda / cuda:<i> / mps where present."""
    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(name: str | torch.device = "auto", local_rank: int | None = None) -> torch.device:
    """"auto" -> the GPU when there is one (``cuda:<local_rank>`` when a rank is given, for one process per GPU),
    else the CPU; any other name as torch reads it. A name this machine cannot run (``cuda`` without a GPU,
    ``tpu``, ``gpu``) raises ValueError listing the devices that exist."""
    if str(name) == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda" if local_rank is None else f"cuda:{local_rank}")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or (device.type != "cpu" and str(device) not in available_devices()):
        raise ValueError(f"device={str(name)!r}: {_why_missing(device)}; devices: {', '.join(available_devices())}")
    return device


def _why_missing(device: torch.device | None) -> str:
    """Why torch cannot run ``device`` here, in a few words."""
    if device is not None and device.type == "cuda":
        if not torch.backends.cuda.is_built():
            return "this torch is a CPU-only build"
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            return "torch sees no CUDA device here (no GPU, or no NVIDIA driver)"
        return f"torch sees {count} CUDA device{'s' if count > 1 else ''} here"
    if device is not None and device.type == "mps":
        return "torch sees no MPS device here"
    return "not available here"


PRECISIONS = ("auto", "bf16", "fp32")
_logged_choices: set[tuple[str, str, str]] = set()


def cpu_runs_bf16_natively() -> bool:
    """True when this CPU has bf16 instructions (AVX512-BF16 or AMX) *and* torch / oneDNN may use them.

    On an AVX2-only CPU a bf16 matmul is emulated and about 40x slower than fp32 (FIELD-NOTES), so "auto"
    must not pick bf16 there. ``ATEN_CPU_CAPABILITY`` and ``ONEDNN_MAX_CPU_ISA`` lower what the kernels use;
    both are respected, which also lets a newer CPU stand in for an AVX2 one.
    """
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and isa not in ("ALL", "DEFAULT") and not any(tag in isa for tag in ("BF16", "AMX", "AVX10")):
        return False
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, str]:
    """The first CPU's fields of Linux's /proc/cpuinfo ("model name", "flags", ...), read once per process
    (autocast asks for every batch); empty where the file does not exist."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():  # the first processor's block ends
            break
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere: then "auto" takes the safe fp32)."""
    return set(cpu_info().get("flags", "").split())


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """"auto" -> "bf16" where the hardware runs it natively (CUDA with bf16, a CPU with AVX512-BF16 / AMX),
    "fp32" elsewhere; "bf16" and "fp32" are returned as given. The choice is logged once per process."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {PRECISIONS}")
    device = torch.device(device)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        choice = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        reason = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        choice = "bf16" if cpu_runs_bf16_natively() else "fp32"
        reason = f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    else:
        choice, reason = "fp32", device.type
    key = (precision, device.type, choice)
    if key not in _logged_choices:
        _logged_choices.add(key)
        log.info("precision auto -> %s (%s)", choice, reason)
    return choice


def autocast(device: str | torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast when ``precision`` resolves to bf16 on ``device`` (see :func:`resolve_precision`); a no-op
    context for fp32. An explicit "bf16" on a CUDA card without bf16 support is refused."""
    device_type = torch.device(device).type
    if resolve_precision(precision, device) != "bf16":
        return contextlib.nullcontext()
    if device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision='bf16': {torch.cuda.get_device_name(device)} has no bf16 support; use fp32")
    if device_type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


