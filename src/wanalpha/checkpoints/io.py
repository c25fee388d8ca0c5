"""Reading state dicts from the files users have: `.pth`/`.bin`/`.pt` (torch pickles, loaded with
weights_only=True: tensors only, never code) and `.safetensors`. A dict passes through unchanged."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from wanalpha.background import checkpoint
from wanalpha.errors import WanAlphaError

StateDictSource = str | Path | Mapping[str, torch.Tensor]


def missing_file(path: Path, what: str) -> WanAlphaError:
    """The one-line error for a file that is not there; release files are named with the command that fetches them."""
    hint = "check the path"
    if path.name in ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth") or path.name.startswith("diffusion_pytorch"):
        hint += "; `wanalpha download wan2.1-t2v-14b` (or wan2.1-t2v-1.3b) fetches the Wan2.1 files (docs/download.md)"
    elif path.name in ("decoder.bin", "epoch-13-1500.safetensors"):
        hint += "; `wanalpha download wan-alpha-v1` fetches the Wan-Alpha release files (docs/download.md)"
    elif path.name.startswith("feature_merge_epoch_"):
        hint += "; train it with `wanalpha train-merge`"
    return WanAlphaError(f"{what} file {path} does not exist; {hint}")


READ_AHEAD_WINDOW = 32 * 2**20  # Linux reads at most its read-ahead size per WILLNEED call (since 4.10): windows


def read_ahead(source: StateDictSource, stop=None) -> None:
    """Ask the operating system to read a weight file into its page cache (posix_fadvise WILLNEED, one window of
    READ_AHEAD_WINDOW bytes at a time, since Linux reads only a few MB per call whatever length it is given), best
    effort: a `.pth` is mapped, not read, by read_state_dict, so its bytes come off the disk only when its tensors are
    first touched; read ahead, they are in memory by then. Ends early once `stop` (an Event) is set, and at a
    `background.checkpoint()` between windows. Nothing for a mapping, a missing file or a system without
    posix_fadvise."""
    if not isinstance(source, (str, Path)) or not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(source, os.O_RDONLY)
    except OSError:
        return  # read_state_dict says what is wrong with the path
    try:
        size = os.fstat(fd).st_size
        for offset in range(0, size, READ_AHEAD_WINDOW):
            if stop is not None and stop.is_set():
                return
            checkpoint()
            os.posix_fadvise(fd, offset, min(READ_AHEAD_WINDOW, size - offset), os.POSIX_FADV_WILLNEED)
    except OSError:
        pass  # a file system without read-ahead: the read is only not hurried
    finally:
        os.close(fd)


def read_state_dict(source: StateDictSource, what: str) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a file or a mapping; `what` names it in errors ("base VAE", …)."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise missing_file(path, what)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise WanAlphaError(f"{what} file {path} is not a readable safetensors file: {exc}") from None
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) torch files cannot be memory-mapped
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own text advises weights_only=False: exactly what we never do
        raise WanAlphaError(
            f"{what} file {path} is not a weights file: it holds Python objects besides tensors, and wanalpha never "
            "unpickles code; expected a state dict of tensors (.pth/.bin saved with torch.save, or .safetensors)"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise WanAlphaError(f"{what} file {path} cannot be read as a torch checkpoint: {exc}") from None
    if isinstance(data, Mapping) and "state_dict" in data and isinstance(data["state_dict"], Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WanAlphaError(f"{what} file {path} is not a flat {{name: tensor}} state dict")
    return dict(data)


def check_keys(expected: Mapping[str, torch.Size], found: Mapping[str, torch.Tensor], what: str) -> None:
    """Strict key and shape check with an error that lists what is missing, unexpected or mis-shaped."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(found[k].shape) != tuple(expected[k]))
    if not (missing or unexpected or wrong):
        return
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            shown = ", ".join(keys[:5]) + (f", … ({len(keys)} in all)" if len(keys) > 5 else "")
            parts.append(f"{label}: {shown}")
    raise WanAlphaError(f"{what} does not match the expected layout ({'; '.join(parts)})")
