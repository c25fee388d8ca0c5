"""Atomic file writes, clip placement and the output-folder lock: Ctrl-C, a kill or a full disk never leaves a
half-written output under its final name, and two runs never write into one folder at once.

Every output is written under a temporary name beside it (`.{stem}.{8 random}.tmp{suffix}`, or a link's
`.{name}.tmp-link-{pid}`), checked, then renamed over its final name. A temporary file that a kill left behind is
removed by the next run into the same folder (`output_lock`), and only names of that pattern are ever removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

# `.{stem}.{pid}-{8 random}.tmp{suffix}` and `.{name}.tmp-link-{pid}`: the writer's pid tells a killed run's leftovers
# from the files of a run still writing (into a sub-folder, say); LEGACY_TEMP_NAME: what versions before the pid wrote.
TEMP_NAME = re.compile(r"^\..+\.(\d+)-[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$|^\..+\.tmp-link-(\d+)$")
LEGACY_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")
LEGACY_AGE_S = 24 * 3600  # a legacy temporary file (no pid) this old belongs to no live run
LOCK_NAME = ".wanalpha.lock"
_LIVE: set[Path] = set()  # temporary files being written now (removed on interrupt: `remove_live_temps`)


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
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.stem}.{os.getpid()}-", suffix=f".tmp{dest.suffix}", dir=dest.parent)
    tmp_path = Path(tmp)
    _LIVE.add(tmp_path)
    try:
        os.close(fd)
        yield tmp_path
        if not tmp_path.is_file():
            raise OSError(errno.EIO, "the writer left no file", str(dest))
        # mkstemp makes 0600, and some writers (safetensors) replace the file: outputs get the usual permissions.
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, dest)
    except OSError as exc:  # a full disk, a permission: name the output, not its temporary name
        tmp_path.unlink(missing_ok=True)
        if exc.errno is not None and exc.filename in (None, str(tmp_path), tmp_path):
            raise OSError(exc.errno, exc.strerror, str(dest)) from exc
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    finally:
        _LIVE.discard(tmp_path)


def remove_live_temps() -> None:
    """Remove the temporary files this process is writing now (an interrupt, a signal: nothing half-written
    stays; the writers' own cleanup may then find them gone)."""
    for path in list(_LIVE):
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        _LIVE.discard(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def is_stale_temp(path: Path, now: float | None = None) -> bool:
    """Whether `path` is a temporary file of ours whose writer is gone: a dead pid in its name (or, for a legacy
    name without one, older than a day). Nothing else ever counts."""
    match = TEMP_NAME.match(path.name)
    if match:
        pid = int(match.group(1) or match.group(3))
        return pid != os.getpid() and not _alive(pid)
    if LEGACY_TEMP_NAME.match(path.name):
        try:
            return (now or time.time()) - path.stat().st_mtime > LEGACY_AGE_S
        except OSError:
            return False
    return False


def remove_stale_temps(folder: Path, depth: int = 3) -> list[Path]:
    """Remove temporary files that killed runs left in `folder` and its sub-folders up to `depth` levels (those of
    `is_stale_temp` only: a run still writing keeps its own). Returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for root, dirs, files in os.walk(folder):
        level = len(Path(root).relative_to(folder).parts)
        if level >= depth:
            dirs[:] = []
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if is_stale_temp(Path(root) / name):
                path = Path(root) / name
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
    return removed


@contextlib.contextmanager
def output_lock(folder: Path, command: str) -> Iterator[Path]:
    """Hold an advisory lock on an output folder for a run (created if missing; the lock file `.wanalpha.lock` is
    removed at the end): a second run into the same folder fails at once with one line naming the other process; a
    lock left by a process that died is taken over (the kernel drops it with the process). Holding it, the leftovers
    of killed runs (temporary files) are removed."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # removed again if the run writes nothing
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks; the run goes ahead unprotected
        remove_stale_temps(folder)
        yield folder
        return
    path = folder / LOCK_NAME
    handle = _take_lock(path, fcntl)
    if handle is None:
        import warnings

        path.unlink(missing_ok=True)
        warnings.warn(
            f"{folder}: this file system cannot lock files (flock); two runs into this folder would not be stopped",
            stacklevel=2,
        )
        remove_stale_temps(folder)
        yield folder
        return
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "command": command, "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
        remove_stale_temps(folder)
        yield folder
    finally:
        path.unlink(missing_ok=True)  # while still holding it: a process that opened it before finds it gone
        handle.close()  # releases the lock
        for made in created:  # a run that wrote nothing leaves no folder either (nor the parents it made)
            try:
                made.rmdir()
            except OSError:
                break


_NO_LOCKS = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}  # flock not supported here


def _take_lock(path: Path, fcntl):
    """The open, flock-ed lock file at `path`, or None where the file system has no flock; the file may be removed by
    its holder on release, so a lock taken on a file that is no longer at `path` is dropped and taken again."""
    from wanalpha.errors import WanAlphaError

    while True:
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole run
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if isinstance(exc, BlockingIOError):
                    raise
                handle.close()
                if exc.errno not in _NO_LOCKS:
                    raise
                return None  # a file system without flock (Lustre without -o flock, NFS mounted nolock)
        except BlockingIOError:
            handle.seek(0)
            try:
                holder = json.loads(handle.read() or "{}")
            except ValueError:
                holder = {}
            handle.close()
            who = (
                f"pid {holder.get('pid', '?')}: wanalpha {holder.get('command', '?')}, since {holder.get('since', '?')}"
            )
            raise WanAlphaError(
                f"{path.parent} is in use by another wanalpha run ({who}); wait for it to finish or "
                "choose another output folder"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return handle
        handle.close()


def escapes(name: str) -> bool:
    """Whether a name from data (a metadata row, a clip name) would leave the folder it is joined to."""
    path = PurePosixPath(str(name).replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts or bool(re.match(r"^[A-Za-z]:", str(name)))


def data_path(folder: Path, name: str, suffix: str = "") -> Path:
    """`folder / (name + suffix)` for a name that comes from data, never outside `folder`: a name that would leave it
    (absolute, '..', a drive) is an error naming it (the readers refuse such rows first; this guards every writer)."""
    from wanalpha.errors import WanAlphaError

    parts = [p for p in PurePosixPath(str(name).replace("\\", "/")).parts if p not in ("", ".")]
    if not parts or escapes(name):
        raise WanAlphaError(
            f"clip name {name!r} would be written outside {folder}; clip names must be paths inside "
            "the dataset folder (e.g. 001 or sub/001)"
        )
    return Path(folder).joinpath(*parts[:-1], parts[-1] + suffix)


def read_utf8(path: Path, label: str, error: type[Exception] | None = None) -> str:
    """A text file the user gives (a config, a prompt file or set), read as UTF-8; one that is not UTF-8 is one line
    `{label} is not UTF-8 text (…); save it as UTF-8`, raised as `error` (WanAlphaError by default)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        if error is None:
            from wanalpha.errors import WanAlphaError as error
        raise error(f"{label} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None


def read_json(path: Path, fix: str):
    """A JSON file of ours; a damaged one (truncated, junk, not UTF-8) is one line naming it and `fix`."""
    from wanalpha.errors import WanAlphaError
    from wanalpha.failures import first_line

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise WanAlphaError(f"{path} is damaged ({first_line(exc)}); {fix}") from None


def read_safetensors(path: Path, fix: str) -> dict:
    """A safetensors file of ours; a damaged one (truncated, junk) is one line naming it and `fix`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from wanalpha.errors import WanAlphaError
    from wanalpha.failures import first_line

    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise WanAlphaError(f"{path} is damaged ({first_line(exc)}); {fix}") from None


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
