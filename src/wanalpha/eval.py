"""`wanalpha eval`: is this run's alpha good? Scores every clip that `generate` wrote and shows it.

For each RUN folder (its generation.json names the prompts, seeds and settings; the clip stems follow generate's
naming) the RGBA PNG frames of every clip (the RGB and alpha mp4s where the PNGs are gone) are scored with the
no-reference metrics of wanalpha.quality and, unless --no-clip, the CLIP text–video score over composites. With
--generate CONFIG, generate first runs on the prompt set with that config's weights and settings. Writes into --out:
metrics.json (per clip, per category and per run; with several runs the difference of each metric from the first
run and which run wins), report.html (one self-contained page: wanalpha.report) and config.yaml.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

from wanalpha import quality
from wanalpha.config import EvalConfig
from wanalpha.data.files import atomic_write_text, read_json, read_utf8
from wanalpha.errors import WanAlphaError
from wanalpha.progress import status

OTHER = "other"  # the category of a prompt that the prompt set does not hold
# The settings shown per run in the report.
SETTINGS = (
    "steps",
    "sampler",
    "shift",
    "cfg_scale",
    "height",
    "width",
    "num_frames",
    "dora",
    "dora_scale",
    "lora",
    "alpha_shift_mean",
    "gauss_mask",
    "dit_dtype",
    "vae_dtype",
)


@dataclass
class ClipResult:
    index: int
    prompt: str
    category: str
    seed: int | None
    stem: str
    frames: int
    size: tuple[int, int]  # (H, W)
    metrics: dict[str, float]
    strips: dict[str, bytes] = field(default_factory=dict)  # background or "alpha" → JPEG of the strip


@dataclass
class RunResult:
    name: str
    folder: Path
    settings: dict
    clips: list[ClipResult]


# ------------------------------------------------------------------------------------------------ prompt sets


def prompt_set(spec: str) -> list[tuple[str, str]]:
    """(category, prompt) pairs: the shipped set for 'eval', else a CSV with columns category,prompt."""
    if spec == "eval":
        text = (resources.files("wanalpha") / "prompts" / "eval.csv").read_text(encoding="utf-8")
        where = "the shipped prompt set"
    else:
        path = Path(spec)
        if not path.is_file():
            raise WanAlphaError(f"--prompts {spec}: no such file; give 'eval' or a CSV with columns category,prompt")
        text = read_utf8(path, f"--prompts {spec}")
        where = spec
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or not {"category", "prompt"} <= set(rows[0]):
        raise WanAlphaError(f"{where} needs a header with the columns category and prompt (and one row a prompt)")
    pairs = [(r["category"].strip() or OTHER, r["prompt"].strip()) for r in rows if (r["prompt"] or "").strip()]
    if not pairs:
        raise WanAlphaError(f"{where} holds no prompt")
    return pairs


def selected_prompts(cfg: EvalConfig) -> list[tuple[str, str]]:
    """The prompt set, cut to --categories and --limit (what --generate generates)."""
    pairs = prompt_set(cfg.prompts)
    if cfg.categories:
        known = sorted({c for c, _ in pairs})
        unknown = [c for c in cfg.categories if c not in known]
        if unknown:
            raise WanAlphaError(f"--categories {unknown[0]!r} is not in the prompt set; it has {', '.join(known)}")
        pairs = [(c, p) for c, p in pairs if c in cfg.categories]
    return pairs[: cfg.limit] if cfg.limit else pairs


# ------------------------------------------------------------------------------------------------ reading runs


def read_generation(folder: Path) -> dict:
    """A generate run's generation.json, checked for what eval uses."""
    record_path = Path(folder) / "generation.json"
    if not Path(folder).is_dir():
        raise WanAlphaError(f"run folder {folder} does not exist; give folders written by `wanalpha generate`")
    if not record_path.is_file():
        raise WanAlphaError(
            f"{folder} has no generation.json; eval scores folders written by `wanalpha generate` "
            "(or use --generate CONFIG)"
        )
    record = read_json(record_path, "rerun `wanalpha generate` into that folder")
    if not isinstance(record, dict) or not isinstance(record.get("prompts"), list) or not record["prompts"]:
        raise WanAlphaError(f"{record_path} lists no prompts; it was not written by `wanalpha generate`")
    return record


def clip_stems(folder: Path, record: dict) -> list[Path]:
    """The stem of each prompt's clip, as generate names them: {prefix} for one prompt, {prefix}_{i:03d} for more."""
    prefix = (record.get("config") or {}).get("output_prefix", "output")
    count = len(record["prompts"])
    return [folder / (prefix if count == 1 else f"{prefix}_{i:03d}") for i in range(count)]


def read_clip(stem: Path) -> tuple[np.ndarray, np.ndarray]:
    """rgb (T,H,W,3) and alpha (T,H,W) uint8 of one generated clip: its straight-alpha RGBA PNG frames, or its RGB
    and alpha mp4s where the frames are gone."""
    from wanalpha.data.video import read_video

    folder = stem.with_name(stem.name + "_rgba_frames")
    pngs = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if pngs:
        frames = []
        for png in pngs:
            image = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
            if image is None or image.ndim != 3 or image.shape[2] != 4:
                raise WanAlphaError(f"{png} is not an RGBA PNG; rerun `wanalpha generate` for this clip")
            frames.append(cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA))
        rgba = np.stack(frames)
        return np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3])
    rgb_path, alpha_path = stem.with_name(stem.name + "_rgb.mp4"), stem.with_name(stem.name + "_alpha.mp4")
    if not (rgb_path.is_file() and alpha_path.is_file()):
        raise WanAlphaError(
            f"no frames of clip {stem.name} in {stem.parent}: neither {folder.name}/ nor "
            f"{rgb_path.name} + {alpha_path.name}; rerun `wanalpha generate` there"
        )
    rgb, _ = read_video(rgb_path)
    alpha, _ = read_video(alpha_path)
    frames = min(len(rgb), len(alpha))
    return rgb[:frames], alpha[:frames].mean(-1).round().astype(np.uint8)


def run_names(folders: list[Path]) -> list[str]:
    """Short distinct names: the folder's name, with its parent's where two share one, and a number where that too
    is the same."""
    names = [Path(f).resolve().name for f in folders]
    names = [
        f"{Path(f).resolve().parent.name}/{n}" if names.count(n) > 1 else n for f, n in zip(folders, names, strict=True)
    ]
    return [f"{n} ({i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]


# ------------------------------------------------------------------------------------------------ generate first


def generate_runs(cfg: EvalConfig, console: Console) -> list[Path]:
    """--generate: each config generates the selected prompts into <out>/runs/<config name>/ (a folder that already
    holds this config's clips of these prompts is kept as it is)."""
    from pydantic import ValidationError

    from wanalpha import generate
    from wanalpha.config import GenerateConfig, describe_validation_error, read_config_file

    if not cfg.generate:
        return []
    prompts = [p for _, p in selected_prompts(cfg)]
    prompt_file = Path(cfg.out) / "prompts.txt"
    prompt_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(prompt_file, "\n".join(prompts) + "\n")
    folders = []
    names = run_names([Path(p.stem) for p in cfg.generate])
    for path, name in zip(cfg.generate, names, strict=True):
        values = read_config_file(path)
        for key in ("prompt", "prompt_file", "output_dir", "overwrite"):
            values.pop(key, None)
        folder = Path(cfg.out) / "runs" / name.replace("/", "_").replace(" ", "_")
        values |= {"prompt_file": prompt_file, "output_dir": folder}
        try:
            gen_cfg = GenerateConfig.model_validate(values)
        except ValidationError as exc:
            raise WanAlphaError(describe_validation_error(GenerateConfig, exc, f"--generate {path}")) from None
        done = folder / "generation.json"
        if done.is_file():
            record = json.loads(done.read_text(encoding="utf-8"))
            earlier = {k: v for k, v in record.get("config", {}).items() if k != "overwrite"}
            now = {k: v for k, v in json.loads(gen_cfg.model_dump_json()).items() if k != "overwrite"}
            if record.get("prompts") == prompts and earlier == now:
                console.print(f"eval: {folder} already holds this config's clips; kept", markup=False)
                folders.append(folder)
                continue
        console.print(f"eval: generating {len(prompts)} prompt(s) with {path} into {folder}", markup=False)
        generate.run(gen_cfg.model_copy(update={"overwrite": True}))
        folders.append(folder)
    return folders


# ------------------------------------------------------------------------------------------------ scoring


def score_run(
    folder: Path, name: str, cfg: EvalConfig, categories: dict[str, str], scorer, console: Console
) -> RunResult:
    from wanalpha.report import clip_strips

    record = read_generation(folder)
    settings = {k: record["config"][k] for k in SETTINGS if k in (record.get("config") or {})}
    if (record.get("inputs") or {}).get("dora") not in (None, "None"):
        settings["dora"] = record["inputs"]["dora"]
    settings["seed"] = record.get("seed")
    seeds = record.get("seeds") or [record.get("seed")] * len(record["prompts"])
    clips = []
    for i, (prompt, stem) in enumerate(zip(record["prompts"], clip_stems(Path(folder), record), strict=True)):
        with status(console, f"eval {name}: clip {i + 1}/{len(record['prompts'])}"):
            rgb, alpha = read_clip(stem)
            metrics = quality.clip_quality(rgb, alpha, cfg.margin, cfg.edge_radius)
            if scorer is not None:
                metrics |= quality.clip_score(scorer, prompt, rgb, alpha, cfg.clip_frames)
            strips = clip_strips(rgb, alpha, cfg.strip_frames)
            clips.append(
                ClipResult(
                    i,
                    prompt,
                    categories.get(prompt, OTHER),
                    seeds[i],
                    stem.name,
                    len(rgb),
                    (rgb.shape[1], rgb.shape[2]),
                    metrics,
                    strips,
                )
            )
    return RunResult(name, Path(folder), settings, clips)


def mean_metrics(clips: list[ClipResult]) -> dict[str, float]:
    """Each metric's mean over the clips that have it (NaN: missing, e.g. no background in an opaque clip); the
    flags' mean is the share of clips flagged."""
    keys = [k for k in clips[0].metrics] if clips else []
    out = {}
    for key in keys:
        values = [c.metrics[key] for c in clips if not math.isnan(c.metrics.get(key, math.nan))]
        out[key] = float(np.mean(values)) if values else math.nan
    return out


def by_category(clips: list[ClipResult]) -> dict[str, dict[str, float]]:
    order = list(dict.fromkeys(c.category for c in clips))
    return {cat: mean_metrics([c for c in clips if c.category == cat]) for cat in order}


def better(metric: str) -> str | None:
    if metric.startswith("clip_score"):
        return "higher"
    return quality.METRICS.get(metric, (None, ""))[0]


def compare(means: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Per metric with a direction: each run's value, its difference from the first run's, and the winner (the
    best value; 'tie' when several share it; none when no run has a value)."""
    runs = list(means)
    base = runs[0]
    out = {}
    for metric in means[base]:
        direction = better(metric)
        if direction is None:
            continue
        values = {r: means[r].get(metric, math.nan) for r in runs}
        present = {r: v for r, v in values.items() if not math.isnan(v)}
        best = (min if direction == "lower" else max)(present.values()) if present else None
        winners = [r for r, v in present.items() if best is not None and math.isclose(v, best, abs_tol=1e-12)]
        out[metric] = {
            "better": direction,
            "values": values,
            "difference": {r: values[r] - values[base] for r in runs},
            "winner": None if not winners else winners[0] if len(winners) == 1 else "tie",
        }
    return out


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def summary_table(results: list[RunResult], means: dict[str, dict[str, float]], comparison: dict) -> Table:
    table = Table(title="eval: mean over clips (flags: share of clips flagged); ↓ lower is better, ↑ higher")
    table.add_column("metric")
    for r in results:
        table.add_column(r.name, justify="right")
    if len(results) > 1:
        table.add_column("winner")
    for metric in means[results[0].name]:
        if metric.startswith("clip_score_"):
            continue
        arrow = {"lower": " ↓", "higher": " ↑"}.get(better(metric) or "", "")
        cells = [f"{means[r.name][metric]:.4g}" if not math.isnan(means[r.name][metric]) else "–" for r in results]
        extra = [str(comparison.get(metric, {}).get("winner") or "")] if len(results) > 1 else []
        table.add_row(metric + arrow, *cells, *extra)
    return table


def run(cfg: EvalConfig) -> dict:
    from wanalpha.report import write_report

    console = Console(stderr=True, highlight=False)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    folders = [Path(f) for f in cfg.runs]
    for folder in folders:  # every given folder is checked before the long work
        read_generation(folder)
    folders += generate_runs(cfg, console)
    categories = {p: c for c, p in prompt_set(cfg.prompts)}
    scorer, clip_folder = None, None
    if cfg.clip:
        from wanalpha.checkpoints.clip import CLIPScorer, resolve_clip
        from wanalpha.runtime import default_device

        clip_folder = resolve_clip(cfg.clip_model, cfg.models_dir)
        with status(console, f"loading CLIP from {clip_folder}"):
            scorer = CLIPScorer.load(clip_folder, default_device())
    results = [
        score_run(f, n, cfg, categories, scorer, console) for f, n in zip(folders, run_names(folders), strict=True)
    ]
    means = {r.name: mean_metrics(r.clips) for r in results}
    comparison = compare(means) if len(results) > 1 else {}
    report = {
        "runs": {
            r.name: {
                "folder": str(r.folder),
                "settings": r.settings,
                "mean": means[r.name],
                "categories": by_category(r.clips),
                "clips": [
                    {
                        "index": c.index,
                        "prompt": c.prompt,
                        "category": c.category,
                        "seed": c.seed,
                        "stem": c.stem,
                        "frames": c.frames,
                        "size": list(c.size),
                        "metrics": c.metrics,
                    }
                    for c in r.clips
                ],
            }
            for r in results
        },
        "baseline": results[0].name,
        "comparison": comparison,
        "metrics": {k: {"better": d, "meaning": m} for k, (d, m) in quality.METRICS.items()},
        "clip_model": str(clip_folder) if clip_folder else None,
    }
    report = _json_safe(report)
    atomic_write_text(out / "metrics.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    page = write_report(out / "report.html", results, means, comparison, cfg)
    atomic_write_text(out / "config.yaml", cfg.to_yaml())
    from wanalpha.checkpoints.provenance import write_provenance

    clip_weights = {}
    if clip_folder is not None:
        from wanalpha.checkpoints.clip import WEIGHTS

        clip_weights = {"clip": next(clip_folder / w for w in WEIGHTS if (clip_folder / w).is_file())}
    write_provenance(out, "eval", clip_weights, extra={"runs": [str(f) for f in folders]})
    Console(highlight=False).print(summary_table(results, means, comparison))
    Console(highlight=False).print(
        f"eval: {sum(len(r.clips) for r in results)} clip(s) of {len(results)} run(s); report: {page}"
    )
    return report
