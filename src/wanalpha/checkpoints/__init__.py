"""Loaders and savers for official files and our own artifacts: `wan` (Wan2.1's DiT and UMT5 files, model
resolution), `vae` (the Wan2.1 VAE, the RGB-alpha VAE, our merge checkpoints), `wan_alpha` (every Wan-Alpha key map
and file writer: decoder.bin, the v2 VAE file, the DiT DoRA file), `io`, `provenance`. Imported lazily: `prepare`
and `--help` use the torch-free parts (provenance) without importing torch."""

from __future__ import annotations

from typing import Any

_LAZY = {
    "load_rgba_vae": "wanalpha.checkpoints.vae",
    "load_wan_vae": "wanalpha.checkpoints.vae",
    "load_text_encoder": "wanalpha.checkpoints.wan",
    "read_state_dict": "wanalpha.checkpoints.io",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wanalpha.checkpoints' has no attribute {name!r}")


__all__ = list(_LAZY)
