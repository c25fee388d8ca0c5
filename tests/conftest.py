"""Shared helpers: run the installed `wanalpha` as a real subprocess, build raw source trees."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # tests/test_kernels.py: Triton's interpreter runs the GPU kernels on the CPU;
    os.environ.setdefault("TRITON_INTERPRET", "1")  # it reads this when Triton is first imported

import cli_runner
from wanalpha.data.files import atomic_write_text
from wanalpha.data.synthetic import make_clip
from wanalpha.data.video import write_video

# `wanalpha` runs forked from a process that imported torch & co. once (POSIX; WANALPHA_TEST_EXEC=1: the console
# script as a plain subprocess every time).
_ZYGOTE = None if os.name != "posix" or os.environ.get("WANALPHA_TEST_EXEC") == "1" else cli_runner.Zygote(os.environ)


@pytest.fixture(scope="session", autouse=True)
def _zygote_ends():
    yield
    if _ZYGOTE is not None:
        _ZYGOTE.close()


TEST_THREADS = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
WANALPHA = shutil.which("wanalpha", path=str(Path(sys.executable).parent)) or shutil.which("wanalpha")


def torchrun_cpu(*args, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`wanalpha ARGS` as 2 ranks on the CPU under torchrun (gloo, one thread each, `env` added); asserts exit 0.
    PYTHONFAULTHANDLER: a rank that aborts prints every thread's Python stack into the failure message (once seen, a
    rank's SIGABRT at its end, "terminate called without an active exception", not reproduced in 30 runs since)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",  # a free port of its own: tests may run side by side
        "-m",
        "wanalpha",
        *map(str, args),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1") | (env or {})
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-8000:]
    return proc


def free_port() -> int:
    """A TCP port nothing listens on now, for a test's own process group (tests may run side by side: pytest -n)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args: str, cwd: Path | None = None, check: int | None = 0) -> subprocess.CompletedProcess:
    """Run `wanalpha ARGS` as a subprocess; assert its exit code (unless check is None)."""
    # The installed console script; where the package is only on PYTHONPATH (the GPU machine), its module form.
    command = [WANALPHA] if WANALPHA else [sys.executable, "-m", "wanalpha"]
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1", WANALPHA_CACHE=str(Path(cwd or ".") / ".wcache"))
    # One thread count for every run of a test (wanalpha would follow the load): CPU float sums depend on it, and
    # tests compare runs bit for bit (a resumed run against an uninterrupted one).
    env.setdefault("WANALPHA_THREADS", str(TEST_THREADS))
    if _ZYGOTE is None:
        command = [*command, *map(str, args)]
        proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    else:  # a fresh process forked from one with the third-party imports done (tests/cli_runner.py)
        proc = _ZYGOTE.run(command[0], list(map(str, args)), str(Path(cwd or ".").resolve()), env, timeout=600)
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
    run_cli(
        "prepare",
        "--synthetic",
        "2",
        "--output_dir",
        root / "raw",
        "--num_frames",
        "9",
        "--width",
        "48",
        "--height",
        "32",
    )
    run_cli("prepare", "--source_dir", root / "raw", "--output_dir", root / "rgba_videos")
    return root / "rgba_videos"


# Caption words of the synthetic clips: the test tokenizer knows them (others become <unk>).
WORDS = """a an the red green blue yellow orange purple cyan magenta white circle square triangle with sharp soft
edges moving left right up down and growing shrinking semi-transparent in front of , transparent background fox
cat""".split()


def write_tiny_stage2_files(folder: Path, seed: int = 0) -> dict[str, Path]:
    """A tiny Wan2.1 model folder: DiT shards (the golden's reduced config), a UMT5 .pth and its tokenizer."""
    import json

    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from wanalpha.models.dit import DIT_VARIANTS, WanDiT
    from wanalpha.models.t5 import T5Config, UMT5Encoder

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    sd = WanDiT(DIT_VARIANTS["tiny"]).state_dict()
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, str(folder / name))
        weight_map |= {k: name for k in part}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    t5 = UMT5Encoder(T5Config(vocab_size=512, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2))
    torch.save({k: v.bfloat16() for k, v in t5.state_dict().items()}, folder / "models_t5_umt5-xxl-enc-bf16.pth")
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    (folder / "google/umt5-xxl").mkdir(parents=True)
    tok.save(str(folder / "google/umt5-xxl/tokenizer.json"))
    return {"dit": folder, "t5": folder / "models_t5_umt5-xxl-enc-bf16.pth"}


@pytest.fixture(scope="session")
def tiny_stage2(tmp_path_factory, tiny_vae_files) -> dict[str, Path]:
    """Tiny Wan2.1 folder + a merge checkpoint for the tiny VAE."""
    import torch

    from wanalpha.checkpoints.vae import save_merge_block
    from wanalpha.models.rgba import FeatureMergeBlock

    folder = tmp_path_factory.mktemp("stage2")
    files = write_tiny_stage2_files(folder / "Wan2.1-T2V-tiny")
    torch.manual_seed(1)
    save_merge_block(FeatureMergeBlock(), folder / "feature_merge_epoch_0.safetensors")
    return files | {
        "merge": folder / "feature_merge_epoch_0.safetensors",
        "vae": tiny_vae_files[0],
        "lora": tiny_vae_files[1],
    }
