"""provenance.json: what made an artifact directory (package version, command, inputs and their hashes).

Hashes of large files (multi-GB weights) are cached by (path, size, mtime) in the user cache dir, so a rerun
costs nothing. No torch here: `prepare` uses it too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

from wanalpha import __version__
from wanalpha.data.files import atomic_write_text


def _cache_file() -> Path:
    root = os.environ.get("WANALPHA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "wanalpha"
    )
    return Path(root) / "hashes.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def file_sha256(path: Path, cache: bool = True) -> str:
    """sha256 of a file, remembered per (absolute path, size, mtime_ns) so unchanged files are hashed once."""
    given = Path(path)
    path = given.resolve()
    if not path.is_file():
        from wanalpha.checkpoints.io import missing_file

        raise missing_file(given, "input")
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_path = _cache_file()
    if cache:
        known = _read_cache(cache_path).get(key)
        if known:
            return known
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    value = digest.hexdigest()
    if cache and st.st_size >= 1 << 20:  # small files are cheap to hash again; keep the cache small
        try:
            entries = _read_cache(cache_path)
            entries[key] = value
            atomic_write_text(cache_path, json.dumps(entries, indent=0, sort_keys=True))
        except OSError:
            pass  # a read-only home must not break a run
    return value


def _describe_input(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():  # e.g. a folder of shards, or an input given as a state dict
        return {"path": str(path.resolve())}
    return {"path": str(path.resolve()), "sha256": file_sha256(path), "bytes": path.stat().st_size}


def write_provenance(
    out_dir: Path,
    command: str,
    inputs: dict[str, Path] | None = None,
    extra: dict[str, Any] | None = None,
    name: str = "provenance.json",
) -> Path:
    """Write `out_dir/<name>` (default provenance.json; prefix-named commands pass `<prefix>_provenance.json`),
    atomically, and return its path."""
    record: dict[str, Any] = {
        "package": "wanalpha",
        "version": __version__,
        "command": command,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "inputs": {name: _describe_input(p) for name, p in (inputs or {}).items() if p is not None},
    }
    if extra:
        record.update(extra)
    dest = Path(out_dir) / name
    atomic_write_text(dest, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return dest
