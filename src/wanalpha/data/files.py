"""Atomic file writes and clip placement: Ctrl-C never leaves a half-written output under its final name."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest` (same suffix, so writers pick the right format); on success it is
    renamed over `dest`, on any error it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".tmp{dest.suffix}", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600, and some writers (safetensors) replace the file: outputs get the usual permissions.
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, dest)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(dest: Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(dest: Path, text: str) -> None:
    atomic_write_bytes(dest, text.encode("utf-8"))


def write_if_changed(dest: Path, text: str) -> bool:
    """Write `text` atomically unless `dest` already holds exactly it; True if written."""
    data = text.encode("utf-8")
    dest = Path(dest)
    if dest.is_file() and dest.read_bytes() == data:
        return False
    atomic_write_bytes(dest, data)
    return True


def is_placed(src: Path, dest: Path, mode: str) -> bool:
    """Whether `dest` already is what `place(src, dest, mode)` would make (reruns leave it untouched)."""
    if mode == "symlink":
        return dest.is_symlink() and Path(os.readlink(dest)) == src.resolve()
    if dest.is_symlink() or not dest.is_file():
        return False
    s, d = src.stat(), dest.stat()
    if mode == "hardlink":
        return (s.st_ino, s.st_dev) == (d.st_ino, d.st_dev)
    return s.st_size == d.st_size and s.st_mtime_ns == d.st_mtime_ns


def place(src: Path, dest: Path, mode: str) -> bool:
    """Copy (keeping the mtime), hard-link or symlink `src` to `dest`, atomically; False if already there."""
    src, dest = Path(src), Path(dest)
    if is_placed(src, dest, mode):
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    if mode == "copy":
        with atomic_path(dest) as tmp:
            shutil.copy2(src, tmp)
        return True
    # Links: make them under a temporary name, then rename over dest (atomic on POSIX).
    tmp = dest.with_name(f".{dest.name}.tmp-link-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        if mode == "hardlink":
            try:
                os.link(src, tmp)
            except OSError as exc:
                from wanalpha.errors import WanAlphaError

                raise WanAlphaError(
                    f"cannot hard-link {src} into {dest.parent} ({exc.strerror}); "
                    "use --link copy or --link symlink, or an output dir on the same filesystem"
                ) from None
        elif mode == "symlink":
            os.symlink(src.resolve(), tmp)
        else:
            raise ValueError(f"unknown link mode {mode!r}")
        os.replace(tmp, dest)
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
    return True
