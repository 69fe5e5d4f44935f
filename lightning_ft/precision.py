"""``precision: auto``: the fastest Trainer precision this hardware runs natively, and why it was chosen."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

#: CPU flags (``/proc/cpuinfo``) of native bf16 matmuls: AVX512-BF16 and AMX. Without them bf16 is emulated
#: and far slower than fp32 (measured in ``benchmarks/sft_throughput.py``).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class PrecisionChoice:
    """A resolved Trainer precision and the one-line reason for it."""

    precision: str
    reason: str

    def __str__(self) -> str:
        return f"precision: auto -> {self.precision} ({self.reason})"


def cpu_bf16_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """The native-bf16 flags this CPU reports (empty when it has none or ``cpuinfo`` is unreadable)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return [flag for flag in BF16_CPU_FLAGS if flag in flags]


def resolve_precision(accelerator: str = "auto", cpuinfo: str | Path = "/proc/cpuinfo") -> PrecisionChoice:
    """The precision ``precision: auto`` stands for on this machine.

    ``bf16-mixed`` on CUDA GPUs with bf16 (Ampere and newer) and on CPUs with native bf16 (AVX512-BF16 or
    AMX); ``16-mixed`` on older CUDA GPUs; ``32-true`` everywhere else (e.g. AVX2-only CPUs, where bf16 is
    emulated and slower than fp32).

    Args:
        accelerator: The Trainer's ``accelerator``: ``auto``, ``gpu`` and ``cuda`` use a CUDA GPU when there is
            one; anything else (``cpu``) decides by the CPU.
        cpuinfo: Where the CPU flags are read (Linux); elsewhere the CPU counts as without native bf16.

    Example::

        trainer = pl.Trainer(precision=resolve_precision().precision)
    """
    wants_gpu = str(accelerator).lower() in ("auto", "gpu", "cuda")
    if wants_gpu and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16-mixed", f"CUDA GPU {name} supports bf16")
        return PrecisionChoice("16-mixed", f"CUDA GPU {name} has no bf16; fp16 with loss scaling")
    if str(accelerator).lower() not in ("auto", "cpu"):
        return PrecisionChoice("32-true", f"accelerator={accelerator!r}: no bf16 rule for it")
    flags = cpu_bf16_flags(cpuinfo)
    if flags:
        return PrecisionChoice("bf16-mixed", f"CPU has native bf16 ({', '.join(flags)})")
    return PrecisionChoice("32-true", "CPU without native bf16 (no AVX512-BF16 or AMX): bf16 would be emulated")
