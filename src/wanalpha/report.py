"""The HTML page of `wanalpha eval`: one self-contained file (every image embedded as a data URI, no script, no
server) filled into the one template wanalpha/report.html.

Sections: the runs and their settings; with several runs, the comparison (each metric's value per run, its difference
from the first run and the winner); tables per category; plots (matplotlib); per prompt, each run's strip of frames
over a checkerboard, over black, over white, and the alpha, with the clip's metrics; what each metric means.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from importlib import resources
from pathlib import Path
from string import Template

import cv2
import numpy as np

from wanalpha import __version__, quality
from wanalpha.data.files import atomic_write_text

THUMB_HEIGHT = 112  # pixels of a strip's frame
KEY_METRICS = ("background_haze", "clean_frames", "alpha_flicker", "edge_soft", "clip_score")  # the plots
STRIP_ROWS = (*quality.BACKGROUNDS, "alpha")


def clip_strips(rgb: np.ndarray, alpha: np.ndarray, frames: int) -> dict[str, bytes]:
    """JPEG strips of `frames` evenly spaced frames, one per row of STRIP_ROWS (composites and the alpha)."""
    chosen = quality.sample_frames(frames, len(rgb))
    h, w = rgb.shape[1:3]
    size = (max(1, round(w * THUMB_HEIGHT / h)), THUMB_HEIGHT) if h > THUMB_HEIGHT else (w, h)
    strips = {}
    for row in STRIP_ROWS:
        if row == "alpha":
            images = np.repeat(alpha[chosen][..., None], 3, axis=-1)
        else:
            images = quality.composite(rgb[chosen], alpha[chosen], row)
        tiles = [cv2.resize(image, size, interpolation=cv2.INTER_AREA) for image in images]
        gap = np.full((size[1], 2, 3), 255, np.uint8)
        strip = np.concatenate([part for tile in tiles for part in (tile, gap)][:-1], axis=1)
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(strip, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 88])
        strips[row] = jpeg.tobytes()
    return strips


def _data_uri(data: bytes, kind: str) -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}g}"


def _better(metric: str) -> str | None:
    from wanalpha.eval import better

    return better(metric)


def _arrow(metric: str) -> str:
    return {"lower": " ↓", "higher": " ↑"}.get(_better(metric) or "", "")


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _shown_metrics(means: dict[str, float]) -> list[str]:
    return [m for m in means if not m.startswith("clip_score_")]


def runs_section(results, means) -> str:
    rows = []
    for r in results:
        settings = ", ".join(f"{k}={v}" for k, v in r.settings.items() if v not in (None, [], ""))
        rows.append([html.escape(r.name), html.escape(str(r.folder)), str(len(r.clips)), html.escape(settings)])
    return _table(["run", "folder", "clips", "settings"], rows, "runs")


def comparison_section(results, comparison: dict) -> str:
    if len(results) < 2:
        return "<p>One run: nothing to compare (give several RUN folders to compare them side by side).</p>"
    names = [r.name for r in results]
    header = ["metric"] + [html.escape(n) for n in names] + [f"Δ {html.escape(n)}" for n in names[1:]] + ["winner"]
    rows, wins = [], dict.fromkeys(names, 0)
    for metric, entry in comparison.items():
        if metric.startswith("clip_score_"):
            continue
        winner = entry["winner"]
        if winner in wins:
            wins[winner] += 1
        cells = [f'<span class="{"win" if n == winner else ""}">{_fmt(entry["values"][n])}</span>' for n in names]
        deltas = []
        for n in names[1:]:
            d = entry["difference"][n]
            good = not math.isnan(d) and d != 0 and (d < 0) == (entry["better"] == "lower")
            deltas.append(
                f'<span class="{"good" if good else "bad" if d and not math.isnan(d) else ""}">'
                f"{'+' if d > 0 else ''}{_fmt(d, 3)}</span>"
            )
        rows.append([metric + _arrow(metric), *cells, *deltas, html.escape(str(winner or "–"))])
    tally = ", ".join(f"{html.escape(n)}: {w}" for n, w in wins.items())
    return (
        f"<p>Baseline: <b>{html.escape(names[0])}</b>; Δ = run − baseline, green where the run is better. "
        f"Metrics won: {tally}.</p>" + _table(header, rows, "compare")
    )


def categories_section(results) -> str:
    from wanalpha.eval import by_category

    parts = []
    categories = list(dict.fromkeys(c.category for r in results for c in r.clips))
    for category in categories:
        per_run = {r.name: by_category([c for c in r.clips if c.category == category]).get(category) for r in results}
        present = {n: m for n, m in per_run.items() if m}
        metrics = _shown_metrics(next(iter(present.values())))
        rows = []
        for metric in metrics:
            values = {n: m[metric] for n, m in present.items()}
            finite = {n: v for n, v in values.items() if not math.isnan(v)}
            direction = _better(metric)
            best = None
            if len(finite) > 1 and direction:
                best = (min if direction == "lower" else max)(finite, key=finite.get)
            rows.append(
                [metric + _arrow(metric)]
                + [f'<span class="{"win" if n == best else ""}">{_fmt(v)}</span>' for n, v in values.items()]
            )
        count = max(len([c for c in r.clips if c.category == category]) for r in results)
        parts.append(
            f'<div class="category"><h3>{html.escape(category)} <small>({count} prompt'
            f"{'s' if count != 1 else ''})</small></h3>"
            + _table(["metric", *map(html.escape, present)], rows, "category")
            + "</div>"
        )
    return '<div class="categories">' + "\n".join(parts) + "</div>"


def plots(results) -> list[tuple[str, bytes]]:
    """(title, PNG) of each plot: the key metrics by category, runs side by side; and each clip's haze against its
    flicker."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from wanalpha.eval import by_category

    out = []
    categories = list(dict.fromkeys(c.category for r in results for c in r.clips))
    metrics = [m for m in KEY_METRICS if any(m in c.metrics for r in results for c in r.clips)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.4), squeeze=False)
    width = 0.8 / len(results)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for i, r in enumerate(results):
            cats = by_category(r.clips)
            values = [cats.get(c, {}).get(metric, math.nan) for c in categories]
            ax.bar(np.arange(len(categories)) + i * width, values, width, label=r.name)
        ax.set_title(metric + _arrow(metric), fontsize=9)
        ax.set_xticks(
            np.arange(len(categories)) + width * (len(results) - 1) / 2, categories, rotation=60, ha="right", fontsize=7
        )
        ax.tick_params(axis="y", labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out.append(("Key metrics by category (mean over the category's clips)", _png(fig, plt)))

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for r in results:
        ax.scatter(
            [c.metrics["background_haze"] for c in r.clips],
            [c.metrics["alpha_flicker"] for c in r.clips],
            label=r.name,
            alpha=0.7,
            s=18,
        )
    ax.set_xlabel("background_haze ↓", fontsize=8)
    ax.set_ylabel("alpha_flicker ↓", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.append(("Each clip: background haze against alpha flicker (best: bottom left)", _png(fig, plt)))
    return out


def _png(fig, plt) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def clips_section(results) -> str:
    """Per prompt (in the first run's order, then prompts only later runs have): each run's strips and metrics."""
    prompts = list(dict.fromkeys(c.prompt for r in results for c in r.clips))
    parts = []
    for number, prompt in enumerate(prompts):
        entries = [(r, c) for r in results for c in r.clips if c.prompt == prompt]
        category = entries[0][1].category
        blocks = []
        for r, c in entries:
            rows = "".join(
                f'<div class="row"><span class="label">{row}</span>'
                f'<img alt="{html.escape(r.name)} {row}" src="{_data_uri(c.strips[row], "jpeg")}"></div>'
                for row in STRIP_ROWS
            )
            shown = {k: v for k, v in c.metrics.items() if not k.startswith("clip_score_")}
            flags = [k for k in ("empty", "opaque") if shown.get(k)]
            badge = "".join(f'<span class="flag">{f}</span>' for f in flags)
            values = " · ".join(f"{k} {_fmt(v, 3)}" for k, v in shown.items() if k not in ("empty", "opaque"))
            blocks.append(
                f'<div class="clip"><div class="run">{html.escape(r.name)} — {html.escape(c.stem)}, seed '
                f"{c.seed}, {c.frames}×{c.size[0]}×{c.size[1]} {badge}</div>{rows}"
                f'<div class="values">{values}</div></div>'
            )
        parts.append(
            f'<section class="prompt" id="prompt-{number}"><h3>{number + 1}. '
            f'<span class="cat">{html.escape(category)}</span> {html.escape(prompt)}</h3>'
            + "".join(blocks)
            + "</section>"
        )
    return "\n".join(parts)


def metrics_doc() -> str:
    rows = [[name + _arrow(name), html.escape(meaning)] for name, (_, meaning) in quality.METRICS.items()]
    return _table(["metric", "meaning (formulas: docs/eval.md)"], rows, "doc")


def write_report(path: Path, results, means: dict, comparison: dict, cfg) -> Path:
    """Fill the template with every section and write it (atomically); returns the path."""
    template = Template((resources.files("wanalpha") / "report.html").read_text(encoding="utf-8"))
    figures = "\n".join(
        f'<figure><img alt="{html.escape(t)}" src="{_data_uri(png, "png")}">'
        f"<figcaption>{html.escape(t)}</figcaption></figure>"
        for t, png in plots(results)
    )
    made = f"{time.strftime('%Y-%m-%d %H:%M')} by wanalpha {__version__}; CLIP score: "
    made += str(cfg.clip_model) if cfg.clip else "off (--no-clip)"
    page = template.substitute(
        title=html.escape("wanalpha eval: " + ", ".join(r.name for r in results)),
        generated=html.escape(made),
        runs=runs_section(results, means),
        comparison=comparison_section(results, comparison),
        categories=categories_section(results),
        plots=figures,
        clips=clips_section(results),
        metrics=metrics_doc(),
    )
    atomic_write_text(path, page)
    return path
