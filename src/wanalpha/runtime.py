"""Device and precision choices shared by the commands."""

from __future__ import annotations

import contextlib

import torch


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' → bf16 on a GPU, 'no' (fp32) elsewhere; other values pass through."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "no"
    return precision


def autocast(device: torch.device, precision: str):
    """A torch.autocast context for 'bf16'/'fp16', or a no-op for 'no'."""
    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
