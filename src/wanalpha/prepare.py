"""`wanalpha prepare`: raw RGBA clips → a checked dataset folder (seed guide Step 1).

Input, either
  - a folder of `NNN.mp4` (RGB), `NNN_seg.mp4` (alpha), `NNN.txt` (caption), optionally nested (--recursive), or
  - the official Wan-Alpha CSV (`video_fgr`, `video_pha`, `prompt`; paths relative to the CSV).
Output: `NNN_rgb.mp4`, `NNN_alpha.mp4` (copies or links of the sources) and `metadata.csv` with columns
`video` (base name), `prompt`, `num_frames`, `fps`, `width`, `height`, plus `config.yaml` and
`provenance.json`. Every pair is decoded and checked first; bad clips are skipped with a reason.
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from wanalpha.checkpoints.provenance import write_provenance
from wanalpha.config import PrepareConfig
from wanalpha.data.files import place, write_if_changed
from wanalpha.data.video import VideoError, probe_video
from wanalpha.errors import WanAlphaError
from wanalpha.progress import status

METADATA_COLUMNS = ("video", "prompt", "num_frames", "fps", "width", "height")
CSV_COLUMNS = ("video_fgr", "video_pha", "prompt")
RGB_SUFFIX, ALPHA_SUFFIX = "_rgb.mp4", "_alpha.mp4"


@dataclass
class ClipSource:
    """One candidate clip before checking. `caption` is set for CSV input, `caption_file` for folders."""

    name: str  # base name, '/'-separated relative path for nested folders: "001", "cats/001"
    rgb: Path | None
    alpha: Path | None
    caption_file: Path | None = None
    caption: str | None = None
    problem: str | None = None  # a reason known before probing (missing partner, duplicate name)


@dataclass
class Clip:
    name: str
    rgb: Path
    alpha: Path
    prompt: str
    num_frames: int
    fps: float
    width: int
    height: int

    def row(self) -> list:
        return [self.name, self.prompt, self.num_frames, round(self.fps, 4), self.width, self.height]


@dataclass
class PrepareResult:
    kept: list[Clip] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (name, reason, detail)
    warnings: list[str] = field(default_factory=list)
    written: int = 0  # clips whose files were (re)written; the rest were already in place


# --------------------------------------------------------------------------------------------- discovery


def discover_folder(source_dir: Path, recursive: bool, exclude: Path | None = None) -> list[ClipSource]:
    """Pair NNN.mp4 with NNN_seg.mp4 and NNN.txt in `source_dir` (and below it, if recursive)."""
    pattern = "**/*" if recursive else "*"
    rgb, seg = {}, {}
    for path in sorted(source_dir.glob(pattern)):
        if not path.is_file() or path.suffix.lower() != ".mp4" or path.name.startswith("."):
            continue
        if exclude is not None and exclude in path.resolve().parents:
            continue
        rel = path.relative_to(source_dir).with_suffix("").as_posix()
        if rel.endswith("_seg"):
            seg[rel[: -len("_seg")]] = path
        else:
            rgb[rel] = path
    clips = []
    for name in sorted(set(rgb) | set(seg)):
        problem = None
        if name not in rgb:
            problem = f"missing RGB video ({Path(name).name}.mp4 beside {seg[name].name})"
        elif name not in seg:
            problem = f"missing alpha video ({Path(name).name}_seg.mp4)"
        caption_file = source_dir / f"{name}.txt"
        clips.append(ClipSource(name, rgb.get(name), seg.get(name), caption_file=caption_file, problem=problem))
    return clips


def discover_csv(csv_path: Path) -> list[ClipSource]:
    """The official Wan-Alpha layout: rows of video_fgr, video_pha, prompt (paths relative to the CSV)."""
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise WanAlphaError(
                    f"{csv_path}: missing column(s) {', '.join(missing)}; the Wan-Alpha CSV needs "
                    f"{', '.join(CSV_COLUMNS)} (found: {', '.join(reader.fieldnames or []) or 'none'})"
                )
            rows = list(reader)
    except UnicodeDecodeError:
        raise WanAlphaError(f"{csv_path}: not UTF-8 text; save the CSV as UTF-8") from None
    base = csv_path.parent
    clips, seen = [], {}
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        fgr, pha = (row.get("video_fgr") or "").strip(), (row.get("video_pha") or "").strip()
        name = Path(fgr).stem if fgr else f"row{i}"
        problem = None
        if not fgr:
            problem = f"empty video_fgr (line {i})"
        elif not pha:
            problem = f"empty video_pha (line {i})"
        elif name in seen:
            problem = f"duplicate name ({name!r} on line {i}, first on line {seen[name]})"
        else:
            seen[name] = i
        rgb = base / fgr if fgr else None
        alpha = base / pha if pha else None
        if problem is None and not rgb.is_file():
            problem = f"missing RGB video ({fgr})"
        if problem is None and not alpha.is_file():
            problem = f"missing alpha video ({pha})"
        clips.append(ClipSource(name, rgb, alpha, caption=row.get("prompt") or "", problem=problem))
    return clips


# --------------------------------------------------------------------------------------------- checking


def _reason(detail: str) -> str:
    """The short reason (summary-table key) of a detailed message: the text before its first '('."""
    return detail.split(" (")[0].strip()


def read_caption(src: ClipSource, default: str | None) -> tuple[str | None, str | None]:
    """(caption, problem). Captions are kept exactly, minus surrounding whitespace."""
    if src.caption is not None:
        text = src.caption
    elif src.caption_file is not None and src.caption_file.is_file():
        try:
            text = src.caption_file.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            return None, f"caption is not UTF-8 ({src.caption_file.name})"
    else:
        if default is not None:
            return default, None
        return None, f"missing caption ({Path(src.name).name}.txt)"
    text = text.strip()
    if not text:
        if default is not None:
            return default, None
        return None, "empty caption"
    return text, None


def check_clip(
    src: ClipSource, default_caption: str | None = None, alpha_grey_tolerance: int = 12
) -> tuple[Clip | None, str | None, list[str]]:
    """(clip, problem, warnings): decode both videos and compare frame count, size and fps; a missing caption takes
    `default_caption`, an alpha video whose channels differ by more than `alpha_grey_tolerance` is warned about."""
    if src.problem:
        return None, src.problem, []
    prompt, problem = read_caption(src, default_caption)
    if problem:
        return None, problem, []
    infos = {}
    for kind, path in (("RGB", src.rgb), ("alpha", src.alpha)):
        try:
            infos[kind] = probe_video(path)
        except VideoError:
            return None, f"undecodable {kind} video ({path.name})", []
    rgb, alpha = infos["RGB"], infos["alpha"]
    if rgb.num_frames != alpha.num_frames:
        return None, f"frame count mismatch (RGB {rgb.num_frames}, alpha {alpha.num_frames})", []
    if (rgb.width, rgb.height) != (alpha.width, alpha.height):
        return (
            None,
            f"size mismatch (RGB {rgb.width}x{rgb.height}, alpha {alpha.width}x{alpha.height})",
            [],
        )
    if abs(rgb.fps - alpha.fps) > 1e-3 * max(rgb.fps, 1.0):
        return None, f"fps mismatch (RGB {rgb.fps:g}, alpha {alpha.fps:g})", []
    warnings = []
    if alpha.max_channel_spread > alpha_grey_tolerance:
        warnings.append(
            f"{src.name}: alpha video {src.alpha.name} is not greyscale (channels differ by up to "
            f"{alpha.max_channel_spread}); it is kept, and readers use its channel mean"
        )
    clip = Clip(src.name, src.rgb, src.alpha, prompt, rgb.num_frames, rgb.fps, rgb.width, rgb.height)
    return clip, None, warnings


# --------------------------------------------------------------------------------------------- writing


def metadata_text(clips: list[Clip]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(METADATA_COLUMNS)
    for clip in sorted(clips, key=lambda c: c.name):
        writer.writerow(clip.row())
    return buf.getvalue()


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def prepare_dataset(cfg: PrepareConfig, console: Console | None = None) -> PrepareResult:
    """Check every clip, then place the good ones and write metadata.csv. Raises WanAlphaError when nothing
    usable was found, or (with strict) when anything would be skipped — in that case nothing is written."""
    console = console or Console(stderr=True)
    out = Path(cfg.output_dir)
    if cfg.source_csv is not None:
        source = Path(cfg.source_csv)
        if not source.is_file():
            raise WanAlphaError(f"source CSV {source} does not exist; pass the Wan-Alpha data.csv to --source-csv")
        candidates = discover_csv(source)
    else:
        source = Path(cfg.source_dir)
        if not source.is_dir():
            raise WanAlphaError(f"source directory {source} does not exist; pass the raw clips folder to --source-dir")
        if source.resolve() == out.resolve():
            raise WanAlphaError("--output-dir must differ from --source-dir (outputs would be read as sources)")
        candidates = discover_folder(source, cfg.recursive, exclude=out.resolve())
    if not candidates:
        raise WanAlphaError(f"no clips found in {source}: expected NNN.mp4 + NNN_seg.mp4 + NNN.txt")

    result = PrepareResult()
    with _progress(console) as progress:
        task = progress.add_task("checking clips", total=len(candidates))
        for src in candidates:
            clip, problem, warnings = check_clip(src, cfg.default_caption, cfg.alpha_grey_tolerance)
            if clip is None:
                result.skipped.append((src.name, _reason(problem), problem))
            else:
                result.kept.append(clip)
            result.warnings.extend(warnings)
            progress.advance(task)

    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True, highlight=False)
    for name, _, detail in result.skipped:
        console.print(f"[yellow]skipped[/] {name}: {detail}", soft_wrap=True, highlight=False)
    if cfg.strict and result.skipped:
        raise WanAlphaError(
            f"--strict: {len(result.skipped)} of {len(candidates)} clips would be skipped "
            f"(first: {result.skipped[0][0]}: {result.skipped[0][2]}); nothing was written"
        )
    if not result.kept:
        raise WanAlphaError(
            f"no usable clips in {source}: all {len(candidates)} were skipped "
            f"({', '.join(f'{r}: {n}' for r, n in Counter(s[1] for s in result.skipped).items())})"
        )

    out.mkdir(parents=True, exist_ok=True)
    with _progress(console) as progress:
        task = progress.add_task("writing dataset", total=len(result.kept))
        for clip in result.kept:
            changed = place(clip.rgb, out / f"{clip.name}{RGB_SUFFIX}", cfg.link)
            changed |= place(clip.alpha, out / f"{clip.name}{ALPHA_SUFFIX}", cfg.link)
            result.written += int(changed)
            progress.advance(task)
    write_if_changed(out / "metadata.csv", metadata_text(result.kept))
    write_if_changed(out / "config.yaml", cfg.to_yaml())
    write_provenance(
        out,
        "prepare",
        extra={
            "source": str(source.resolve()),
            "kept": [c.name for c in sorted(result.kept, key=lambda c: c.name)],
            "skipped": [{"clip": n, "reason": d} for n, _, d in result.skipped],
        },
    )
    return result


def summary_table(result: PrepareResult) -> Table:
    table = Table(title="prepare", show_header=True, header_style="bold")
    table.add_column("clips")
    table.add_column("count", justify="right")
    table.add_row("[green]kept[/]", str(len(result.kept)))
    table.add_row("  written now", str(result.written))
    table.add_row("  already in place", str(len(result.kept) - result.written))
    for reason, n in sorted(Counter(s[1] for s in result.skipped).items()):
        table.add_row(f"[yellow]skipped: {reason}[/]", str(n))
    return table


def write_synthetic(cfg: PrepareConfig, console: Console) -> list[str]:
    """`prepare --synthetic N`: write N raw synthetic clips (NNN.mp4, NNN_seg.mp4, NNN.txt)."""
    from wanalpha.data.synthetic import write_synthetic_source

    out = Path(cfg.output_dir)
    previous = out / "config.yaml"
    same_settings = previous.is_file() and previous.read_text(encoding="utf-8") == cfg.to_yaml()
    with status(console, f"writing {cfg.synthetic} synthetic clips"):
        names = write_synthetic_source(
            out, cfg.synthetic, cfg.num_frames, cfg.width, cfg.height, cfg.fps, cfg.seed, keep_existing=same_settings
        )
    write_if_changed(out / "config.yaml", cfg.to_yaml())
    write_provenance(out, "prepare --synthetic", extra={"clips": names})
    return names


def run(cfg: PrepareConfig, hint: bool = True) -> PrepareResult | list[str]:
    """Prepare a dataset, or write synthetic clips; `hint`: end with the next command to run (not inside the demo,
    which runs it itself)."""
    console = Console(stderr=True, highlight=False)
    if cfg.synthetic is not None:
        names = write_synthetic(cfg, console)
        then = f"; next: wanalpha prepare --source_dir {cfg.output_dir} --output_dir <dataset dir>" if hint else ""
        Console(highlight=False).print(
            f"wrote {len(names)} synthetic clips ({cfg.num_frames} frames, {cfg.width}x{cfg.height}, "
            f"{cfg.fps:g} fps) to {cfg.output_dir}{then}"
        )
        return names
    result = prepare_dataset(cfg, console)
    stdout = Console(highlight=False)
    stdout.print(summary_table(result))
    stdout.print(f"dataset: {os.fspath(Path(cfg.output_dir) / 'metadata.csv')}")
    return result
