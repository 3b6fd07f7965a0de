"""Precision "auto": bf16 only where the hardware runs it natively (an AVX2-only CPU runs bf16 ~40x slower)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from pipeline.models import device as models
from pipeline.models.device import autocast, resolve_precision


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with the given torch capability and /proc/cpuinfo flags."""

    def set_cpu(capability: str, flags: set[str], onednn_isa: str | None = None) -> None:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(models, "cpu_flags", lambda: flags)
        if onednn_isa is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn_isa)

    return set_cpu


@pytest.mark.parametrize("capability, flags, isa, expected", [
    ("AVX2", {"avx2", "fma"}, None, "fp32"),  # Zen 3: no bf16 instructions
    ("AVX2", {"avx2", "avx512_bf16"}, None, "fp32"),  # kernels limited to AVX2 (ATEN_CPU_CAPABILITY=avx2)
    ("AVX512", {"avx512f"}, None, "fp32"),  # AVX512 without BF16 (Skylake / Zen 4 without the flag)
    ("AVX512", {"avx512f", "avx512_bf16"}, None, "bf16"),  # Zen 4 / Cooper Lake
    ("AVX512", {"avx512f", "amx_bf16", "amx_tile"}, None, "bf16"),  # Sapphire Rapids
    ("AVX512", {"avx512f", "amx_bf16"}, "AVX2", "fp32"),  # oneDNN limited to AVX2
    ("AVX512", {"avx512f", "amx_bf16"}, "AVX512_CORE_AMX", "bf16"),
    ("DEFAULT", set(), None, "fp32"),  # e.g. an ARM CPU
])
def test_auto_picks_bf16_only_on_native_bf16_cpus(cpu, capability, flags, isa, expected):
    cpu(capability, flags, isa)
    assert resolve_precision("auto", "cpu") == expected


def test_explicit_choices_are_kept_and_bad_ones_named(cpu):
    cpu("AVX2", set())
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "cpu")


def test_autocast_follows_the_resolved_precision(cpu):
    a = torch.randn(4, 4)
    cpu("AVX2", {"avx2"})
    with autocast("cpu", "auto"):
        assert (a @ a).dtype == torch.float32
    with autocast("cpu", "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    cpu("AVX512", {"amx_bf16"})
    with autocast("cpu", "auto"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert (a @ a).dtype == torch.float32


def test_choice_is_logged_once(cpu, caplog, monkeypatch):
    monkeypatch.setattr(models, "_logged_choices", set())
    cpu("AVX2", {"avx2"})
    with caplog.at_level(logging.INFO, logger="pipeline.models.device"):
        for _ in range(3):
            resolve_precision("auto", "cpu")
    assert [r.getMessage() for r in caplog.records].count("precision auto -> fp32 (CPU capability AVX2)") == 1


def test_real_torch_limited_to_avx2_resolves_to_fp32():
    """Not a mock: torch itself told to use AVX2 kernels, as on an AVX2-only machine."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", "from pipeline.models.device import resolve_precision as r; print(r('auto', 'cpu'))"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fp32"


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("name", ["tpu", "gpu", "xla", ""])
def test_a_device_this_machine_lacks_is_one_line_naming_the_devices_there(no_gpu, name):
    with pytest.raises(ValueError, match=rf"^device='{name}': not available here; devices: auto, cpu$"):
        models.resolve_device(name)


@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_says_torch_sees_none(no_gpu, name):
    """DEVICE=cuda on a machine without a GPU: torch's 'Found no NVIDIA driver' traceback, before."""
    with pytest.raises(ValueError, match=rf"^device='{name}': torch sees no CUDA device here \(no GPU, or no NVIDIA "
                                         r"driver\); devices: auto, cpu$"):
        models.resolve_device(name)


def test_cuda_with_a_cpu_only_torch_says_so(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    with pytest.raises(ValueError, match=r"^device='cuda': this torch is a CPU-only build; devices: auto, cpu$"):
        models.resolve_device("cuda")


def test_devices_that_exist_resolve(no_gpu, monkeypatch):
    assert models.resolve_device("auto") == torch.device("cpu")
    assert models.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert models.resolve_device("cuda:0") == torch.device("cuda:0")
    assert models.resolve_device("auto", local_rank=0) == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"device='cuda:1': torch sees 1 CUDA device here; devices: auto, cpu, cuda, cuda:0$"):
        models.resolve_device("cuda:1")


def test_cli_eval_with_an_unknown_device_is_a_one_line_error(no_gpu, tmp_path):
    from typer.testing import CliRunner

    from pipeline.commands.cli import app

    result = CliRunner().invoke(app, ["--manifests-dir", str(tmp_path), "eval", "--ckpt", str(tmp_path), "--device", "tpu"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == "error: device='tpu': choose one of auto, cpu, cuda, cuda:N (N a GPU index), mps"


@pytest.mark.parametrize("command", [["train"], ["pretrain"], ["augment"], ["study"], ["eval", "--ckpt", "x"],
                                     ["eval-zeroshot", "--ckpt", "x"]])
def test_cli_commands_refuse_device_gpu_before_any_work(tmp_path, command):
    """`--device gpu`: a traceback before (augment: ignored, the stages ran; study: the plan written first)."""
    from typer.testing import CliRunner

    from pipeline.commands.cli import app

    folders = [f"--{kind}-dir" for kind in ("shards", "manifests", "runs", "models")]
    layout = [arg for folder in folders for arg in (folder, str(tmp_path / folder.strip("-")))]
    result = CliRunner().invoke(app, [*layout, *command, "--device", "gpu"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == \
        "error: device='gpu': choose one of auto, cpu, cuda, cuda:N (N a GPU index), mps"
    assert list(tmp_path.iterdir()) == []  # nothing made: no shards, plan, run or model folder
