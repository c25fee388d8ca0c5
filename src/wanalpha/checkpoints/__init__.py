"""Loaders and savers for official files and our own artifacts. Imported lazily: `prepare` and `--help` use the
torch-free parts (provenance) without importing torch."""

from __future__ import annotations

from typing import Any

_LAZY = {
    "load_rgba_vae": "wanalpha.checkpoints.vae",
    "load_wan_vae": "wanalpha.checkpoints.vae",
    "read_state_dict": "wanalpha.checkpoints.io",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wanalpha.checkpoints' has no attribute {name!r}")


__all__ = list(_LAZY)
