"""`wanalpha prepare` as a real subprocess on synthetic source trees: every case of issue 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import yaml

from conftest import read_metadata, run_cli, write_clip
from wanalpha.data.files import atomic_write_text
from wanalpha.data.video import read_video, write_video


def test_synthetic_then_prepare_seed_guide_command(tmp_path: Path) -> None:
    synthetic = [
        "prepare",
        "--synthetic",
        "3",
        "--output_dir",
        "dataset_30FPS",
        "--num_frames",
        "9",
        "--width",
        "48",
        "--height",
        "32",
    ]
    run_cli(*synthetic, cwd=tmp_path)
    raw = tmp_path / "dataset_30FPS"
    for name in ("001", "002", "003"):
        assert (raw / f"{name}.mp4").is_file() and (raw / f"{name}_seg.mp4").is_file()
        assert "transparent background" in (raw / f"{name}.txt").read_text(encoding="utf-8")
    # A rerun with the same settings leaves the clips untouched.
    mtimes = {p.name: p.stat().st_mtime_ns for p in raw.glob("*.mp4")}
    run_cli(*synthetic, cwd=tmp_path)
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in raw.glob("*.mp4")}
    # The seed guide's Step 1, verbatim (with `wanalpha prepare` in place of the script).
    proc = run_cli("prepare", "--source_dir", "dataset_30FPS", "--output_dir", "data/rgba_videos", cwd=tmp_path)
    out = tmp_path / "data/rgba_videos"
    rows = read_metadata(out / "metadata.csv")
    assert [r["video"] for r in rows] == ["001", "002", "003"]
    assert list(rows[0]) == ["video", "prompt", "num_frames", "fps", "width", "height"]
    for row in rows:
        assert (row["num_frames"], row["width"], row["height"], float(row["fps"])) == ("9", "48", "32", 16.0)
        assert row["prompt"] == (raw / f"{row['video']}.txt").read_text(encoding="utf-8").strip()
        assert (out / f"{row['video']}_rgb.mp4").read_bytes() == (raw / f"{row['video']}.mp4").read_bytes()
        assert (out / f"{row['video']}_alpha.mp4").read_bytes() == (raw / f"{row['video']}_seg.mp4").read_bytes()
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["source_dir"] == "dataset_30FPS" and cfg["link"] == "copy"
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["command"] == "prepare" and prov["kept"] == ["001", "002", "003"]
    assert "kept" in proc.stdout and "3" in proc.stdout
    # No temporary files are left behind.
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_skip_reasons(source: Path, tmp_path: Path) -> None:
    write_clip(source, "001")
    write_clip(source, "002")
    (source / "002_seg.mp4").unlink()  # missing alpha partner
    write_clip(source, "003")
    (source / "003.mp4").unlink()  # orphan alpha
    write_clip(source, "004", caption=None)  # missing caption
    write_clip(source, "005", caption="  \n ")  # empty caption
    write_clip(source, "006")
    (source / "006.mp4").write_bytes(os.urandom(2048))  # corrupt mp4
    write_clip(source, "007", alpha_frames=9)  # frame count mismatch
    write_clip(source, "008", alpha_size=(48, 32))  # size mismatch
    write_clip(source, "009", alpha_fps=25.0)  # fps mismatch
    proc = run_cli("prepare", "--source-dir", source, "--output-dir", tmp_path / "out")
    rows = read_metadata(tmp_path / "out/metadata.csv")
    assert [r["video"] for r in rows] == ["001"]
    err = proc.stderr
    for name, reason in [
        ("002", "missing alpha video"),
        ("003", "missing RGB video"),
        ("004", "missing caption"),
        ("005", "empty caption"),
        ("006", "undecodable RGB video"),
        ("007", "frame count mismatch (RGB 5, alpha 9)"),
        ("008", "size mismatch (RGB 32x32, alpha 48x32)"),
        ("009", "fps mismatch (RGB 16, alpha 25)"),
    ]:
        assert f"skipped {name}: {reason}" in err, (name, err)
        assert not (tmp_path / f"out/{name}_rgb.mp4").exists()
    # The summary table counts skips by reason.
    assert "skipped: frame count mismatch" in proc.stdout
    prov = json.loads((tmp_path / "out/provenance.json").read_text())
    assert len(prov["skipped"]) == 8


def test_default_caption_fills_missing_and_empty(source: Path, tmp_path: Path) -> None:
    write_clip(source, "001", caption=None)
    write_clip(source, "002", caption="   ")
    run_cli(
        "prepare",
        "--source_dir",
        source,
        "--output_dir",
        tmp_path / "out",
        "--default_caption",
        "a transparent thing",
    )
    rows = read_metadata(tmp_path / "out/metadata.csv")
    assert [(r["video"], r["prompt"]) for r in rows] == [
        ("001", "a transparent thing"),
        ("002", "a transparent thing"),
    ]


def test_spaces_unicode_and_recursive(source: Path, tmp_path: Path) -> None:
    caption = '一只红色的猫 — «café» naïve,\n"quoted", emoji 🦊'
    write_clip(source, "my clip 01", caption=f"\n  {caption}  \t\n")
    nested = source / "sub dir" / "deeper"
    nested.mkdir(parents=True)
    write_clip(nested, "002", caption="nested clip")
    # Without --recursive the nested clip is not seen.
    run_cli("prepare", "--source_dir", source, "--output_dir", tmp_path / "flat")
    assert [r["video"] for r in read_metadata(tmp_path / "flat/metadata.csv")] == ["my clip 01"]
    run_cli("prepare", "--source_dir", source, "--output_dir", tmp_path / "out", "--recursive")
    rows = read_metadata(tmp_path / "out/metadata.csv")
    assert [(r["video"], r["prompt"]) for r in rows] == [
        ("my clip 01", caption),
        ("sub dir/deeper/002", "nested clip"),
    ]
    assert (tmp_path / "out/my clip 01_rgb.mp4").is_file()
    assert (tmp_path / "out/sub dir/deeper/002_alpha.mp4").is_file()


def test_rerun_is_idempotent(source: Path, tmp_path: Path) -> None:
    write_clip(source, "001")
    write_clip(source, "002", seed=1)
    out = tmp_path / "out"
    run_cli("prepare", "--source_dir", source, "--output_dir", out)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.name != "provenance.json"}
    proc = run_cli("prepare", "--source_dir", source, "--output_dir", out)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.name != "provenance.json"}
    assert before == after  # nothing touched, metadata.csv and config.yaml identical
    assert "already in place" in proc.stdout
    # A changed source clip is written again; the others stay untouched.
    write_clip(source, "002", seed=5)
    run_cli("prepare", "--source_dir", source, "--output_dir", out)
    assert (out / "002_rgb.mp4").read_bytes() == (source / "002.mp4").read_bytes()
    assert (out / "001_rgb.mp4").stat().st_mtime_ns == before["001_rgb.mp4"][0]


def test_strict_fails_and_writes_nothing(source: Path, tmp_path: Path) -> None:
    write_clip(source, "001")
    write_clip(source, "002", caption=None)
    proc = run_cli("prepare", "--source_dir", source, "--output_dir", tmp_path / "out", "--strict", check=1)
    assert "--strict" in proc.stderr and "002" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_empty_and_missing_source(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = run_cli("prepare", "--source_dir", tmp_path / "empty", "--output_dir", tmp_path / "out", check=1)
    assert "no clips found" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("prepare", "--source_dir", tmp_path / "nope", "--output_dir", tmp_path / "out", check=1)
    assert "does not exist" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    # Clips exist but none is usable.
    (tmp_path / "bad").mkdir()
    write_clip(tmp_path / "bad", "001", caption=None)
    proc = run_cli("prepare", "--source_dir", tmp_path / "bad", "--output_dir", tmp_path / "out", check=1)
    assert "no usable clips" in proc.stderr and "missing caption" in proc.stderr


def test_link_modes(source: Path, tmp_path: Path) -> None:
    write_clip(source, "001")
    run_cli("prepare", "--source_dir", source, "--output_dir", tmp_path / "hard", "--link", "hardlink")
    assert (tmp_path / "hard/001_rgb.mp4").stat().st_ino == (source / "001.mp4").stat().st_ino
    run_cli("prepare", "--source_dir", source, "--output_dir", tmp_path / "sym", "--link", "symlink")
    link = tmp_path / "sym/001_alpha.mp4"
    assert link.is_symlink() and link.resolve() == (source / "001_seg.mp4").resolve()
    # Switching mode on a rerun replaces the links with copies.
    run_cli("prepare", "--source_dir", source, "--output_dir", tmp_path / "sym", "--link", "copy")
    assert not link.is_symlink() and link.read_bytes() == (source / "001_seg.mp4").read_bytes()


def test_official_csv_layout(tmp_path: Path) -> None:
    (tmp_path / "fgr").mkdir()
    (tmp_path / "pha").mkdir()
    write_clip(tmp_path / "fgr", "a1", caption=None)
    os.replace(tmp_path / "fgr/a1_seg.mp4", tmp_path / "pha/a1.mp4")
    write_clip(tmp_path / "fgr", "b2", caption=None, seed=3)
    os.replace(tmp_path / "fgr/b2_seg.mp4", tmp_path / "pha/b2.mp4")
    atomic_write_text(
        tmp_path / "data.csv",
        "video_fgr,video_pha,prompt,frame_height,frame_width\n"
        'fgr/a1.mp4,pha/a1.mp4,"a fox, running",4,4\n'
        "fgr/b2.mp4,pha/missing.mp4,a cat,4,4\n",
    )
    proc = run_cli("prepare", "--source_csv", tmp_path / "data.csv", "--output_dir", tmp_path / "out")
    rows = read_metadata(tmp_path / "out/metadata.csv")
    assert [(r["video"], r["prompt"]) for r in rows] == [("a1", "a fox, running")]
    assert "skipped b2: missing alpha video (pha/missing.mp4)" in proc.stderr
    atomic_write_text(tmp_path / "bad.csv", "video,prompt\nx.mp4,y\n")
    proc = run_cli("prepare", "--source_csv", tmp_path / "bad.csv", "--output_dir", tmp_path / "o2", check=1)
    assert "missing column(s) video_fgr, video_pha" in proc.stderr


def test_coloured_alpha_warns(source: Path, tmp_path: Path) -> None:
    write_clip(source, "001")
    rgb, fps = read_video(source / "001.mp4")
    write_video(source / "001_seg.mp4", rgb, fps)  # a colour video as "alpha"
    proc = run_cli("prepare", "--source_dir", source, "--output_dir", tmp_path / "out")
    assert "not greyscale" in proc.stderr
    assert [r["video"] for r in read_metadata(tmp_path / "out/metadata.csv")] == ["001"]


def test_synthetic_clips_are_grey_alpha_and_reproducible(tmp_path: Path) -> None:
    from wanalpha.data.synthetic import make_clip

    a = make_clip(np.random.default_rng([0, 7]), 9, 64, 48)
    b = make_clip(np.random.default_rng([0, 7]), 9, 64, 48)
    assert np.array_equal(a.rgb, b.rgb) and np.array_equal(a.alpha, b.alpha) and a.caption == b.caption
    assert a.rgb.shape == (9, 48, 64, 3) and a.alpha.shape == (9, 48, 64)
    # Across clips: hard edges (only 0/255), feathered edges and semi-transparent areas all occur.
    kinds = set()
    for i in range(12):
        clip = make_clip(np.random.default_rng([0, i]), 5, 64, 64)
        partial = ((clip.alpha > 0) & (clip.alpha < 255)).mean()
        kinds.add("hard" if partial == 0 else "partial")
        kinds.add("opaque" if (clip.alpha == 255).any() else "translucent-only")
        assert "transparent background" in clip.caption
        assert clip.alpha[0].max() > 0 and clip.alpha[0].min() == 0  # an object on an empty background
        # The straight colour extends over the whole frame: no black background mixed in.
        assert clip.rgb.reshape(-1, 3).max(axis=1).min() > 30
    assert {"hard", "partial", "opaque", "translucent-only"} <= kinds
