"""Shared helpers: run the installed `wanalpha` as a real subprocess, build raw source trees."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wanalpha.data.files import atomic_write_text
from wanalpha.data.synthetic import make_clip
from wanalpha.data.video import write_video

WANALPHA = shutil.which("wanalpha", path=str(Path(sys.executable).parent)) or shutil.which("wanalpha")


def run_cli(*args: str, cwd: Path | None = None, check: int | None = 0) -> subprocess.CompletedProcess:
    """Run `wanalpha ARGS` as a subprocess; assert its exit code (unless check is None)."""
    assert WANALPHA, "the wanalpha executable is not installed (pip install -e .)"
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1", WANALPHA_CACHE=str(Path(cwd or ".") / ".wcache"))
    proc = subprocess.run([WANALPHA, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def write_clip(
    folder: Path,
    name: str,
    caption: str | None = "a red circle moving left, transparent background",
    frames: int = 5,
    size: tuple[int, int] = (32, 32),
    fps: float = 16.0,
    alpha_frames: int | None = None,
    alpha_size: tuple[int, int] | None = None,
    alpha_fps: float | None = None,
    seed: int = 0,
) -> None:
    """A raw clip NAME.mp4 + NAME_seg.mp4 (+ NAME.txt unless caption is None), small and fast to write."""
    width, height = size
    clip = make_clip(np.random.default_rng(seed), frames, width, height)
    write_video(folder / f"{name}.mp4", clip.rgb, fps)
    aw, ah = alpha_size or size
    alpha = make_clip(np.random.default_rng(seed), alpha_frames or frames, aw, ah).alpha
    write_video(folder / f"{name}_seg.mp4", alpha, alpha_fps or fps)
    if caption is not None:
        atomic_write_text(folder / f"{name}.txt", caption)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    folder = tmp_path / "dataset_30FPS"
    folder.mkdir()
    return folder


def read_metadata(path: Path) -> list[dict]:
    import csv

    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)


# ------------------------------------------------------------------------------------------- reference fixtures
# ../shared/reference (beside the checkout) holds the official key layouts, weights.py and the golden tensors.
REFERENCE = Path(os.environ.get("WANALPHA_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "reference"))


def reference_available() -> bool:
    return (REFERENCE / "weights.py").is_file() and (REFERENCE / "golden").is_dir()


@pytest.fixture(scope="session")
def reference() -> Path:
    if not reference_available():
        pytest.skip(f"reference fixtures not found at {REFERENCE} (set WANALPHA_REFERENCE)")
    return REFERENCE


@pytest.fixture(scope="session")
def ref_weights(reference: Path):
    """The reference's weights.py module (deterministic weights from key names)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("reference_weights", reference / "weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def wan_vae_state_dict(reference: Path, ref_weights):
    """Synthetic Wan2.1_VAE.pth contents: the official keys, weights from weights.py (seed 1234)."""
    return ref_weights.make_state_dict(ref_weights.load_shapes_json(reference / "keys_wan21_vae.json"), 1234)


def rel_err(a, b) -> float:
    """max|a-b| / max|b|, the reference's error measure (NOTES §9)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


# ----------------------------------------------------------------------------------------- tiny model files
TINY_DIM = 8  # a Wan-layout VAE 12× narrower than Wan2.1's: same keys but smaller shapes


def write_tiny_vae_files(folder: Path, seed: int = 0, rank: int = 2) -> tuple[Path, Path]:
    """A tiny `Wan2.1_VAE.pth` and a `decoder.bin` in the official formats (LoRA on all 38 decoder convs)."""
    import torch

    from wanalpha.models.vae import VAEConfig, WanVAE

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vae = WanVAE(VAEConfig(dim=TINY_DIM))
    torch.save(vae.state_dict(), folder / "Wan2.1_VAE.pth")
    lora = {}
    g = torch.Generator().manual_seed(seed + 1)
    for side in ("fgr", "pha"):
        for name, module in vae.decoder.named_modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
                is_3d = isinstance(module, torch.nn.Conv3d)
                key = f"vae_{side}.decoder.{name}" + (".conv3D" if is_3d else "")
                a = torch.randn(rank, module.in_channels, *module.kernel_size, generator=g) * 0.05
                b = torch.randn(module.out_channels, rank, *([1] * (3 if is_3d else 2)), generator=g) * 0.05
                lora[f"{key}.lora_A.default.weight"] = a
                lora[f"{key}.lora_B.default.weight"] = b
    torch.save(lora, folder / "decoder.bin")
    return folder / "Wan2.1_VAE.pth", folder / "decoder.bin"


@pytest.fixture(scope="session")
def tiny_vae_files(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_vae_files(tmp_path_factory.mktemp("tiny_vae"))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A prepared dataset of 2 synthetic clips (9 frames, 48×32) made by the real `prepare` commands."""
    root = tmp_path_factory.mktemp("dataset")
    run_cli("prepare", "--synthetic", "2", "--output_dir", root / "raw", "--num_frames", "9", "--width", "48",
            "--height", "32")  # fmt: skip
    run_cli("prepare", "--source_dir", root / "raw", "--output_dir", root / "rgba_videos")
    return root / "rgba_videos"
