"""Training precision: which autocast dtype a run uses (``--amp``), and whether the processor has
bfloat16 instructions.

``auto`` (the default) trains under bfloat16 autocast on a CPU with bfloat16 arithmetic in hardware
(AVX512_BF16 or AMX), where it is faster (docs/speed.md: 1.3-1.6x for DenseNet-BC-100 on a 2-core
Xeon with AMX), and in float32 everywhere else (GPUs included: ``--amp bf16`` or ``fp16`` there).
Batch statistics, BN's running statistics, the parameters and the optimizer's state stay float32.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .config import AMP_CHOICES, ConfigError

__all__ = ["AMP_CHOICES", "check_precision", "cpu_bf16_instructions", "resolve_amp"]


def cpu_bf16_instructions() -> str | None:
    """The processor's bfloat16 instruction sets ("AMX", "AVX512_BF16", "AMX and AVX512_BF16"), or
    None when it has neither (bfloat16 then runs emulated, slower than float32)."""
    found = []
    try:
        if torch._C._cpu._is_amx_tile_supported():
            found.append("AMX")
        if torch._C._cpu._is_avx512_bf16_supported():
            found.append("AVX512_BF16")
    except AttributeError:  # a torch without these probes: read the kernel's flags
        try:
            flags = set(Path("/proc/cpuinfo").read_text().split())
        except OSError:
            flags = set()
        found += [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512_BF16")) if flag in flags]
    return " and ".join(found) or None


def resolve_amp(amp: str, device: torch.device) -> str:
    """The concrete precision of ``amp`` on ``device``: "bf16", "fp16" or "off" (``auto``: bf16 on a
    CPU with bfloat16 instructions, else off; ``none`` is ``off``). Written into config.yaml, so that
    a resumed run keeps the precision it started with on any machine."""
    if amp == "none":
        return "off"
    if amp != "auto":
        return amp
    return "bf16" if device.type == "cpu" and cpu_bf16_instructions() else "off"


def check_precision(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a gradient scaler is needed) for a resolved ``amp`` on ``device``."""
    if amp in ("off", "none"):
        return None, False
    if amp == "fp16":
        if device.type != "cuda":
            raise ConfigError("--amp fp16 needs a CUDA GPU (float16 training with a gradient scaler); "
                              "on a CPU use --amp bf16 (bfloat16: no scaler needed) or --amp off")
        return torch.float16, True
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--amp bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; use --amp fp16")
    if device.type == "cpu" and not cpu_bf16_instructions():
        warnings.warn("--amp bf16: this processor has no bfloat16 instructions (AVX512_BF16 or AMX), so bfloat16 "
                      "runs emulated and trains slower than float32; --amp off trains in float32 (also when resuming: "
                      "densenet train --resume RUN_DIR --amp off)", stacklevel=2)
    return torch.bfloat16, False
