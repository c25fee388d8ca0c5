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


def precision_dtype(precision: str, default: torch.dtype) -> torch.dtype:
    """The autocast dtype of a mixed precision ('bf16' / 'fp16'); `default` for 'no'."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, default)


def autocast(device: torch.device, precision: str):
    """A torch.autocast context for 'bf16'/'fp16', or a no-op for 'no'."""
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision_dtype(precision, torch.float32))


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype that tensors of `dtype` on `device` compute in here: autocast's where it is on, else their own."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype
