"""Official release files from the Hugging Face Hub, by name, into the seed guide's layout (`wanalpha download`);
the same resumable fetch serves `--model_id_with_origin_paths` and the VGG16 weights of the perceptual term.

A file is fetched into a hidden `.NAME.<etag>.part` beside its destination, resumed from where it stopped (HTTP
Range) on a rerun or a dropped connection, checked against the size the hub reports, and renamed onto its final
name only when whole: a file under its final name is always complete, so one that is present is never fetched
again (and needs no network). One process at a time writes a given file (a lock beside it), so ranks of an
`accelerate launch` can ask for the same file. `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE` apply as in
huggingface_hub (read when a call is made); huggingface_hub is imported only when the network is used.

Sizes in the catalogue are what the projects publish (docs/download.md says where each comes from); None where no
size is published. `--dry-run` asks the hub for exact sizes and falls back to these offline.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from wanalpha.errors import ConfigError, WanAlphaError

DEFAULT_ENDPOINT = "https://huggingface.co"
TOKENIZER_PATTERN = "google/umt5-xxl/*"  # the UMT5 tokenizer folder inside every Wan2.1 repository
CHUNK = 1 << 20
RETRIES = 5  # attempts without progress before a transfer gives up (the .part stays for a rerun)


@dataclass(frozen=True)
class Source:
    """Files of one hub repository: `pattern` is a path in the repo or an fnmatch pattern over its paths.

    `dest` (relative to --root; a leading `models/` means the models folder): for a pattern, the folder the matching
    repo paths land in under their own names; for a single path, the local file itself."""

    repo: str
    pattern: str
    dest: str
    size: int | None  # bytes as published (the sum over a pattern's files); None: not published

    @property
    def is_pattern(self) -> bool:
        return any(c in self.pattern for c in "*?[")


@dataclass(frozen=True)
class Item:
    name: str
    description: str
    sources: tuple[Source, ...]


def _wan_base(name: str, repo: str, dit: str, dit_size: int, description: str) -> Item:
    folder = f"models/{repo}"
    sources = [Source(repo, dit, folder, dit_size)]
    if "*" in dit:  # sharded: the index names the shards
        index = "diffusion_pytorch_model.safetensors.index.json"
        sources.append(Source(repo, index, f"{folder}/{index}", 96_800))
    for file, size in (
        ("config.json", 250),
        ("models_t5_umt5-xxl-enc-bf16.pth", 11_361_920_418),
        ("Wan2.1_VAE.pth", 507_609_880),
    ):
        sources.append(Source(repo, file, f"{folder}/{file}", size))
    sources.append(Source(repo, TOKENIZER_PATTERN, folder, 21_454_081))
    return Item(name, description, tuple(sources))


# The release files, in the seed guide's layout (generate and train-* look there with no path flags).
CATALOGUE: dict[str, Item] = {
    item.name: item
    for item in (
        _wan_base(
            "wan2.1-t2v-14b",
            "Wan-AI/Wan2.1-T2V-14B",
            "diffusion_pytorch_model*.safetensors",
            57_160_000_000,
            "Wan2.1 T2V 14B base: DiT (6 fp32 shards), UMT5 encoder + tokenizer, VAE",
        ),
        _wan_base(
            "wan2.1-t2v-1.3b",
            "Wan-AI/Wan2.1-T2V-1.3B",
            "diffusion_pytorch_model.safetensors",
            5_680_000_000,
            "Wan2.1 T2V 1.3B base (the v2 VAE recipe's diffusion-loss DiT): DiT, UMT5 + tokenizer, VAE",
        ),
        Item(
            "wan-alpha-v1",
            "Wan-Alpha v1.0: decoder LoRAs (decoder.bin) and the DiT DoRA",
            (
                Source("htdong/Wan-Alpha", "decoder.bin", "Wan-Alpha/vae/decoder.bin", None),
                Source(
                    "htdong/Wan-Alpha", "epoch-13-1500.safetensors", "Wan-Alpha/epoch-13-1500.safetensors", 312_000_000
                ),
            ),
        ),
        Item(
            "wan-alpha-v2",
            "Wan-Alpha v2.0: the v2 RGBA VAE, its decoder LoRAs, the DiT DoRA, the example mask",
            (
                Source("htdong/Wan-Alpha-VAE", "Wan-Alpha-v2-VAE.bin", "Wan-Alpha-v2.0/vae/Wan-Alpha-v2-VAE.bin", None),
                Source("htdong/Wan-Alpha-v2.0", "decoder.bin", "Wan-Alpha-v2.0/vae/decoder.bin", None),
                Source("htdong/Wan-Alpha-v2.0", "t2v.safetensors", "Wan-Alpha-v2.0/t2v.safetensors", None),
                Source("htdong/Wan-Alpha-v2.0", "gauss_mask", "Wan-Alpha-v2.0/gauss_mask", 343_000),
            ),
        ),
        Item(
            "wan-alpha-vae-v1",
            "Wan-Alpha v1.0 RGBA VAE release (decoder LoRAs + merge block, v2 file layout)",
            (Source("htdong/Wan-Alpha-VAE", "Wan-Alpha-VAE.bin", "Wan-Alpha/vae/Wan-Alpha-VAE.bin", None),),
        ),
        Item(
            "lightx2v",
            "lightx2v T2V 14B 4-step distill LoRA, rank 64 (generate --lora …:1 --steps 4 --cfg-scale 1)",
            (
                Source(
                    "Kijai/WanVideo_comfy",
                    "Lightx2v/lightx2v_T2V_14B_cfg_step_distill_v2_lora_rank64_bf16.safetensors",
                    "models/Kijai/WanVideo_comfy/Lightx2v/lightx2v_T2V_14B_cfg_step_distill_v2_lora_rank64_bf16"
                    ".safetensors",
                    631_000_000,
                ),
            ),
        ),
        Item(
            "vgg16",
            "VGG16 ImageNet weights (torchvision's, timm copy) for train-merge's perceptual term",
            (
                Source(
                    "timm/vgg16.tv_in1k",
                    "model.safetensors",
                    "models/timm/vgg16.tv_in1k/model.safetensors",
                    553_000_000,
                ),
            ),
        ),
    )
}

VGG16 = CATALOGUE["vgg16"].sources[0]
TORCHVISION_VGG16 = "vgg16-397923af.pth"  # torchvision's file name (what the official VGGLoss downloads)


# ------------------------------------------------------------------------------------------------ environment


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _reason(exc: object) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _hub_error(exc: Exception, repo: str, what: str) -> WanAlphaError:
    """One line for a failed hub call: missing repo/file, access, or no connection."""
    import importlib

    modules = []  # huggingface_hub.errors (newer releases) or huggingface_hub.utils (older ones)
    for module in ("huggingface_hub.errors", "huggingface_hub.utils"):
        with contextlib.suppress(ImportError):
            modules.append(importlib.import_module(module))

    def kind(*names: str) -> bool:
        return isinstance(exc, tuple(getattr(m, n) for m in modules for n in names if hasattr(m, n)))

    if kind("GatedRepoError"):
        return WanAlphaError(
            f"{repo} is gated: accept its terms on the hub and log in (`hf auth login` or HF_TOKEN), then rerun"
        )
    if kind("RepositoryNotFoundError"):
        return WanAlphaError(f"{repo} not found on {endpoint()} (or private: set HF_TOKEN); check the repository id")
    if kind("RemoteEntryNotFoundError", "EntryNotFoundError"):
        return WanAlphaError(
            f"{repo} has no file {what} on {endpoint()}; the release may have moved it — check the "
            "repository's file list (docs/download.md)"
        )
    if kind("RevisionNotFoundError"):
        return WanAlphaError(f"{repo}: revision not found on {endpoint()}")
    if kind("HfHubHTTPError"):
        return WanAlphaError(f"the hub refused {repo}/{what} ({_reason(exc)})")
    return WanAlphaError(
        f"cannot reach the hub at {endpoint()} for {repo}/{what} ({type(exc).__name__}: "
        f"{_reason(exc)}); check the network (or HF_ENDPOINT), or put the file where it belongs and "
        "rerun"
    )


# ------------------------------------------------------------------------------------------------ local files


def local_matches(folder: Path, pattern: str) -> list[Path]:
    """Files under `folder` whose path relative to it matches `pattern` (fnmatch), sorted; partial files excluded."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        hidden = any(part.startswith(".") for part in relative.parts)  # .part files, locks, caches
        if not hidden and path.is_file() and fnmatch.fnmatch(relative.as_posix(), pattern):
            found.append(path)
    return sorted(found)


_SHARD = re.compile(r"-(\d+)-of-(\d+)")


def complete(files: list[Path]) -> bool:
    """Non-empty, and every `…-0000k-of-0000N…` shard set has all N members."""
    if not files:
        return False
    sets: dict[tuple[str, int], set[int]] = {}
    for f in files:
        if m := _SHARD.search(f.name):
            sets.setdefault((f.name[: m.start()], int(m.group(2))), set()).add(int(m.group(1)))
    return all(len(found) == total for (_, total), found in sets.items())


# ------------------------------------------------------------------------------------------------ remote files


@dataclass(frozen=True)
class Remote:
    """One file to fetch: where it comes from and where it goes."""

    repo: str
    path: str
    revision: str
    dest: Path
    size: int | None


class Hub:
    """The few hub calls a fetch needs, at the endpoint and offline setting of the moment."""

    def __init__(self) -> None:
        self.endpoint = endpoint()

    def listing(self, repo: str, revision: str = "main") -> tuple[str, dict[str, int | None]]:
        """(commit, {path: size}) of a repository."""
        from huggingface_hub import HfApi

        try:
            info = HfApi(endpoint=self.endpoint).model_info(repo, revision=revision, files_metadata=True)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line
            raise _hub_error(exc, repo, "(file list)") from None
        return info.sha or revision, {s.rfilename: s.size for s in info.siblings or []}

    def metadata(self, repo: str, path: str, revision: str):
        """huggingface_hub's HfFileMetadata (size, etag, commit, location) of one file."""
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

        url = hf_hub_url(repo, path, revision=revision, endpoint=self.endpoint)
        try:
            return get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        except Exception as exc:  # noqa: BLE001
            raise _hub_error(exc, repo, path) from None


def remotes(hub: Hub, source: Source, dest_root: Path) -> list[Remote]:
    """The files a source stands for (a pattern is matched against the repository's listing)."""
    if not source.is_pattern:
        return [Remote(source.repo, source.pattern, "main", dest_root, None)]
    commit, listing = hub.listing(source.repo)
    paths = sorted(p for p in listing if fnmatch.fnmatch(p, source.pattern))
    if not paths:
        raise WanAlphaError(
            f"{source.repo} has no file matching {source.pattern} on {hub.endpoint}; check the pattern "
            "and the repository's file list"
        )
    return [Remote(source.repo, p, commit, dest_root / p, listing[p]) for p in paths]


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """An exclusive lock on `dest` across processes (POSIX; elsewhere a no-op). The lock file goes once `dest` is in
    place: whoever holds a lock checks `dest` first, and a late holder of the removed file's lock finds it present
    (or its whole .part, which it then does not write to)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: one writer is the caller's business
        yield
        return
    lock = dest.parent / f".{dest.name}.lock"
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
            if dest.is_file():  # found present: the lock is of no further use
                lock.unlink(missing_ok=True)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _StripAuthOnHostChange(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never send the hub token to another host (signed CDN URLs reject it)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401 - urllib's signature
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_StripAuthOnHostChange())


def _headers(url: str, hub_url: str) -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    headers = {k: v for k, v in build_hf_headers().items() if v is not None}
    if urllib.parse.urlsplit(url).netloc != urllib.parse.urlsplit(hub_url).netloc:
        headers.pop("authorization", None)
        headers.pop("Authorization", None)
    headers["Accept-Encoding"] = "identity"
    return headers


def _part_path(dest: Path, etag: str | None) -> Path:
    tag = re.sub(r"[^0-9A-Za-z]", "", etag or "")[:16] or "unversioned"
    return dest.parent / f".{dest.name}.{tag}.part"


def fetch(hub: Hub, remote: Remote, progress=None) -> str:
    """Fetch one file to `remote.dest` (resumable, atomic); returns "present", "fetched" or "resumed"."""
    return fetch_group(hub, [remote], progress)[0]


def fetch_group(hub: Hub, group: list[Remote], progress=None) -> list[str]:
    """Fetch files that belong together (one pattern's: shards, a tokenizer folder): every transfer first, then the
    renames, so an interruption leaves none of them under its final name and a rerun resumes each."""
    done = [_fetch_part(hub, remote, progress) for remote in group]
    for remote, (_, part) in zip(group, done, strict=True):
        if part is not None:
            _place(part, remote.dest)
    return [status for status, _ in done]


def _fetch_part(hub: Hub, remote: Remote, progress) -> tuple[str, Path | None]:
    """(status, the whole .part to rename onto remote.dest), or ("present", None)."""
    dest = remote.dest
    if dest.is_file():  # whole by construction: only a finished transfer is renamed onto it
        return "present", None
    meta = hub.metadata(remote.repo, remote.path, remote.revision)  # before anything is written
    size = meta.size if meta.size is not None else remote.size
    with _locked(dest):
        if dest.is_file():  # another process finished it while this one waited
            return "present", None
        part = _part_path(dest, meta.etag)
        for stale in dest.parent.glob(f".{dest.name}.*.part"):  # another version's bytes: not resumable
            if stale != part:
                stale.unlink()
        start = part.stat().st_size if part.exists() else 0
        if size is not None and start > size:
            part.unlink()
            start = 0
        task = progress.add_task(dest.name, total=size, completed=start) if progress is not None else None
        _transfer(hub, remote, meta.location, part, size, progress, task)
        return ("resumed" if start else "fetched"), part


def _place(part: Path, dest: Path) -> None:
    """Rename a whole .part onto its final name (durably), and drop the file's lock."""
    with contextlib.suppress(FileNotFoundError):  # another process, holding the same whole part, placed it first
        os.replace(part, dest)
    if not dest.is_file():
        raise WanAlphaError(f"{dest} vanished while it was being placed; rerun to fetch it")
    with contextlib.suppress(OSError):
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    (dest.parent / f".{dest.name}.lock").unlink(missing_ok=True)


def _transfer(hub: Hub, remote: Remote, url: str, part: Path, size: int | None, progress, task) -> None:
    """Append the rest of the file to `part` (HTTP Range from its length), retrying dropped connections while they
    make progress; on return `part` holds exactly `size` bytes."""
    from huggingface_hub import constants

    headers = _headers(url, hub.endpoint)
    failures, reason = 0, ""
    while True:
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have >= size:
            break
        if failures >= RETRIES:
            raise WanAlphaError(
                f"download of {remote.repo}/{remote.path} stopped at {have} of {size} bytes "
                f"({reason}); rerun to resume from there"
            )
        if failures:
            time.sleep(min(2 ** (failures - 1), 8))
        request = urllib.request.Request(url, headers=dict(headers, **({"Range": f"bytes={have}-"} if have else {})))
        try:
            with _OPENER.open(request, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
                if response.status == 200:  # a whole body (no Range asked, or the server ignored it)
                    have = 0
                with open(part, "r+b" if part.exists() else "wb") as out:
                    out.seek(have)
                    out.truncate()
                    while chunk := response.read1(CHUNK):  # what has arrived, up to CHUNK
                        out.write(chunk)
                        out.flush()  # on disk as it arrives: a stalled or killed transfer resumes from all of it
                        have += len(chunk)
                        failures = 0
                        if task is not None:
                            progress.update(task, completed=have)
                    out.flush()
                    os.fsync(out.fileno())
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and size is not None and have >= size:
                break
            raise WanAlphaError(
                f"the hub refused {remote.repo}/{remote.path} (HTTP {exc.code} {exc.reason}); rerun "
                "to resume, or check access (HF_TOKEN)"
            ) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:  # refused, reset, timeout, truncated body
            cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            failures, reason = failures + 1, _reason(cause)
            continue
        if size is None:
            break  # nothing to check against: the end of the body is the end of the file
        if have < size:  # the body ended early without an error
            failures, reason = failures + 1, "connection closed early"
    got = part.stat().st_size if part.exists() else 0
    if size is not None and got != size:
        raise WanAlphaError(
            f"{remote.repo}/{remote.path}: got {got} bytes, the hub says {size}; rerun to fetch it again"
        )


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )


# ------------------------------------------------------------------------------------------------ hub ids


def ensure_patterns(repo: str, patterns: list[str], folder: Path) -> dict[str, list[Path]]:
    """`--model_id_with_origin_paths` for one repository: each pattern's files under `folder` (= <models>/<repo>),
    fetching what is missing. No network when every pattern is already complete on disk."""
    folder = Path(folder)
    found = {p: local_matches(folder, p) for p in patterns}
    missing = [p for p, files in found.items() if not complete(files)]
    if not missing:
        return found
    if offline():
        pattern = missing[0]
        raise WanAlphaError(
            f"{pattern} of {repo} not found in {folder}/ and HF_HUB_OFFLINE is set; unset it to "
            f"download, put the file(s) there (`hf download {repo} --include '{pattern}' --local-dir "
            f"{folder}`), or pass local paths"
        )
    hub = Hub()
    commit, listing = hub.listing(repo)
    groups = []
    for pattern in missing:
        paths = sorted(p for p in listing if fnmatch.fnmatch(p, pattern))
        if not paths:
            raise WanAlphaError(
                f"{repo} has no file matching {pattern} on {hub.endpoint}; fix the --model_id_with_origin_paths entry"
            )
        groups.append([Remote(repo, p, commit, folder / p, listing[p]) for p in paths])
    with _progress() as progress:
        for group in groups:
            fetch_group(hub, group, progress)
    return {p: local_matches(folder, p) for p in patterns}


# ------------------------------------------------------------------------------------------------ VGG16


def vgg16_weights(vgg_path: Path | None, models_dir: Path) -> Path:
    """The VGG16 ImageNet weights of the perceptual term: --vgg-path, else a copy already on disk (the models
    folder, torchvision's download cache), else the hub's timm copy fetched into the models folder."""
    if vgg_path is not None:
        if not Path(vgg_path).is_file():
            raise WanAlphaError(
                f"--vgg-path {vgg_path} does not exist; give torchvision's {TORCHVISION_VGG16} or "
                "timm's vgg16.tv_in1k model.safetensors, or --perceptual-weight 0"
            )
        return Path(vgg_path)
    dest = Path(models_dir) / VGG16.dest.removeprefix("models/")
    for candidate in (dest, Path(models_dir) / TORCHVISION_VGG16, _torch_hub_dir() / "checkpoints" / TORCHVISION_VGG16):
        if candidate.is_file():
            return candidate
    ways_out = (
        f"pass --vgg-path FILE (torchvision's {TORCHVISION_VGG16} or timm's vgg16.tv_in1k model.safetensors), "
        "run `wanalpha download vgg16` where the hub is reachable, or turn the term off with "
        "--perceptual-weight 0"
    )
    if offline():
        raise WanAlphaError(
            f"the perceptual term needs VGG16 weights, none found in {dest.parent}/ and "
            f"HF_HUB_OFFLINE is set: {ways_out}"
        )
    try:
        hub = Hub()
        with _progress() as progress:
            fetch(hub, Remote(VGG16.repo, VGG16.pattern, "main", dest, VGG16.size), progress)
    except WanAlphaError as exc:
        raise WanAlphaError(
            f"the perceptual term needs VGG16 weights and fetching {VGG16.repo} failed ({exc}): {ways_out}"
        ) from None
    return dest


def _torch_hub_dir() -> Path:
    if "TORCH_HOME" in os.environ:
        return Path(os.environ["TORCH_HOME"]) / "hub"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "torch" / "hub"


# ------------------------------------------------------------------------------------------------ the command


def placed(source: Source, root: Path, models_dir: Path) -> Path:
    """Where a source's files go under --root (a leading models/ goes to the models folder)."""
    dest = source.dest
    if dest == "models" or dest.startswith("models/"):
        return Path(models_dir) / dest.removeprefix("models").lstrip("/")
    return Path(root) / dest


def run(cfg) -> list[tuple[str, Path, int | None, str]]:
    """`wanalpha download`: the named items' files into the guide's layout; returns (name, path, size, status)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if not cfg.names:
        table = Table("name", "what", "size", title="wanalpha download NAME… (docs/download.md)")
        for item in CATALOGUE.values():
            table.add_row(item.name, item.description, _total((s.size for s in item.sources), approx=True))
        console.print(table)
        return []
    unknown = [n for n in cfg.names if n not in CATALOGUE]
    if unknown:
        raise ConfigError(
            f"unknown release name {unknown[0]!r}; choose from {', '.join(CATALOGUE)} (`wanalpha download` lists them)"
        )
    models_dir = cfg.models_dir if cfg.models_dir is not None else Path(cfg.root) / "models"
    plan = _plan([CATALOGUE[n] for n in dict.fromkeys(cfg.names)], Path(cfg.root), models_dir, cfg.dry_run)
    rows: list[tuple[str, Path, int | None, str]] = []
    if cfg.dry_run:
        table = Table("item", "file", "size", "status", title="would fetch (dry run)")
        for name, group in plan:
            for remote, status in group:
                table.add_row(name, str(remote.dest), _total([remote.size]), status)
                rows.append((name, remote.dest, remote.size, status))
        todo = [size for _, _, size, status in rows if status == "to fetch"]
        console.print(table)
        note = " (HF_HUB_OFFLINE: sizes from the catalogue, approximate)" if offline() else ""
        console.print(f"{len(todo)} file(s) to fetch, {_total(todo)}{note}; nothing was written")
        return rows
    hub = None
    with _progress() as progress:
        for name, group in plan:
            todo = [remote for remote, status in group if status != "present"]
            if todo:
                hub = hub or Hub()
            fetched = iter(fetch_group(hub, todo, progress) if todo else [])
            for remote, status in group:
                rows.append((name, remote.dest, remote.size, status if status == "present" else next(fetched)))
    table = Table("item", "file", "size", "status")
    for name, path, size, status in rows:
        table.add_row(name, str(path), _total([path.stat().st_size if path.is_file() else size]), status)
    console.print(table)
    return rows


def _plan(items: list[Item], root: Path, models_dir: Path, dry_run: bool) -> list[tuple[str, list]]:
    """Per item and source, its files with their status ("present" / "to fetch"): [(name, [(Remote, status)])].
    The hub is asked only about sources not complete on disk."""
    plan: list[tuple[str, list]] = []
    hub = None
    for item in items:
        for source in item.sources:
            dest = placed(source, root, models_dir)
            if source.is_pattern and complete(files := local_matches(dest, source.pattern)):
                plan.append(
                    (
                        item.name,
                        [
                            (
                                Remote(source.repo, f.relative_to(dest).as_posix(), "main", f, f.stat().st_size),
                                "present",
                            )
                            for f in files
                        ],
                    )
                )
                continue
            if not source.is_pattern and dest.is_file():
                plan.append(
                    (item.name, [(Remote(source.repo, source.pattern, "main", dest, dest.stat().st_size), "present")])
                )
                continue
            if offline():
                if not dry_run:
                    raise WanAlphaError(
                        f"HF_HUB_OFFLINE is set and {dest} is missing ({source.repo}: "
                        f"{source.pattern}); unset HF_HUB_OFFLINE to download, or copy the file "
                        "there"
                    )
                shown = dest / source.pattern if source.is_pattern else dest
                plan.append(
                    (item.name, [(Remote(source.repo, source.pattern, "main", shown, source.size), "to fetch")])
                )
                continue
            hub = hub or Hub()
            group = []
            for remote in remotes(hub, source, dest):
                if remote.dest.is_file():
                    group.append((remote, "present"))
                    continue
                if dry_run and remote.size is None:
                    remote = Remote(
                        remote.repo,
                        remote.path,
                        remote.revision,
                        remote.dest,
                        hub.metadata(remote.repo, remote.path, remote.revision).size,
                    )
                group.append((remote, "to fetch"))
            plan.append((item.name, group))
    return plan


def _total(sizes, approx: bool = False) -> str:
    """A size for people: the sum, "… + ?" when some are unknown; "≈" for the catalogue's published figures."""
    from rich.filesize import decimal

    sizes = list(sizes)
    known = sum(s for s in sizes if s is not None)
    text = ("≈ " if approx and known else "") + (decimal(known) if known or None not in sizes else "")
    if None in sizes:
        return f"{text} + ?" if known else "?"
    return text
