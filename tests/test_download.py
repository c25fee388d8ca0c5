"""Hub downloads against a local stand-in for the Hub (tests/hub_server.py), never the network: the seed guide's
Step-4 `--model_id_with_origin_paths` (patterns + the UMT5 tokenizer), `wanalpha download` (layout, dry run, skip,
interrupted transfer → no partial file, resume), offline errors, and the VGG16 weights of the perceptual term."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.filesize import decimal
from safetensors.torch import save_file

from conftest import WANALPHA, run_cli
from hub_server import HubServer
from wanalpha.download import CATALOGUE, vgg16_weights
from wanalpha.errors import WanAlphaError
from wanalpha.losses import VGG16Features
from wanalpha.models.dit import DIT_VARIANTS
from wanalpha.train_merge import load_vgg

WAN = "Wan-AI/Wan2.1-T2V-14B"
# The seed guide's Step 4, verbatim.
STEP4 = f"{WAN}:diffusion_pytorch_model*.safetensors,{WAN}:models_t5_umt5-xxl-enc-bf16.pth,{WAN}:Wan2.1_VAE.pth"
FLAGS = ["--height", "32", "--width", "48", "--num_frames", "9", "--steps", "4", "--formats", "apng"]
LIGHTX2V = CATALOGUE["lightx2v"].sources[0]


@pytest.fixture
def hub(tmp_path: Path, monkeypatch):
    """The local hub, and this process's environment (which run_cli passes on) pointed at it."""
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no token, no cache of the user's
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no torchvision VGG16 of the machine's
        for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        yield server


@pytest.fixture(scope="module")
def wan_repo(tiny_stage2) -> dict[str, bytes]:
    """A tiny model in the layout of the Wan-AI/Wan2.1-T2V-14B repository, plus files no pattern asks for."""
    folder = Path(tiny_stage2["dit"])
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    files["Wan2.1_VAE.pth"] = Path(tiny_stage2["vae"]).read_bytes()
    config = DIT_VARIANTS["tiny"]
    fields = ("dim", "ffn_dim", "num_heads", "num_layers", "text_len", "freq_dim", "in_dim", "out_dim", "eps")
    files["config.json"] = json.dumps({k: getattr(config, k) for k in fields}).encode()
    files["README.md"] = b"# Wan2.1"
    files["assets/teaser.png"] = b"\x89PNG not fetched"
    return files


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# -------------------------------------------------------------------------------- --model_id_with_origin_paths


def test_step4_hub_ids_fetch_the_patterns_and_the_tokenizer(tmp_path: Path, hub, wan_repo, tiny_stage2) -> None:
    hub.add(WAN, wan_repo)
    models = tmp_path / "models"
    run_cli(
        "generate",
        "--prompt",
        "a red circle moving left, transparent background",
        "--model_id_with_origin_paths",
        STEP4,
        "--models_dir",
        models,
        "--vae_lora_path",
        tiny_stage2["lora"],
        *FLAGS,
        "--output_dir",
        tmp_path / "out",
        cwd=tmp_path,
    )
    assert (tmp_path / "out/output_rgb.mp4").is_file()
    local = models / WAN
    shards = {p for p in wan_repo if p.startswith("diffusion_pytorch_model-")}
    # The three patterns and the tokenizer folder the text encoder needs; nothing else of the repository.
    tokenizer = "google/umt5-xxl/tokenizer.json"
    assert _files(local) == shards | {"models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", tokenizer}
    assert all((local / p).read_bytes() == wan_repo[p] for p in _files(local))

    # The case: the three patterns on disk, the tokenizer not: only the tokenizer is fetched.
    for p in (local / "google/umt5-xxl").iterdir():
        p.unlink()
    before = len(hub.requests)
    script = (
        "import sys; from wanalpha.checkpoints.wan import resolve_model_files; "
        "files = resolve_model_files(sys.argv[1], sys.argv[2]); print(sorted(files))"
    )
    proc = subprocess.run([sys.executable, "-c", script, STEP4, str(models)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    fetched = [p for m, p, _ in hub.requests[before:] if m == "GET" and "/resolve/" in p]
    assert fetched == [f"/{WAN}/resolve/{hub.commits[WAN]}/google/umt5-xxl/tokenizer.json"]
    assert "google/umt5-xxl/*" in proc.stdout

    # Everything on disk: no network at all, even offline.
    before = len(hub.requests)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script, STEP4, str(models)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(hub.requests) == before


def test_hub_id_errors_are_one_line(tmp_path: Path, hub, wan_repo, monkeypatch) -> None:
    hub.add(WAN, wan_repo)
    common = ["generate", "--prompt", "x", "--models_dir", tmp_path / "models", *FLAGS]
    proc = run_cli(*common, "--model_id_with_origin_paths", f"{WAN}:nothing_like_this.pth", cwd=tmp_path, check=1)
    assert "has no file matching nothing_like_this.pth" in _one_line(proc)
    proc = run_cli(*common, "--model_id_with_origin_paths", "someone/missing:x.pth", cwd=tmp_path, check=1)
    assert "someone/missing not found" in _one_line(proc)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = run_cli(*common, "--model_id_with_origin_paths", STEP4, cwd=tmp_path, check=1)
    line = _one_line(proc)
    assert f"diffusion_pytorch_model*.safetensors of {WAN} not found" in line and "HF_HUB_OFFLINE" in line


# -------------------------------------------------------------------------------- wanalpha download


def test_download_dry_run_fetch_skip_then_generate_finds_everything(
    tmp_path: Path, hub, wan_repo, tiny_stage2, reference: Path
) -> None:
    hub.add(WAN, wan_repo)
    alpha = {
        "decoder.bin": Path(tiny_stage2["lora"]).read_bytes(),
        "epoch-13-1500.safetensors": (reference / "golden/dora_synthetic.safetensors").read_bytes(),
    }
    hub.add("htdong/Wan-Alpha", alpha)
    root = tmp_path / "project"
    names = ["download", "wan2.1-t2v-14b", "wan-alpha-v1", "--root", root]

    proc = run_cli(*names, "--dry-run")
    assert not root.exists()  # nothing written
    for rel, size in (
        ("Wan-Alpha/vae/decoder.bin", len(alpha["decoder.bin"])),
        ("models/Wan-AI/Wan2.1-T2V-14B/Wan2.1_VAE.pth", len(wan_repo["Wan2.1_VAE.pth"])),
        (
            "models/Wan-AI/Wan2.1-T2V-14B/google/umt5-xxl/tokenizer.json",
            len(wan_repo["google/umt5-xxl/tokenizer.json"]),
        ),
    ):
        row = next(line for line in proc.stdout.splitlines() if str(root / rel) in line)
        assert decimal(size) in row and "to fetch" in row
    assert not any(m == "GET" and "/resolve/" in p for m, p, _ in hub.requests)

    run_cli(*names)
    wanted = {f"models/{WAN}/{p}" for p in wan_repo if p not in ("README.md", "assets/teaser.png")}
    assert _files(root) == wanted | {"Wan-Alpha/vae/decoder.bin", "Wan-Alpha/epoch-13-1500.safetensors"}
    assert (root / "Wan-Alpha/vae/decoder.bin").read_bytes() == alpha["decoder.bin"]
    assert all((root / path).read_bytes() == wan_repo[path.removeprefix(f"models/{WAN}/")] for path in wanted)

    before = len(hub.requests)
    proc = run_cli(*names)
    assert "fetched" not in proc.stdout and "present" in proc.stdout
    assert not [r for r in hub.requests[before:] if "/resolve/" in r[1] or "/api/models/" in r[1]]  # no network

    # generate with no path flags finds the release where the guide (and `download`) put it.
    run_cli(
        "generate",
        "--prompt",
        "a red circle moving left, transparent background",
        *FLAGS,
        "--output_dir",
        "out",
        cwd=root,
    )
    record = json.loads((root / "out/generation.json").read_text())
    assert record["inputs"]["dora"].endswith("Wan-Alpha/epoch-13-1500.safetensors")


def test_generate_names_a_missing_tokenizer(tmp_path: Path, tiny_stage2) -> None:
    from wanalpha.config import GenerateConfig
    from wanalpha.generate import resolve_inputs

    cfg = GenerateConfig(
        prompt="x",
        dit_path=tiny_stage2["dit"],
        t5_path=tiny_stage2["t5"],
        base_vae_path=tiny_stage2["vae"],
        vae_lora_path=tiny_stage2["lora"],
    )
    assert resolve_inputs(cfg)["tokenizer"] == Path(tiny_stage2["dit"]) / "google/umt5-xxl"
    for given in (tmp_path / "umt5-xxl", tmp_path / "tokenizer.json"):
        with pytest.raises(WanAlphaError, match="missing the UMT5 tokenizer .* looked for .*tokenizer.json"):
            resolve_inputs(cfg.model_copy(update={"tokenizer_path": given}))


def _interrupt_when(proc: subprocess.Popen, part_glob: tuple[Path, str], size: int) -> str:
    """Ctrl-C the process once a .part matching the glob holds `size` bytes; its stderr."""
    folder, pattern = part_glob
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        parts = list(folder.glob(pattern)) if folder.is_dir() else []
        if parts and parts[0].stat().st_size >= size:
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the transfer never reached the stall point")
    proc.send_signal(signal.SIGINT)  # Ctrl-C mid-transfer
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    return stderr


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a test run in the background inherits SIGINT ignored


def _popen(*args) -> subprocess.Popen:
    command = [WANALPHA] if WANALPHA else [sys.executable, "-m", "wanalpha"]
    return subprocess.Popen(
        [*command, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )  # noqa: PLW1509


def test_interrupted_download_leaves_no_partial_file_and_resumes(tmp_path: Path, hub) -> None:
    data = os.urandom(3_000_000)
    hub.add(LIGHTX2V.repo, {LIGHTX2V.pattern: data, "README.md": b"other files"})
    hub.stall_after[LIGHTX2V.pattern] = 1_000_000
    root = tmp_path / "project"
    dest = root / LIGHTX2V.dest
    _interrupt_when(_popen("download", "lightx2v", "--root", root), (dest.parent, f".{dest.name}.*.part"), 1_000_000)
    assert not dest.exists()  # never a partial file under the final name
    assert [p.stat().st_size for p in dest.parent.glob(f".{dest.name}.*.part")] == [1_000_000]

    proc = run_cli("download", "lightx2v", "--root", root)
    assert "resumed" in proc.stdout
    assert dest.read_bytes() == data
    assert hub.gets(LIGHTX2V.pattern) == [None, "bytes=1000000-"]  # the rerun asked only for the rest
    assert _files(dest.parent) == {dest.name}  # no .part or lock left behind


def test_interrupted_shards_appear_together(tmp_path: Path, hub, wan_repo) -> None:
    """A pattern's files (the DiT shards) are renamed into place together: an interruption during the second shard
    leaves neither under its final name, so the set is never taken for complete; the rerun resumes it."""
    second = "diffusion_pytorch_model-00002-of-00002.safetensors"
    hub.add(WAN, wan_repo)
    hub.stall_after[second] = 1000
    models = tmp_path / "models"
    local = models / WAN
    step4 = ("generate", "--prompt", "x", "--model_id_with_origin_paths", STEP4, "--models_dir", models, *FLAGS)
    _interrupt_when(_popen(*step4), (local, f".{second}.*.part"), 1000)
    assert not list(local.glob("diffusion_pytorch_model-*"))  # the first shard is whole, but not yet in place
    assert len(list(local.glob(".diffusion_pytorch_model-00001-of-00002.safetensors.*.part"))) == 1

    script = "import sys; from wanalpha.checkpoints.wan import resolve_model_files; resolve_model_files(*sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", script, STEP4, str(models)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    shards = sorted(p for p in wan_repo if p.startswith("diffusion_pytorch_model-"))
    assert [(local / p).read_bytes() == wan_repo[p] for p in shards] == [True, True]
    assert hub.gets(second) == [None, "bytes=1000-"] and len(hub.gets(shards[0])) == 1  # resumed, not refetched


def test_download_offline_and_bad_names_are_one_line(tmp_path: Path, hub, monkeypatch) -> None:
    proc = run_cli("download", "wan-alpha-v9", check=2)
    assert "unknown release name 'wan-alpha-v9'" in _one_line(proc) and "wan-alpha-v1" in proc.stderr
    proc = run_cli("download")  # the catalogue
    assert all(name in proc.stdout for name in CATALOGUE)

    with socket.socket() as sock:  # a port nothing listens on: the hub is down
        sock.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", down)
    proc = run_cli("download", "wan-alpha-v1", "--root", tmp_path / "p", check=1)
    assert "cannot reach the hub at " + down in _one_line(proc)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = run_cli("download", "wan-alpha-v1", "--root", tmp_path / "p", check=1)
    assert "HF_HUB_OFFLINE is set" in _one_line(proc)
    proc = run_cli("download", "vgg16", "--root", tmp_path / "p", "--dry-run")  # offline: the catalogue's sizes
    assert "553.0 MB" in proc.stdout and not (tmp_path / "p").exists()


# -------------------------------------------------------------------------------- VGG16 (perceptual term)


def _vgg_trunk(seed: int = 0) -> dict[str, torch.Tensor]:
    """VGG16's first layers under torchvision's (and timm's) names, random values at the real shapes."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"features.{k.removeprefix('model.')}": torch.randn(v.shape, generator=g) * 0.05
        for k, v in VGG16Features().state_dict().items()
    }


def test_vgg_from_a_local_path_torchvision_and_timm_layouts(tmp_path: Path, monkeypatch) -> None:
    trunk = _vgg_trunk()
    torch.save(
        {**trunk, "features.10.weight": torch.zeros(256, 128, 3, 3), "classifier.6.bias": torch.zeros(1000)},
        tmp_path / "vgg16-397923af.pth",
    )
    save_file(
        {**trunk, "pre_logits.fc1.weight": torch.zeros(8, 512, 7, 7), "head.fc.bias": torch.zeros(1000)},
        str(tmp_path / "model.safetensors"),
    )
    expected = {f"model.{k.removeprefix('features.')}": v for k, v in trunk.items()}
    for name in ("vgg16-397923af.pth", "model.safetensors"):
        path = vgg16_weights(tmp_path / name, tmp_path / "models")
        assert path == tmp_path / name
        got = load_vgg(path).state_dict()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    torch.save({**trunk, "features.0.weight": torch.zeros(64, 3, 5, 5)}, tmp_path / "vgg19.pth")
    with pytest.raises(WanAlphaError, match="features.0.weight has shape"):
        load_vgg(tmp_path / "vgg19.pth")
    # Already on disk: the models folder's copy, or torchvision's download cache (what the official code uses).
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = tmp_path / "torch_home/hub/checkpoints/vgg16-397923af.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes((tmp_path / "vgg16-397923af.pth").read_bytes())
    assert vgg16_weights(None, tmp_path / "models") == cached
    in_models = tmp_path / "models/timm/vgg16.tv_in1k/model.safetensors"
    in_models.parent.mkdir(parents=True)
    in_models.write_bytes((tmp_path / "model.safetensors").read_bytes())
    assert vgg16_weights(None, tmp_path / "models") == in_models
    with pytest.raises(WanAlphaError, match="--vgg-path .* does not exist"):
        vgg16_weights(tmp_path / "nope.pth", tmp_path / "models")


def test_train_merge_perceptual_term_fetches_vgg_from_the_hub_and_offline_says_how(
    tmp_path: Path, hub, tiny_vae_files, tiny_dataset: Path, monkeypatch
) -> None:
    blob = tmp_path / "vgg.safetensors"
    save_file({**_vgg_trunk(), "head.fc.bias": torch.zeros(1000)}, str(blob))
    vgg = CATALOGUE["vgg16"].sources[0]
    hub.add(vgg.repo, {vgg.pattern: blob.read_bytes(), "pytorch_model.bin": b"not fetched"})
    common = [
        "train-merge",
        "--dataset_base_path",
        tiny_dataset,
        "--base_vae_path",
        tiny_vae_files[0],
        "--vae_lora_path",
        tiny_vae_files[1],
        "--height",
        "32",
        "--width",
        "48",
        "--num_frames",
        "9",
        "--max_steps",
        "2",
        "--num_workers",
        "0",
    ]
    # The default is the official recipe (weight 1): the weights come from the hub into the models folder.
    run_cli(*common, "--models_dir", tmp_path / "models", "--output_path", tmp_path / "run", cwd=tmp_path)
    assert _files(tmp_path / "models") == {"timm/vgg16.tv_in1k/model.safetensors"}
    with (tmp_path / "run/loss_log.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and float(rows[0]["perceptual_rgb_hard"]) > 0
    assert "vgg16" in json.loads((tmp_path / "run/provenance.json").read_text())["inputs"]  # recorded like any input

    # Offline without the file: one line naming the three ways out.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = run_cli(
        *common, "--models_dir", tmp_path / "empty", "--output_path", tmp_path / "off", cwd=tmp_path, check=1
    )
    line = _one_line(proc)
    assert "--vgg-path" in line and "wanalpha download vgg16" in line and "--perceptual-weight 0" in line
    proc = run_cli(*common, "--vgg_path", tmp_path / "nope.pth", "--output_path", tmp_path / "bad", check=2)
    assert "--vgg-path" in _one_line(proc)


def test_training_commands_find_the_guide_layout_without_path_flags(tmp_path: Path, tiny_stage2, tiny_dataset) -> None:
    """Issue #23 item 6: with the release files where the seed guide (and `wanalpha download`) puts them, the
    training commands need no path flags: train-merge takes the VAE and decoder.bin from there, validate too, and
    train-dit the DiT, the text encoder, the VAE and the newest merge block train-merge wrote."""
    import shutil

    wan = tmp_path / "models/Wan-AI/Wan2.1-T2V-14B"
    shutil.copytree(tiny_stage2["dit"], wan)
    shutil.copy(tiny_stage2["vae"], wan / "Wan2.1_VAE.pth")
    (tmp_path / "Wan-Alpha/vae").mkdir(parents=True)
    shutil.copy(tiny_stage2["lora"], tmp_path / "Wan-Alpha/vae/decoder.bin")
    size = ["--height", "32", "--width", "48", "--num_frames", "5", "--num_workers", "0"]
    run_cli(
        "train-merge",
        "--dataset_base_path",
        tiny_dataset,
        *size,
        "--num_epochs",
        "1",
        "--perceptual_weight",
        "0",
        cwd=tmp_path,
    )
    merge = tmp_path / "models/train/feature_merge/feature_merge_epoch_0.safetensors"
    assert merge.is_file()
    run_cli(
        "validate",
        "--dataset_base_path",
        tiny_dataset,
        "--feature_merge_checkpoint",
        merge,
        "--max_clips",
        "1",
        "--output_prefix",
        tmp_path / "val/v",
        cwd=tmp_path,
    )
    run_cli(
        "train-dit",
        "--dataset_base_path",
        tiny_dataset,
        *size,
        "--max_steps",
        "1",
        "--dora_rank",
        "2",
        "--dit_dtype",
        "fp32",
        cwd=tmp_path,
    )
    provenance = json.loads((tmp_path / "models/train/Wan-Alpha-DiT-DoRA/provenance.json").read_text())
    assert "feature_merge_epoch_0" in json.dumps(provenance) and "Wan2.1-T2V-14B" in json.dumps(provenance)
