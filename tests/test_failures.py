"""Bad input, as a hostile user gives it (issue #24): every failure is one line naming the file or flag and the fix,
exit 1 (cannot proceed) or 2 (bad flag/config), no traceback unless --debug, no file left behind, the input data
unchanged. One table per class; each row runs the real command."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from wanalpha.failures import explain

# ---------------------------------------------------------------------------------------------- the mechanism

OS_CASES = [  # (errno, words the line must hold)
    (errno.ENOENT, "does not exist"),
    (errno.EACCES, "permission denied"),
    (errno.ENOSPC, "disk full"),
    (errno.EISDIR, "is a folder where a file is expected"),
    (errno.ENOTDIR, "a file stands where a folder is expected"),
    (errno.EROFS, "read-only"),
]


@pytest.mark.parametrize(("code", "words"), OS_CASES)
def test_every_os_error_names_its_file(code: int, words: str) -> None:
    line, exit_code = explain(OSError(code, os.strerror(code), "/data/out/001.safetensors"))
    assert exit_code == 1 and words in line and "/data/out/001.safetensors" in line and "\n" not in line


def test_other_failures_are_one_line() -> None:
    from safetensors import SafetensorError

    from wanalpha.errors import WanAlphaError

    for exc, words in (
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "not UTF-8"),
        (json.JSONDecodeError("Expecting value", "{", 1), "JSON file is damaged"),
        (SafetensorError("header too large"), "safetensors file is damaged"),
        (RuntimeError("shape '[4, 3]' is invalid\nmore"), "unexpected error (RuntimeError: shape '[4, 3]'"),
        (ValueError("bad"), "--debug"),
        # A worker's error reaches the main process wrapped in its traceback: its own line is shown.
        (
            WanAlphaError(
                "Caught WanAlphaError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                'last):\n  File "x.py", line 1\nwanalpha.errors.WanAlphaError: shard 002 is damaged'
            ),
            "shard 002 is damaged",
        ),
    ):
        line, code = explain(exc)
        assert code == 1 and words in line and "\n" not in line, line


# ------------------------------------------------------------------------------------------------ the commands


def _one_line(proc, code: int, *words: str, progress: bool = False) -> None:
    """Exit `code`, no traceback, one error line (the last; before it only a progress bar where `progress`)."""
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    # Stage lines ("encoding prompts with UMT5 …": what a run says when nobody watches a terminal) may come first.
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip() and not line.endswith(" …")]
    assert lines and lines[-1].startswith("error: ") and (progress or len(lines) == 1), proc.stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, proc.stderr
    for word in words:
        assert word in lines[-1], (word, lines[-1])


def test_non_finite_and_absurd_values_are_refused_at_the_config(tmp_path: Path) -> None:
    """Class 3 (a hang: the OpenCV writer with fps inf) and class 4 (silent garbage: inf learning rates, nan scales)
    stop at the config, before any work, with the bound in the line; --help states the bounds."""
    prompt = ["generate", "--prompt", "x", "--output-dir", tmp_path / "g"]
    for args, words in (
        (["prepare", "--synthetic", "1", "--output-dir", tmp_path / "p", "--fps", "inf"], ["--fps", "finite"]),
        (["prepare", "--synthetic", "1", "--output-dir", tmp_path / "p", "--seed", "-1"], ["--seed", "greater"]),
        (["prepare", "--synthetic", "1", "--output-dir", tmp_path / "p", "--width", "100000"], ["--width"]),
        ([*prompt, "--seed", str(2**70)], ["--seed"]),
        ([*prompt, "--fps", "inf"], ["--fps", "finite"]),
        ([*prompt, "--dora-scale", "nan"], ["--dora-scale", "finite"]),
        ([*prompt, "--alpha-shift-mean", "inf"], ["--alpha-shift-mean", "finite"]),
        ([*prompt, "--vae-decode-chunk", "0"], ["--vae-decode-chunk", "greater"]),
        (["generate", "--prompt", "  ", "--output-dir", tmp_path / "g"], ["--prompt must not be empty"]),
        (["train-dit", "--cache-dir", tmp_path, "--learning-rate", "nan"], ["--learning-rate", "finite"]),
        (["train-dit", "--cache-dir", tmp_path, "--shift", "inf"], ["--shift", "finite"]),
        (["cache", "--dataset-base-path", tmp_path, "--output-dir", tmp_path / "c", "--seed", "-3"], ["--seed"]),
        (
            ["validate", "--dataset-base-path", tmp_path, "--feature-merge-checkpoint", "m", "--max-mae", "inf"],
            ["--max-mae", "finite"],
        ),
        (["mask", "--mask-ellipse", "0.5,0.5,0.3,nan", "--output", tmp_path / "m"], ["ellipse"]),
        (["demo", "--seed", "-1", "--out", tmp_path / "d"], ["--seed"]),
        # Flags accepted for the seed guide's command line but unused: a typo in them is still caught (issue #26).
        (
            [
                "cache",
                "--dataset-base-path",
                tmp_path,
                "--output-dir",
                tmp_path / "c",
                "--vae-lora-path",
                tmp_path / "nope/decoder.bin",
            ],
            ["--vae-lora-path", "does not exist", "cache does not use it"],
        ),
        (["train-dit", "--cache-dir", tmp_path, "--vae-lora-path", tmp_path / "nope.bin"], ["does not exist"]),
        ([*prompt, "--mask-ellipse", "0.5,0.5,0,0.4"], ["w and h above 0"]),
        (
            [
                "train-merge",
                "--dataset-base-path",
                tmp_path,
                "--base-vae-path",
                "v",
                "--vae-lora-path",
                "l",
                "--learning-rate",
                "inf",
            ],
            ["--learning-rate", "finite"],
        ),
    ):
        _one_line(run_cli(*args, check=None), 2, *words)
    assert not any((tmp_path / name).exists() for name in ("p", "g", "c", "m", "d"))
    help_text = run_cli("generate", "--help", check=None).stdout
    assert "(> 0, ≤ 1000.0)" in help_text  # --fps
    assert "--dit-dtype [bf16|fp32|fp8]" in help_text


def test_unreadable_inputs(tmp_path: Path, tiny_stage2) -> None:
    """Class 2: files that are not what they claim: a non-UTF-8 config and prompt file, a pickle that is more than
    tensors (the message names the file and the expected format, not torch's advice), a truncated safetensors DoRA,
    a VAE file given as the text encoder."""
    bad_yaml = tmp_path / "run.yaml"
    bad_yaml.write_bytes(b"prompt: \xff\xfe caf\xe9\n")
    _one_line(run_cli("generate", "--config", bad_yaml, check=None), 2, str(bad_yaml), "not UTF-8")
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"caf\xe9 au lait\n")
    common = [
        "generate",
        "--dit-path",
        tiny_stage2["dit"],
        "--t5-path",
        tiny_stage2["t5"],
        "--base-vae-path",
        tiny_stage2["vae"],
        "--vae-lora-path",
        tiny_stage2["lora"],
        "--height",
        "32",
        "--width",
        "32",
        "--num-frames",
        "5",
        "--steps",
        "1",
        "--output-dir",
        tmp_path / "out",
    ]
    _one_line(run_cli(*common, "--prompt-file", prompts, check=None), 1, str(prompts), "not UTF-8")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pth"
    torch.save({"weight": Evil()}, evil)
    proc = run_cli(*common, "--prompt", "x", "--dora", evil, check=None)
    _one_line(proc, 1, str(evil), "not a weights file", "state dict of tensors")
    assert "weights_only=False" not in proc.stderr and "\x1b[" not in proc.stderr and "pwned" not in proc.stdout
    truncated = tmp_path / "dora.safetensors"
    truncated.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1')
    _one_line(run_cli(*common, "--prompt", "x", "--dora", truncated, check=None), 1, str(truncated))
    vae_as_t5 = [*common, "--prompt", "x", "--tokenizer-path", Path(tiny_stage2["dit"]) / "google/umt5-xxl"]
    vae_as_t5[vae_as_t5.index("--t5-path") + 1] = tiny_stage2["vae"]
    _one_line(run_cli(*vae_as_t5, check=None), 1, str(tiny_stage2["vae"]), "not a UMT5 encoder", "--t5-path")
    # An FP8 DiT file whose quantisation is not FP8 (ComfyUI's nvfp4 marker on a block linear): named before any
    # weight is read.
    from safetensors.torch import load_file, save_file

    nvfp4 = tmp_path / "wan_t2v_nvfp4.safetensors"
    tensors = {k: v for f in sorted(Path(tiny_stage2["dit"]).glob("*.safetensors")) for k, v in load_file(f).items()}
    tensors["blocks.0.ffn.0.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    save_file(tensors, nvfp4)
    bad_fp8 = [*common, "--prompt", "x", "--dit-dtype", "fp8"]
    bad_fp8[bad_fp8.index("--dit-path") + 1] = nvfp4
    _one_line(run_cli(*bad_fp8, check=None), 1, str(nvfp4), "quantised as 'nvfp4'", "only FP8")
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    proc = run_cli("generate", "--prompt", "x", "--debug", cwd=tmp_path, check=None)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "WanAlphaError" in proc.stderr
    proc = run_cli("--debug", "generate", "--prompt", "x", cwd=tmp_path, check=None)
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_brackets_in_messages_survive(tmp_path: Path) -> None:
    """Class 8: user-facing text is printed without markup interpretation."""
    bad = tmp_path / "[weird] name.yaml"
    _one_line(run_cli("prepare", "--config", bad, check=None), 2, "[weird] name.yaml")


def test_divergence_stops_training_and_keeps_the_last_good_state(tmp_path: Path, tiny_dataset, tiny_vae_files):
    """Class 4: a learning rate that blows the weights up stops training with one line, exit 1; no non-finite
    weights are written."""
    out = tmp_path / "merge"
    proc = run_cli(
        "train-merge",
        "--dataset-base-path",
        tiny_dataset,
        "--base-vae-path",
        tiny_vae_files[0],
        "--vae-lora-path",
        tiny_vae_files[1],
        "--height",
        "32",
        "--width",
        "48",
        "--num-frames",
        "5",
        "--learning-rate",
        "1e30",
        "--num-epochs",
        "1",
        "--num-workers",
        "0",
        "--perceptual-weight",
        "0",
        "--output-path",
        out,
        check=None,
    )
    _one_line(proc, 1, "training diverged at update 2", "the loss", "--learning-rate", progress=True)
    assert not list(out.glob("feature_merge_epoch_*.safetensors"))


# ------------------------------------------------------------------------------- files: full disks, leftovers


def test_a_full_disk_leaves_no_file_and_names_the_output(tmp_path: Path, monkeypatch) -> None:
    """Class 5: every writer goes through a temporary name, is checked, then renamed; a failure removes the
    temporary file and names the final one ("disk full while writing …")."""
    import numpy as np

    from wanalpha.data import video
    from wanalpha.data.files import atomic_write_text

    real_write = Path.write_bytes

    def full_disk(self, data):
        real_write(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    image = np.zeros((8, 8, 4), np.uint8)
    for write, dest in (
        (lambda d: video.write_image(d, image), tmp_path / "out/00000.png"),
        (lambda d: atomic_write_text(d, "x" * 1000), tmp_path / "out/generation.json"),
    ):
        with pytest.raises(OSError) as info:
            write(dest)
        line, code = explain(info.value)
        assert code == 1 and line.startswith(str(dest)) and "disk full" in line
        assert not dest.exists()
    monkeypatch.setattr(Path, "write_bytes", real_write)

    class SilentWriter:  # OpenCV's writer on a full disk: it reports success and writes nothing usable
        def __init__(self, *args) -> None:
            pass

        def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
            return True

        def write(self, frame) -> None:
            pass

        def release(self) -> None:
            pass

    monkeypatch.setattr(video.cv2, "VideoWriter", SilentWriter)
    frames = np.zeros((5, 16, 16, 3), np.uint8)
    with pytest.raises(video.VideoError, match="wrote 0 of 5 decodable frames"):
        video.write_video(tmp_path / "out/001.mp4", frames, 16)
    monkeypatch.setattr(video.shutil, "disk_usage", lambda p: type("U", (), {"free": 1024})())
    with pytest.raises(OSError) as info:
        video.write_video(tmp_path / "out/001_seg.mp4", frames, 16)
    assert "disk full" in explain(info.value)[0] and str(tmp_path / "out/001_seg.mp4") in explain(info.value)[0]
    assert [p.name for p in (tmp_path / "out").iterdir()] == []


def test_interrupts_and_kills_leave_nothing_behind(tmp_path: Path) -> None:
    """Class 6: temporary files being written are removed on an interrupt (remove_live_temps, which the CLI runs
    on Ctrl-C and SIGTERM), and a rerun removes what a kill left — only names of the project's temporary pattern."""
    from wanalpha.data.files import atomic_path, remove_live_temps

    with atomic_path(tmp_path / "a/clip.mp4") as tmp:
        tmp.write_bytes(b"half")
        remove_live_temps()
        assert not tmp.exists()
        tmp.write_bytes(b"whole")  # the writer carries on; the rename still lands the finished file
    out = tmp_path / "raw"
    (out / "sub").mkdir(parents=True)
    dead = _dead_pid()
    leftovers = [
        out / f".001_seg.{dead}-k2j4m9x_.tmp.mp4",
        out / f".001.{dead}-abcdefgh.tmp.txt",
        out / f"sub/.x.{dead}-q1w2e3r4.tmp.png",
        out / f".001_rgb.mp4.tmp-link-{dead}",
        out / ".002_seg.k2j4m9x_.tmp.mp4",
    ]  # the last: an older version's name, two days old
    live = os.getpid()  # a run still writing (here: this test process) keeps its temporary files
    kept = [
        out / "notes.tmp",
        out / ".hidden",
        out / "001.tmp.mp4",
        out / "my.abcdefgh.tmp.mp4",
        out / f"sub/.y.{live}-q1w2e3r4.tmp.png",
        out / ".003.k2j4m9x_.tmp.mp4",
    ]
    for path in leftovers + kept:
        path.write_bytes(b"")
    old = time.time() - 2 * 24 * 3600
    os.utime(out / ".002_seg.k2j4m9x_.tmp.mp4", (old, old))
    run_cli("prepare", "--synthetic", "1", "--output-dir", out, "--num-frames", "5", "--width", "32", "--height", "32")
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in kept)
    assert any(out.glob("*.mp4"))


def _dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_file_system_without_locks_runs_unlocked(tmp_path: Path, monkeypatch) -> None:
    """flock is not supported everywhere (Lustre without -o flock, NFS mounted nolock): the run goes ahead with a
    warning instead of failing."""
    import fcntl

    from wanalpha.data.files import LOCK_NAME, output_lock

    def no_flock(*args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.warns(UserWarning, match="cannot lock files"), output_lock(tmp_path / "out", "generate") as folder:
        (folder / "x").write_text("x")
    assert (tmp_path / "out/x").is_file() and not (tmp_path / "out" / LOCK_NAME).exists()


def test_two_runs_into_one_folder(tmp_path: Path) -> None:
    """Class 7: a run holds an advisory lock on its output folder; a second run fails at once naming the first;
    the lock of a process that died is taken over (the kernel drops it with the process)."""
    from wanalpha.data.files import LOCK_NAME, output_lock

    out = tmp_path / "raw"
    args = ["prepare", "--synthetic", "1", "--output-dir", out, "--num-frames", "5", "--width", "32", "--height", "32"]
    with output_lock(out, "generate"):
        proc = run_cli(*args, check=None)
        _one_line(proc, 1, str(out), "in use by another wanalpha run", f"pid {os.getpid()}", "generate")
    out.mkdir(exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps({"pid": 999999, "command": "train-merge"}))  # a dead process's file
    run_cli(*args)
    assert not (out / LOCK_NAME).exists()  # released and removed
    # A run that fails before writing anything leaves no folder behind.
    proc = run_cli(
        "cache", "--dataset-base-path", tmp_path / "nope", "--output-dir", tmp_path / "deep/er/cache", check=None
    )
    _one_line(proc, 1, "metadata")
    assert not (tmp_path / "deep").exists() and tmp_path.is_dir()  # nor the parents the lock made


# --------------------------------------------------------------------------------- paths that come from data


def test_data_paths_stay_inside_the_output_folder(tmp_path: Path, tiny_dataset: Path, tiny_vae_files) -> None:
    """Class 1 (data loss): a metadata row with an absolute path or '..' once made `cache` overwrite a file outside
    its output folder. Rows that leave the dataset folder are refused with one line naming the file and line, and
    every writer of a data-derived name (`data_path`) refuses a name that would leave its folder."""
    import shutil

    from wanalpha.data.files import data_path
    from wanalpha.errors import WanAlphaError

    elsewhere = tmp_path / "some/dir"
    elsewhere.mkdir(parents=True)
    for suffix in ("_rgb.mp4", "_alpha.mp4"):
        shutil.copy(tiny_dataset / f"001{suffix}", elsewhere / f"001{suffix}")
    victim = elsewhere / "001.safetensors"
    victim.write_bytes(b"precious")
    for row in (str(elsewhere / "001"), "../some/dir/001", "sub/../../some/dir/001"):
        data = tmp_path / f"data{abs(hash(row))}"
        shutil.copytree(tiny_dataset, data)
        (data / "metadata.csv").write_text(f"video,prompt\n001,a\n{row},b\n", encoding="utf-8")
        proc = run_cli(
            "cache",
            "--dataset-base-path",
            data,
            "--base-vae-path",
            tiny_vae_files[0],
            "--output-dir",
            tmp_path / "cache",
            "--height",
            "32",
            "--width",
            "48",
            "--num-frames",
            "5",
            check=None,
        )
        _one_line(proc, 1, f"{data / 'metadata.csv'} line 3", "points outside the dataset folder")
        assert victim.read_bytes() == b"precious" and not (tmp_path / "cache").exists()
    assert data_path(tmp_path, "sub/001", ".safetensors") == tmp_path / "sub/001.safetensors"
    for name in ("/etc/x", "../x", "a/../../x", "C:/x", "..\\x", ""):
        with pytest.raises(WanAlphaError, match="outside"):
            data_path(tmp_path, name, ".safetensors")


def test_damaged_adapters_and_bogus_targets_are_named() -> None:
    """Class 2: adapter files whose lora_A/lora_B ranks disagree, and target modules the DiT does not have, are one
    line each instead of a matmul or peft traceback."""
    from wanalpha import adapters
    from wanalpha.errors import WanAlphaError
    from wanalpha.models.dit import DIT_VARIANTS, WanDiT

    dit = WanDiT(DIT_VARIANTS["tiny"])
    dim = dit.config.dim
    dora = {
        "blocks.0.self_attn.q.lora_A.default.weight": torch.zeros(4, dim),
        "blocks.0.self_attn.q.lora_B.default.weight": torch.zeros(dim, 3),
        "blocks.0.self_attn.q.lora_magnitude_vector.default.weight": torch.ones(dim),
    }
    with pytest.raises(WanAlphaError, match="disagree on the rank"):
        adapters.merge_dora(dit, dora)
    lora = {
        "blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, dim),
        "blocks.0.self_attn.q.lora_up.weight": torch.zeros(dim, 3),
    }
    with pytest.raises(WanAlphaError, match="disagree on the rank"):
        adapters.merge_lora(dit, lora)
    with pytest.raises(WanAlphaError, match="bogus names no linear layer"):
        adapters.inject_dora(dit, rank=2, targets=["q", "bogus"])


def test_damaged_files_of_ours_are_named(tmp_path: Path, tiny_dataset: Path, tiny_vae_files) -> None:
    """Class 2: a truncated cache shard (read in a DataLoader worker), a junk cache.json and a damaged training state
    are each one line naming the file and the fix."""
    cache = tmp_path / "cache"
    size = ["--height", "32", "--width", "48", "--num-frames", "5"]
    run_cli(
        "cache", "--dataset-base-path", tiny_dataset, "--base-vae-path", tiny_vae_files[0], "--output-dir", cache, *size
    )
    train = [
        "train-merge",
        "--cache-dir",
        cache,
        "--base-vae-path",
        tiny_vae_files[0],
        "--vae-lora-path",
        tiny_vae_files[1],
        *size,
        "--perceptual-weight",
        "0",
        "--num-epochs",
        "1",
    ]
    run_cli(*train, "--num-workers", "0", "--save-steps", "1", "--max-steps", "1", "--output-path", tmp_path / "run")
    state = next((tmp_path / "run/checkpoints").iterdir())
    (state / "position.json").write_text("{")
    proc = run_cli(*train, "--num-workers", "0", "--resume", "--output-path", tmp_path / "run", check=None)
    _one_line(proc, 1, str(state / "position.json"), "is damaged", "without --resume")
    shard = cache / "002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    proc = run_cli(*train, "--num-workers", "2", "--output-path", tmp_path / "bad", check=None)
    _one_line(proc, 1, str(shard), "rerun `wanalpha cache`", progress=True)
    (cache / "cache.json").write_text('{"format": "wanalpha.cache.merge", ')
    _one_line(run_cli(*train, "--output-path", tmp_path / "bad", check=None), 1, "cache.json is damaged")
