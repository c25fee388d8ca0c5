"""`wanalpha eval`: runs written as `generate` writes them (or generated first with --generate) → metrics.json and a
one-page HTML report that a browser renders with every image."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import run_cli
from test_quality import clean_clip
from tiny_clip import write_tiny_clip
from wanalpha.eval import prompt_set

PROMPTS = [p for _, p in prompt_set("eval")]  # the shipped set: its categories come back in the report
CATEGORIES = {p: c for c, p in prompt_set("eval")}


def write_run(folder: Path, clips: list[tuple[np.ndarray, np.ndarray]], prompts: list[str], steps: int = 50) -> Path:
    """A run folder as generate leaves it: output_000_rgba_frames/, the mp4s, generation.json."""
    from wanalpha.outputs import ClipWriter

    folder.mkdir(parents=True)
    for i, (rgb, alpha) in enumerate(clips):
        with ClipWriter(folder / f"output_{i:03d}", 16, []) as writer:
            writer.add(rgb, alpha)
    record = {
        "config": {"output_prefix": "output", "steps": steps, "sampler": "unipc", "num_frames": len(clips[0][0])},
        "seed": 7,
        "prompts": prompts,
        "seeds": [7] * len(prompts),
        "inputs": {"dora": None},
    }
    (folder / "generation.json").write_text(json.dumps(record))
    return folder


def u8(alpha: np.ndarray) -> np.ndarray:
    return (np.clip(alpha, 0, 1) * 255 + 0.5).astype(np.uint8)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Run 'good' (clean clips) and run 'hazy' (the same clips with background haze and alpha flicker), and a tiny
    CLIP; prompts from three categories of the shipped set."""
    root = tmp_path_factory.mktemp("eval")
    prompts = [PROMPTS[0], PROMPTS[10], PROMPTS[20]]
    clips = [clean_clip(seed=s) for s in range(3)]
    noise = np.random.default_rng(5).random(clips[0][1].shape).astype(np.float32)
    odd = (np.arange(len(noise)) % 2 == 1)[:, None, None]
    good = write_run(root / "good", [(rgb, u8(a)) for rgb, a in clips], prompts)
    hazy = write_run(
        root / "hazy", [(rgb, u8(np.maximum(a * (1 - 0.3 * odd), 0.3 * noise))) for rgb, a in clips], prompts, steps=4
    )
    shutil.rmtree(hazy / "output_002_rgba_frames")  # that clip is read from its mp4s instead
    return good, hazy, write_tiny_clip(root / "clip")


def test_eval_compares_two_runs(two_runs, tmp_path: Path) -> None:
    good, hazy, clip = two_runs
    proc = run_cli(
        "eval", good, hazy, "--out", tmp_path / "report", "--clip-model", clip, "--strip-frames", "3", cwd=tmp_path
    )
    assert "report: " in proc.stdout and str(tmp_path / "report" / "report.html") in proc.stdout.replace("\n", "")
    report = json.loads((tmp_path / "report/metrics.json").read_text())
    assert list(report["runs"]) == ["good", "hazy"] and report["baseline"] == "good"
    clips = report["runs"]["good"]["clips"]
    assert [c["category"] for c in clips] == [CATEGORIES[c["prompt"]] for c in clips]
    assert set(report["runs"]["good"]["categories"]) == {c["category"] for c in clips}
    assert report["runs"]["hazy"]["settings"]["steps"] == 4
    good_mean, hazy_mean = report["runs"]["good"]["mean"], report["runs"]["hazy"]["mean"]
    assert good_mean["background_haze"] == 0 and hazy_mean["background_haze"] > 0.5
    assert hazy_mean["alpha_flicker"] > good_mean["alpha_flicker"] + 0.05
    assert all(-100 <= m["clip_score"] <= 100 for m in (good_mean, hazy_mean))
    compare = report["comparison"]
    for metric in ("background_haze", "haze_level", "clean_frames", "alpha_flicker", "alpha_temporal_flickering"):
        assert compare[metric]["winner"] == "good", metric
    assert compare["background_haze"]["difference"]["hazy"] == pytest.approx(hazy_mean["background_haze"])
    assert "coverage" not in compare  # descriptive values have no winner
    page = (tmp_path / "report/report.html").read_text()
    assert all(p.replace("'", "&#x27;") in page for p in (c["prompt"] for c in clips))
    assert page.count("<img") == 2 * 3 * 4 + 2  # 2 runs × 3 clips × 4 strips, 2 plots
    assert not re.search(r'src="(?!data:)', page)  # every image embedded: the page works opened from disk
    assert yaml.safe_load((tmp_path / "report/config.yaml").read_text())["strip_frames"] == 3
    assert json.loads((tmp_path / "report/provenance.json").read_text())["command"] == "eval"


def test_eval_errors_are_one_line(two_runs, tmp_path: Path) -> None:
    from wanalpha import eval as workflow
    from wanalpha.config import EvalConfig
    from wanalpha.errors import WanAlphaError

    good, _, _ = two_runs
    (tmp_path / "empty").mkdir()
    for args, text, code in (([tmp_path / "empty"], "has no generation.json", 1), ([], "nothing to score", 2)):
        proc = run_cli("eval", *args, "--out", tmp_path / "r", cwd=tmp_path, check=code)  # 2: a config error
        assert text in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for values, text in (
        ({"runs": [tmp_path / "missing"]}, "does not exist"),
        ({"runs": [good], "prompts": str(tmp_path / "nope.csv"), "clip": False}, "--prompts"),
        ({"runs": [good], "clip_model": "not-a-model"}, "neither a folder nor a hub id"),
        ({"generate": [tmp_path / "g.yaml"], "categories": ["lava"]}, "'lava' is not in the prompt set"),
    ):
        (tmp_path / "g.yaml").write_text("steps: 1\n")
        with pytest.raises(WanAlphaError, match=re.escape(text)):
            workflow.run(EvalConfig(out=tmp_path / "r", **values))


def test_eval_generates_first(tmp_path: Path, tiny_stage2, two_runs) -> None:
    """--generate CONFIG: generate runs on the chosen prompts of the set, then eval scores the result; a second
    eval keeps the clips already generated."""
    from wanalpha import eval as workflow
    from wanalpha.config import EvalConfig

    config = {
        "dit_path": str(tiny_stage2["dit"]),
        "t5_path": str(tiny_stage2["t5"]),
        "base_vae_path": str(tiny_stage2["vae"]),
        "vae_lora_path": str(tiny_stage2["lora"]),
        "height": 32,
        "width": 48,
        "num_frames": 5,
        "steps": 1,
        "formats": [],
        "seed": 3,
        "prompt": "replaced",
    }
    (tmp_path / "fast.yaml").write_text(yaml.safe_dump(config))
    cfg = EvalConfig(
        generate=[tmp_path / "fast.yaml"], out=tmp_path / "report", categories=["glass"], limit=2, clip=False
    )
    report = workflow.run(cfg)
    clips = report["runs"]["fast"]["clips"]
    assert [c["category"] for c in clips] == ["glass", "glass"] and clips[0]["frames"] == 5
    assert (tmp_path / "report/runs/fast/output_001_rgba_frames/00004.png").is_file()
    stamp = (tmp_path / "report/runs/fast/generation.json").stat().st_mtime_ns
    workflow.run(cfg)
    assert (tmp_path / "report/runs/fast/generation.json").stat().st_mtime_ns == stamp


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package 'chromium')")
def test_report_renders_in_a_browser(two_runs, tmp_path: Path) -> None:
    """Headless Chromium opens report.html from disk: every image decodes (checked by a script added to a copy of
    the page), no console error is logged, and a screenshot is taken (in the test's temp folder)."""
    good, hazy, clip = two_runs
    run_cli("eval", good, hazy, "--out", tmp_path / "report", "--clip-model", clip, cwd=tmp_path)
    page = (tmp_path / "report/report.html").read_text()
    check = (
        "<pre id='check'>pending</pre><script>window.addEventListener('load', () => {"
        "const imgs = Array.from(document.images);"
        "const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;"
        "document.getElementById('check').textContent = ok + '/' + imgs.length;});</script>"
    )
    (tmp_path / "report/checked.html").write_text(page.replace("</body>", check + "</body>"))
    common = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--allow-file-access-from-files",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
    ]
    checked = f"file://{tmp_path / 'report/checked.html'}"
    proc = subprocess.run(
        [*common, "--enable-logging=stderr", "--v=0", "--dump-dom", checked],
        capture_output=True,
        text=True,
        timeout=120,
    )
    loaded = proc.stdout.split('<pre id="check">')[1].split("<")[0]
    assert loaded == "26/26", loaded
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    shot = tmp_path / "report.png"
    page_url = f"file://{tmp_path / 'report/report.html'}"
    subprocess.run(
        [*common, "--window-size=1400,2000", f"--screenshot={shot}", page_url], capture_output=True, timeout=120
    )
    assert shot.is_file() and shot.stat().st_size > 10_000
