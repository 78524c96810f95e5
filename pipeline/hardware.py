"""What the accelerator can do, checked in one place (the teacher, the encoder and fit all ask)."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from pipeline.errors import ConfigError

log = logging.getLogger("influcoder.hardware")
_WARNED: set[tuple[str, str]] = set()  # (key, device type): say it once per process

PRECISIONS = ("auto", "float32", "bfloat16")
"""The values of a `dtype` setting (`teacher.dtype`, `encode.dtype`)."""


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware (not by emulation).

    CUDA: compute capability >= 8 (Ampere and later). CPU: AVX512-BF16 or AMX tiles (oneDNN's
    bf16 kernels); elsewhere PyTorch emulates bf16 on the CPU, slower than fp32.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, name)()) for name in probes if hasattr(cpu, name))
    return False


def autocast_dtype(dtype: str, device: torch.device, key: str) -> Optional[torch.dtype]:
    """Autocast dtype for a ``dtype`` setting on ``device`` (None = plain float32).

    ``auto`` means bf16 where the device has native bf16 (``native_bf16``) and float32 elsewhere;
    ``key`` names the setting (e.g. ``encode.dtype``) in the error for any other value.
    """
    if dtype == "float32":
        return None
    if dtype == "bfloat16":
        note = emulated_bf16_note(dtype, device, key)
        if note and (key, device.type) not in _WARNED:
            _WARNED.add((key, device.type))
            log.warning(note)
        return torch.bfloat16
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    raise ConfigError(f"{key}={dtype!r}; expected one of {', '.join(repr(p) for p in PRECISIONS)}")


def emulated_bf16_note(dtype: str, device: torch.device, key: str) -> Optional[str]:
    """The warning for a setting that asks for bf16 on a device that only emulates it (else None).

    An explicit `bfloat16` is kept (the run's fidelity gate still judges it), but on such a device it
    costs far more than float32: on an AVX2-only CPU the bf16 matmul ran 1.4 GFLOP/s against 153 in
    float32, and the teacher's sketches ~19x longer."""
    if dtype != "bfloat16" or native_bf16(device):
        return None
    return (
        f"{key}=bfloat16 on a {device.type.upper()} without native bf16: PyTorch emulates it, many times "
        f"slower than float32 (the teacher ~19x on an AVX2-only CPU); `{key}: auto` runs float32 here"
    )


def precision_name(dtype: Optional[torch.dtype]) -> str:
    """``bfloat16`` or ``float32``: how manifests name an autocast dtype (None = float32)."""
    return str(dtype or torch.float32).replace("torch.", "")


def encoder_autocast_bf16(device: torch.device) -> bool:
    """Whether fit trains the text encoder under bf16 autocast: on GPUs with native bf16 only (CPU
    training stays fp32). Embedding at encode/score time follows `encode.dtype` instead."""
    return device.type == "cuda" and native_bf16(device)
