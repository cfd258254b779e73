"""Where a run computes and at which precision: one rule each, used by training, evaluation and the benchmarks.

``--device auto`` is cuda:LOCAL_RANK when CUDA is available, else the CPU. ``--precision auto`` means bf16
autocast on CUDA and float32 on the CPU; ``bf16`` means bf16 autocast on any device (the CPU included, for
training *and* evaluation); ``fp32`` means no autocast. Losses, the coding rate and the features handed to kNN
and the probe are float32 whatever the forward pass used.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``--device`` as a torch device (``cuda`` is cuda:LOCAL_RANK)."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} requested but CUDA is not available")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for ``--precision`` on ``device``; None means float32 (no autocast)."""
    if precision == "fp32" or (precision == "auto" and torch.device(device).type != "cuda"):
        return None
    return torch.bfloat16


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def device_name(device: torch.device | str) -> str:
    """The device as reports name it: "cpu", or "cuda (NVIDIA H100 80GB HBM3)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (before reading a wall clock); nothing to wait for on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
