"""Bad input, as a hostile user gives it (issue #24): every failure is one line naming the file or flag and the fix,
exit 1 (cannot proceed) or 2 (bad flag/config), no traceback unless --debug, no file left behind, the input data
unchanged. One table per class; each row runs the real command."""

from __future__ import annotations

import errno
import json
import os
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

    for exc, words in (
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "not UTF-8"),
        (json.JSONDecodeError("Expecting value", "{", 1), "JSON file is damaged"),
        (SafetensorError("header too large"), "safetensors file is damaged"),
        (RuntimeError("shape '[4, 3]' is invalid\nmore"), "unexpected error (RuntimeError: shape '[4, 3]'"),
        (ValueError("bad"), "--debug"),
    ):
        line, code = explain(exc)
        assert code == 1 and words in line and "\n" not in line, line


# ------------------------------------------------------------------------------------------------ the commands


def _one_line(proc, code: int, *words: str, progress: bool = False) -> None:
    """Exit `code`, no traceback, one error line (the last; before it only a progress bar where `progress`)."""
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
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
        ),  # fmt: skip
    ):
        _one_line(run_cli(*args, check=None), 2, *words)
    assert not (tmp_path / "p").exists() and not (tmp_path / "g").exists()
    help_text = run_cli("generate", "--help", check=None).stdout
    assert "(> 0, ≤ 1000.0)" in help_text  # --fps


def test_unreadable_inputs(tmp_path: Path, tiny_stage2) -> None:
    """Class 2: files that are not what they claim: a non-UTF-8 config and prompt file, a pickle that is more than
    tensors (the message names the file and the expected format, not torch's advice), a truncated safetensors DoRA,
    a VAE file given as the text encoder."""
    bad_yaml = tmp_path / "run.yaml"
    bad_yaml.write_bytes(b"prompt: \xff\xfe caf\xe9\n")
    _one_line(run_cli("generate", "--config", bad_yaml, check=None), 2, str(bad_yaml), "not UTF-8")
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"caf\xe9 au lait\n")
    common = ["generate", "--dit-path", tiny_stage2["dit"], "--t5-path", tiny_stage2["t5"], "--base-vae-path",
              tiny_stage2["vae"], "--vae-lora-path", tiny_stage2["lora"], "--height", "32", "--width", "32",
              "--num-frames", "5", "--steps", "1", "--output-dir", tmp_path / "out"]  # fmt: skip
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
    proc = run_cli("train-merge", "--dataset-base-path", tiny_dataset, "--base-vae-path", tiny_vae_files[0],
                   "--vae-lora-path", tiny_vae_files[1], "--height", "32", "--width", "48", "--num-frames", "5",
                   "--learning-rate", "1e30", "--num-epochs", "1", "--num-workers", "0", "--perceptual-weight", "0",
                   "--output-path", out, check=None)  # fmt: skip
    _one_line(proc, 1, "training diverged at update 2", "the loss", "--learning-rate", progress=True)
    assert not list(out.glob("feature_merge_epoch_*.safetensors"))
