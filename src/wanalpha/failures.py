"""Every failure a command can meet, as one line and an exit code (DESIGN §7.12): what went wrong, with which file
or flag, and how to fix it. The CLI prints the line; `--debug` (or WANALPHA_DEBUG=1) shows the traceback instead.

Exit codes: 1 = cannot proceed (a missing or unreadable file, a full disk, a failed run), 2 = a bad flag or config
value (ConfigError), 130 = interrupted. Bugs of ours become one line too, naming the exception and asking for the
traceback, never a bare Python traceback.
"""

from __future__ import annotations

import errno
import json
import os

from wanalpha.errors import WanAlphaError

DEBUG_ENV = "WANALPHA_DEBUG"


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_OS_ADVICE = {
    errno.ENOENT: "does not exist; check the path",
    errno.EACCES: "permission denied; choose a path you may read and write, or fix its permissions",
    errno.EPERM: "operation not permitted; choose another path or fix its permissions",
    errno.ENOSPC: "disk full while writing it; free some space or choose another output folder",
    errno.EDQUOT: "disk quota exceeded while writing it; free some space or choose another output folder",
    errno.EISDIR: "is a folder where a file is expected; pass a file path",
    errno.ENOTDIR: "a file stands where a folder is expected; pass a folder path or move the file",
    errno.EEXIST: "already exists; remove it or choose another path",
    errno.EROFS: "is on a read-only file system; choose a writable output folder",
    errno.ENAMETOOLONG: "the name is too long for the file system; choose a shorter name",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) or lower --num-workers",
}


def describe_os_error(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else None
    if exc.filename2 is not None:
        where = f"{exc.filename} → {exc.filename2}"
    advice = _OS_ADVICE.get(exc.errno or -1)
    if advice is None:
        advice = f"{exc.strerror or first_line(exc)}"
    return f"{where}: {advice}" if where is not None else f"{advice} ({first_line(exc)})"


def _from_worker(text: str) -> str:
    """A DataLoader worker's error arrives as "Caught X in DataLoader worker process N. Original Traceback …": its
    own message is the traceback's last line, after the exception's qualified name."""
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    name, sep, message = last.partition(": ")
    return message if sep and "." in name and " " not in name else last


def explain(exc: BaseException) -> tuple[str, int]:
    """(one line, exit code) for any exception a command raised."""
    if isinstance(exc, WanAlphaError):
        return _from_worker(str(exc)), exc.exit_code
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (torch is imported lazily)
        return (
            "out of GPU memory: lower --num-frames/--height/--width or the batch size, keep gradient "
            "checkpointing on, or use --offload (generate); docs/benchmarks.md lists what fits",
            1,
        )
    if isinstance(exc, OSError):
        return describe_os_error(exc), 1
    if isinstance(exc, UnicodeDecodeError):
        return (
            f"a text file is not UTF-8 ({exc.reason} at byte {exc.start}); save it as UTF-8 (the config, "
            "metadata.csv, captions and prompt files are read as UTF-8)",
            1,
        )
    if isinstance(exc, json.JSONDecodeError):
        return f"a JSON file is damaged ({exc.msg} at line {exc.lineno}, column {exc.colno}); restore or remove it", 1
    if type(exc).__name__ == "SafetensorError":
        return f"a safetensors file is damaged or not a safetensors file ({first_line(exc)}); restore or remove it", 1
    return (
        f"unexpected error ({type(exc).__name__}: {first_line(exc)}); rerun with --debug (or {DEBUG_ENV}=1) "
        "for the traceback and report it",
        1,
    )
