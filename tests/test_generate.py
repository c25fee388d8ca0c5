"""generate on tiny models: deterministic, every output real (alpha decoded back), official adapter formats."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import REFERENCE, run_cli
from wanalpha.data.video import read_rgba_video
from wanalpha.errors import WanAlphaError

FLAGS = ["--height", "32", "--width", "48", "--num_frames", "9", "--steps", "4"]


def _generate(tmp: Path, files: dict, out: str, *extra, check: int = 0):
    return run_cli(
        "generate",
        "--prompt",
        "a red circle moving left, transparent background",
        "--dit_path",
        files["dit"],
        "--t5_path",
        files["t5"],
        "--base_vae_path",
        files["vae"],
        "--vae_lora_path",
        files["lora"],
        *FLAGS,
        "--output_dir",
        tmp / out,
        *extra,
        check=check,
    )


def _png_frames(folder: Path) -> np.ndarray:
    frames = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted(folder.glob("*.png"))]
    return np.stack([cv2.cvtColor(f, cv2.COLOR_BGRA2RGBA) for f in frames])


def _pillow_frames(path: Path) -> np.ndarray:
    from PIL import Image, ImageSequence

    with Image.open(path) as image:
        return np.stack([np.asarray(frame.convert("RGBA")) for frame in ImageSequence.Iterator(image)])


def test_outputs_are_real_and_deterministic(tmp_path: Path, tiny_stage2) -> None:
    _generate(tmp_path, tiny_stage2, "a", "--seed", "7", "--formats", "webm,mov,webp,apng")
    _generate(tmp_path, tiny_stage2, "b", "--seed", "7", "--formats", "webm")
    a, b = tmp_path / "a", tmp_path / "b"
    frames = _png_frames(a / "output_rgba_frames")
    assert frames.shape == (9, 32, 48, 4)
    assert np.array_equal(frames, _png_frames(b / "output_rgba_frames"))  # same seed, same video
    # --vae_decode_chunk 2: the 3 latent frames decode as 1 + 2 (not 1 + 1 + 1), the same video to float rounding
    _generate(tmp_path, tiny_stage2, "c", "--seed", "7", "--formats", "", "--vae_decode_chunk", "2")
    chunked = _png_frames(tmp_path / "c/output_rgba_frames").astype(int)
    assert np.abs(chunked - frames).max() <= 1 and (chunked == frames).mean() > 0.99
    assert json.loads((tmp_path / "c/generation.json").read_text())["config"]["vae_decode_chunk"] == 2
    record = json.loads((a / "generation.json").read_text())
    assert record["seed"] == 7 and set(record["timings"]) >= {"sampling_s", "decode_s", "text_encoder_s"}
    assert record["config"]["attention"] == "auto" and record["self_attention_kernel"] == "sdpa"  # the CPU
    provenance = json.loads((a / "provenance.json").read_text())
    assert provenance["command"] == "generate" and set(provenance["inputs"]) >= {"dit_shard_0", "t5", "vae"}
    # Alpha containers carry the alpha for real (VP9 read back through libvpx-vp9; lossy codecs within a few levels;
    # FFmpeg cannot decode animated WebP, so Pillow reads that one).
    for name, mean_tol, max_tol in (
        ("output.webm", 4, 48),
        ("output.mov", 1.5, 2),
        ("output.apng", 0, 0),
        ("output.webp", 4, 48),
    ):
        decoded = read_rgba_video(a / name) if name != "output.webp" else _pillow_frames(a / name)
        assert decoded.shape == (9, 32, 48, 4), name
        error = np.abs(decoded[..., 3].astype(int) - frames[..., 3].astype(int))
        assert error.mean() <= mean_tol and error.max() <= max_tol, (name, error.mean(), error.max())
    import av

    for name in ("output_rgb.mp4", "output_alpha.mp4", "output_composite.mp4"):
        with av.open(str(a / name)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
            assert sum(1 for _ in container.decode(stream)) == 9
    assert not (b / "output.mov").exists()  # --formats chooses
    # --offload (T5 on the CPU, DiT blocks streamed) computes the same video.
    _generate(tmp_path, tiny_stage2, "offload", "--seed", "7", "--formats", "apng", "--offload")
    assert np.array_equal(frames, _png_frames(tmp_path / "offload/output_rgba_frames"))
    # float32 RoPE (the GPU speed lever) gives the same video within a level.
    _generate(tmp_path, tiny_stage2, "rope32", "--seed", "7", "--formats", "apng", "--rope_precision", "float32")
    fast = _png_frames(tmp_path / "rope32/output_rgba_frames").astype(int)
    assert np.abs(fast - frames.astype(int)).max() <= 1
    assert "rope_precision: float32" in (tmp_path / "rope32/config.yaml").read_text()
    # --compile (torch.compile of the DiT blocks; RoPE in real arithmetic): fused bf16 kernels round differently
    # (one bf16 ulp per forward; the float32 golden forward is exact: tests/test_dit.py), and the sampling steps carry
    # that on: measured mean 0.48, max 5 levels on this tiny random DiT.
    _generate(
        tmp_path,
        tiny_stage2,
        "compiled",
        "--seed",
        "7",
        "--formats",
        "apng",
        "--rope_precision",
        "float32",
        "--compile",
    )
    diff = np.abs(_png_frames(tmp_path / "compiled/output_rgba_frames").astype(int) - fast)
    assert diff.mean() < 1 and diff.max() <= 8


def test_official_adapter_formats_load(tmp_path: Path, tiny_stage2, reference: Path) -> None:
    _generate(
        tmp_path,
        tiny_stage2,
        "c",
        "--seed",
        "1",
        "--cfg_scale",
        "1",
        "--formats",
        "apng",
        "--dora",
        reference / "golden/dora_synthetic.safetensors",
        "--lora",
        f"{reference / 'golden/lightx2v_synthetic.safetensors'}:1.0",
        "--sampler",
        "euler",
    )
    record = json.loads((tmp_path / "c/generation.json").read_text())
    assert record["inputs"]["dora"].endswith("dora_synthetic.safetensors")
    assert _png_frames(tmp_path / "c/output_rgba_frames").shape == (9, 32, 48, 4)


def test_prompt_file_gives_one_video_per_prompt(tmp_path: Path, tiny_stage2) -> None:
    """Official rule (Wan-Alpha generate_dora_lightx2v_mask.py, the prompt loop passes `seed=args.base_seed` to every
    prompt): one seed for all prompts, so the same line twice gives the same video; --per-prompt-seed gives line i
    the seed seed + i. generation.json records each video's seed."""
    (tmp_path / "prompts.txt").write_text("a red fox\n\n  a red fox  \n", encoding="utf-8")
    common = [
        "generate",
        "--prompt_file",
        tmp_path / "prompts.txt",
        "--dit_path",
        tiny_stage2["dit"],
        "--t5_path",
        tiny_stage2["t5"],
        "--base_vae_path",
        tiny_stage2["vae"],
        "--vae_lora_path",
        tiny_stage2["lora"],
        *FLAGS,
        "--seed",
        "3",
        "--formats",
        "apng",
    ]
    for out, extra, seeds, same in (("many", [], [3, 3], True), ("varied", ["--per-prompt-seed"], [3, 4], False)):
        run_cli(*common, *extra, "--output_dir", tmp_path / out)
        record = json.loads((tmp_path / out / "generation.json").read_text())
        assert record["prompts"] == ["a red fox", "a red fox"] and record["seed"] == 3 and record["seeds"] == seeds
        for i in range(2):
            assert (tmp_path / out / f"output_{i:03d}.apng").is_file()
            assert len(list((tmp_path / out / f"output_{i:03d}_rgba_frames").glob("*.png"))) == 9
        videos = [_png_frames(tmp_path / out / f"output_{i:03d}_rgba_frames") for i in range(2)]
        assert np.array_equal(*videos) == same


def test_negative_prompt_rules() -> None:
    """Official rule (Wan-Alpha wan/text2video_dora_lightx2v.py, generate: `if n_prompt == "": n_prompt =
    self.sample_neg_prompt`): an empty negative prompt means the Wan config's sample_neg_prompt; the script's own
    --n_prompt default is the shorter string. --empty-negative guides against the empty text."""
    from wanalpha.config import CONFIG_NEGATIVE_PROMPT, OFFICIAL_NEGATIVE_PROMPT, GenerateConfig
    from wanalpha.generate import negative_prompt

    if (REFERENCE / "constants.json").is_file():  # the two strings as the reference recorded them
        constants = json.loads((REFERENCE / "constants.json").read_text())
        assert constants["negative_prompt"]["config_sample_neg_prompt"] == CONFIG_NEGATIVE_PROMPT
        assert constants["negative_prompt"]["generate_script_default_n_prompt"] == OFFICIAL_NEGATIVE_PROMPT
    assert negative_prompt(GenerateConfig(prompt="x")) == OFFICIAL_NEGATIVE_PROMPT
    assert negative_prompt(GenerateConfig(prompt="x", negative_prompt="")) == CONFIG_NEGATIVE_PROMPT
    assert negative_prompt(GenerateConfig(prompt="x", negative_prompt="blurry")) == "blurry"
    assert negative_prompt(GenerateConfig(prompt="x", empty_negative=True)) == ""


def test_bad_inputs(tmp_path: Path, tiny_stage2) -> None:
    proc = _generate(tmp_path, tiny_stage2, "d", "--num_frames", "8", check=2)
    assert "--num-frames must be 4n+1" in proc.stderr
    proc = _generate(tmp_path, tiny_stage2, "d", "--formats", "gif", check=2)
    assert "unknown format 'gif'" in proc.stderr
    proc = _generate(tmp_path, tiny_stage2, "d", "--compile", "--offload", check=2)
    assert "--compile cannot be combined with --offload" in proc.stderr
    proc = _generate(tmp_path, tiny_stage2, "d", "--attention", "fa4", check=2)  # the CPU: FlashAttention-4 cannot run
    assert "--attention fa4" in proc.stderr and "runs on NVIDIA CUDA GPUs" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("generate", "--prompt", "x", *FLAGS, cwd=tmp_path, check=1)
    assert "missing the DiT" in proc.stderr and "Wan-Alpha/vae/decoder.bin" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = _generate(tmp_path, tiny_stage2, "d", "--dora", tmp_path / "nope.safetensors", check=1)
    assert "the DoRA file" in proc.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package 'chromium')")
def test_webm_alpha_shows_the_page_in_a_browser(tmp_path: Path) -> None:
    """Headless Chromium decodes our WebM (left half transparent, right half opaque red) onto a canvas: the left
    pixel has alpha 0, so a green page shows through there; the right pixel is the opaque red video.

    The page draws the video at every chance it gets (loadeddata, each presented frame, timeupdate, seeked, ended; the
    clip loops) and keeps the first drawing that holds any pixel: a browser may report a frame as loaded before it can
    paint it onto a canvas (an empty canvas, seen once in CI), and an empty canvas proves nothing either way."""
    from wanalpha.data.video import write_rgba_video

    rgb = np.zeros((9, 64, 96, 3), np.uint8)
    rgb[..., 0] = 255
    alpha = np.zeros((9, 64, 96), np.uint8)
    alpha[:, :, 48:] = 255
    write_rgba_video(tmp_path / "clip.webm", rgb, alpha, 16, "webm")
    script = """
const v = document.getElementById('v'), out = document.getElementById('out');
const c = document.getElementById('c').getContext('2d', {willReadFrequently: true});
let drawn = false, attempts = 0;
function probe() {
  if (drawn || v.readyState < 2) return;
  attempts += 1;
  c.clearRect(0, 0, 96, 64);
  c.drawImage(v, 0, 0, 96, 64);
  const l = c.getImageData(20, 32, 1, 1).data, r = c.getImageData(76, 32, 1, 1).data;
  const whole = c.getImageData(0, 0, 96, 64).data;
  let any = false;
  for (let i = 3; i < whole.length; i += 4) if (whole[i] > 0) { any = true; break; }
  const pixels = Array.from(l).join(',') + ';' + Array.from(r).join(',');
  out.textContent = (any ? 'drawn ' : 'empty ') + attempts + ' ' + pixels;
  drawn = any;
}
for (const e of ['loadeddata', 'canplay', 'playing', 'timeupdate', 'seeked', 'ended']) v.addEventListener(e, probe);
if (v.requestVideoFrameCallback) {
  const frame = () => { probe(); if (!drawn) v.requestVideoFrameCallback(frame); };
  v.requestVideoFrameCallback(frame);
}
v.addEventListener('error', () => { out.textContent = 'error ' + (v.error ? v.error.code : '?'); });
"""
    (tmp_path / "page.html").write_text(
        "<html><body style='background:rgb(0,255,0)'><video id=v src='clip.webm' muted autoplay loop></video>"
        f"<canvas id=c width=96 height=64></canvas><pre id=out>pending</pre><script>{script}</script></body></html>"
    )
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--autoplay-policy=no-user-gesture-required",
            "--allow-file-access-from-files",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            f"file://{tmp_path / 'page.html'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    version = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    said = (
        proc.stdout.split('<pre id="out">')[1].split("<")[0] if '<pre id="out">' in proc.stdout else proc.stdout[-300:]
    )
    context = f"{version}: page says {said!r}; stderr tail {proc.stderr[-400:]!r}"
    assert said.startswith("drawn "), context  # some frame reached the canvas
    left, right = (np.array([int(v) for v in part.split(",")]) for part in said.split(" ", 2)[2].split(";"))
    page = np.array([0, 255, 0])
    shown_left = left[:3] * left[3] / 255 + page * (1 - left[3] / 255)
    shown_right = right[:3] * right[3] / 255 + page * (1 - right[3] / 255)
    assert left[3] == 0 and tuple(shown_left.round()) == (0, 255, 0), context  # the page shows through
    assert right[3] == 255 and shown_right[0] > 240 and shown_right[1] < 16, context  # the opaque red video


def test_output_folders_are_fresh_and_never_overwritten_silently(tmp_path: Path, tiny_stage2) -> None:
    """Issue #26: without --output-dir every run gets a fresh outputs/<date>-<n>/ (printed); into a folder that holds
    an earlier run's outputs a run is refused unless --overwrite, which removes them first (no old frame stays)."""
    common = [
        "generate",
        "--prompt",
        "a red circle moving left, transparent background",
        "--dit_path",
        tiny_stage2["dit"],
        "--t5_path",
        tiny_stage2["t5"],
        "--base_vae_path",
        tiny_stage2["vae"],
        "--vae_lora_path",
        tiny_stage2["lora"],
        "--height",
        "32",
        "--width",
        "48",
        "--steps",
        "1",
        "--formats",
        "apng",
        "--seed",
        "1",
    ]
    first = run_cli(*common, "--num_frames", "9", cwd=tmp_path)
    second = run_cli(*common, "--num_frames", "9", cwd=tmp_path)
    folders = sorted((tmp_path / "outputs").iterdir())
    assert len(folders) == 2 and folders[0].name.endswith("-001") and folders[1].name.endswith("-002")
    assert (
        str(folders[0].relative_to(tmp_path)) in first.stdout and str(folders[1].relative_to(tmp_path)) in second.stdout
    )
    proc = run_cli(*common, "--num_frames", "5", "--output_dir", folders[0], cwd=tmp_path, check=1)
    assert "already holds an earlier run's outputs" in proc.stderr and "--overwrite" in proc.stderr
    assert len(list((folders[0] / "output_rgba_frames").glob("*.png"))) == 9  # untouched
    run_cli(*common, "--num_frames", "5", "--output_dir", folders[0], "--overwrite", cwd=tmp_path)
    assert len(list((folders[0] / "output_rgba_frames").glob("*.png"))) == 5  # none of the 9 old frames stays
    assert json.loads((folders[0] / "generation.json").read_text())["output_dir"] == str(folders[0])


def _config(tmp: Path, files: dict, **extra):
    from wanalpha.config import GenerateConfig

    return GenerateConfig(
        prompt_file=_prompts(tmp),
        dit_path=files["dit"],
        t5_path=files["t5"],
        base_vae_path=files["vae"],
        vae_lora_path=files["lora"],
        height=32,
        width=48,
        num_frames=9,
        output_dir=tmp / "out",
        **extra,
    )


def _preparing_load(monkeypatch, work) -> list:
    """generate.load with kernel_preparation's work replaced by `work(stop)` (off CUDA there is none); returns the
    text batches it was asked for."""
    from wanalpha import generate

    batches = []

    def preparation(dit_config, kernel, config, device, parallel=None, text_batch=None):
        batches.append(text_batch)
        return work

    monkeypatch.setattr(generate, "kernel_preparation", preparation)
    return batches


def test_load_prepares_on_its_own_thread_while_another_reads_the_weights(
    tmp_path: Path, tiny_stage2, monkeypatch
) -> None:
    """generate prepares the GPU kernels and plans on the thread that then samples and decodes (PyTorch keeps cuDNN's
    plans and cuBLAS's handles per thread) while a helper thread reads the weights and encodes the prompts, with the
    batch the encoder takes: the prompts and, with guidance, the negative prompt."""
    import threading

    from rich.console import Console

    from wanalpha import generate
    from wanalpha.checkpoints import wan

    threads: dict[str, threading.Thread] = {}
    batches = _preparing_load(
        monkeypatch, lambda stop, alone: threads.setdefault("prepare", threading.current_thread())
    )
    real_load_t5 = wan.load_t5

    def load_t5(*args, **kwargs):
        threads["read"] = threading.current_thread()
        return real_load_t5(*args, **kwargs)

    monkeypatch.setattr(wan, "load_t5", load_t5)
    for cfg_scale, batch in ((5.0, 3), (1.0, 2)):
        threads.clear()
        config = _config(tmp_path, tiny_stage2, cfg_scale=cfg_scale)
        sampler = generate.load(config, generate.plan(config), Console(quiet=True))
        assert batches[-1] == batch and len(sampler.contexts) == 2
        assert threads["prepare"] is threading.main_thread()
        assert threads["read"] is not threading.main_thread() and threads["read"].name == "read weights"


def test_the_read_puts_nothing_on_the_gpu_before_the_preparation_lets_it(
    tmp_path: Path, tiny_stage2, monkeypatch
) -> None:
    """read_models reads UMT5's file, then waits for `gpu_free` (kernel_preparation's timing runs take whatever GPU
    memory is free) before the encoder runs: nothing of it is encoded, or loaded, until the event is set."""
    import threading

    from rich.console import Console

    from wanalpha import generate
    from wanalpha.background import Background
    from wanalpha.checkpoints import wan
    from wanalpha.checkpoints.wan import read_dit_config
    from wanalpha.models import t5

    events, waiting = [], threading.Event()

    class Gate(threading.Event):
        def wait(self, timeout=None):
            waiting.set()
            return super().wait(timeout)

    real_load_t5, real_call = wan.load_t5, t5.TextEncoder.__call__

    def load_t5(*args, **kwargs):
        events.append("file")
        return real_load_t5(*args, **kwargs)

    def encode(self, texts):
        events.append("encode")
        return real_call(self, texts)

    monkeypatch.setattr(wan, "load_t5", load_t5)
    monkeypatch.setattr(t5.TextEncoder, "__call__", encode)
    config = _config(tmp_path, tiny_stage2)
    run, gate = generate.plan(config), Gate()
    dit_config = read_dit_config(run.inputs["dit"])
    texts = ["a", "the negative prompt"]  # guidance: the last text is the negative prompt
    reading = Background(lambda: generate.read_models(config, run, Console(quiet=True), dit_config, texts, gate))
    assert waiting.wait(timeout=60)  # the read is at the gate
    assert events == ["file"]  # the file is read; nothing runs until the preparation lets it
    gate.set()
    sampler = reading.result()
    assert events == ["file", "encode"] and len(sampler.contexts) == 1 and sampler.negative is not None
    assert run.timings["preparation_wait_s"] >= 0 and run.timings["text_encoder_s"] >= 0  # the wait is its own


def test_a_failed_read_ends_the_preparation_and_its_error_is_raised(tmp_path: Path, tiny_stage2, monkeypatch) -> None:
    """Where the weights' read fails (a bad file), the preparation is told at once and ends after its current step;
    load raises the read's own error (a WanAlphaError: the CLI's one line)."""
    import threading

    from rich.console import Console

    from wanalpha import generate
    from wanalpha.checkpoints import wan

    steps, entered = [], threading.Event()

    def work(stop, alone) -> None:
        for step in range(3):
            if stop.is_set():
                return
            steps.append(step)
            entered.set()
            stop.wait(timeout=60)  # a long step, ended early only by the failed read

    _preparing_load(monkeypatch, work)

    def load_t5(*args, **kwargs):
        assert entered.wait(timeout=60)  # the preparation is in its first step
        raise WanAlphaError("T5 encoder file t5.pth is truncated; download it again")

    monkeypatch.setattr(wan, "load_t5", load_t5)
    config = _config(tmp_path, tiny_stage2)
    with pytest.raises(WanAlphaError, match="truncated"):
        generate.load(config, generate.plan(config), Console(quiet=True))
    assert steps == [0]


def test_ctrl_c_while_preparing_stops_the_read_between_tensors(tmp_path: Path, tiny_stage2, monkeypatch) -> None:
    """Ctrl-C (or any error) on the preparing thread stops the helper's read at its next tensor and waits for it
    before the interrupt goes on: no read, and no GPU work of it, outlives the error."""
    import threading

    from rich.console import Console

    from wanalpha import background, generate
    from wanalpha.checkpoints import wan

    inside, read = threading.Event(), []
    real_tensors = wan._DiTFile.tensors

    def tensors(self):
        for i, item in enumerate(real_tensors(self)):
            if i == 1:  # inside the DiT's tensors: held until the preparing thread asks the read to stop
                inside.set()
                asked = background._local.stop
                while not asked.is_set():
                    asked.wait(timeout=60)
            read.append(item[0])
            yield item

    def work(stop, alone) -> None:
        alone.set()  # no timing runs: the read may use the GPU
        assert inside.wait(timeout=60)
        raise KeyboardInterrupt

    _preparing_load(monkeypatch, work)
    monkeypatch.setattr(wan._DiTFile, "tensors", tensors)
    config = _config(tmp_path, tiny_stage2)
    with pytest.raises(KeyboardInterrupt):
        generate.load(config, generate.plan(config), Console(quiet=True))
    assert len(read) == 2  # the tensor in hand, then the stop at the next checkpoint
    assert not [t for t in threading.enumerate() if t.name == "read weights"]  # waited for


def _prompts(tmp: Path) -> Path:
    path = tmp / "prompts.txt"
    path.write_text("a red fox\na blue bird\n", encoding="utf-8")
    return path


def test_host_frames_off_the_gpu_are_the_frames() -> None:
    """generate.HostFrames off a GPU: the frames as contiguous arrays at once (nothing to wait for)."""
    import torch

    from wanalpha.generate import HostFrames

    rgb = torch.arange(2 * 3 * 4 * 3, dtype=torch.uint8).reshape(2, 3, 4, 3).permute(0, 2, 1, 3)
    frames = HostFrames(rgb, rgb[..., 0])
    arrays = frames.arrays()
    assert frames.done is None and np.array_equal(arrays[0], rgb.numpy()) and arrays[0].flags["C_CONTIGUOUS"]
    assert np.array_equal(arrays[1], rgb[..., 0].numpy())


@pytest.mark.parametrize("case", ["file", "stopped", "mapping", "missing", "refused", "no fadvise"])
def test_read_ahead_asks_for_the_whole_file_and_never_fails(tmp_path: Path, monkeypatch, case: str) -> None:
    """checkpoints.io.read_ahead (generate: UMT5's mapped .pth, read while the GPU is being prepared) asks the system
    to read the whole file ahead, window after window (Linux reads only a few MB per call whatever it is asked), and
    ends once its stop event is set; a mapping, a missing file, a refusal or a system without posix_fadvise are not
    errors (read_state_dict reports a bad path)."""
    import os
    import threading

    from wanalpha.checkpoints import io

    monkeypatch.setattr(io, "READ_AHEAD_WINDOW", 1000)
    path = tmp_path / "t5.pth"
    path.write_bytes(b"x" * 4500)
    calls, stop = [], threading.Event()

    def fadvise(fd, offset, length, advice):
        assert os.fstat(fd).st_size == 4500 and advice == os.POSIX_FADV_WILLNEED
        calls.append((offset, length))
        if case == "refused":
            raise OSError(22, "Invalid argument")
        if case == "stopped" and len(calls) == 2:
            stop.set()  # the GPU is free: the rest is read as the tensors move

    if case == "no fadvise":
        monkeypatch.delattr(os, "posix_fadvise", raising=False)
    else:
        monkeypatch.setattr(os, "posix_fadvise", fadvise, raising=False)
    source = {"mapping": {}, "missing": tmp_path / "nope.pth", "refused": str(path)}.get(case, path)
    io.read_ahead(source, stop=stop)
    expected = {
        "file": [(0, 1000), (1000, 1000), (2000, 1000), (3000, 1000), (4000, 500)],
        "stopped": [(0, 1000), (1000, 1000)],
        "refused": [(0, 1000)],
    }
    assert calls == expected.get(case, [])


@pytest.mark.parametrize("fails", [False, True], ids=["written", "sampling fails"])
def test_writer_processes_start_ahead_of_their_clips(tmp_path: Path, tiny_stage2, monkeypatch, fails: bool) -> None:
    """Where generate writes from child processes (a GPU; here forced on the CPU), the first clip's writer process
    starts before sampling and each later clip's while the clip before it decodes, so none starts when its frames are
    ready; every one is reaped, the one started for a clip that never comes included (the sampling fails)."""
    from wanalpha import generate, outputs

    events, started = [], []

    class Recorded(outputs.WriterProcess):
        def __init__(self) -> None:
            super().__init__()
            started.append(self)
            events.append("start")

    sample_latents = generate.sample_latents

    def sampled(*args, **kwargs):
        events.append("sampling")
        if fails:
            raise WanAlphaError("sampling failed")
        return sample_latents(*args, **kwargs)

    class Chunk(generate.HostFrames):
        def __init__(self, *frames) -> None:
            events.append("chunk")
            super().__init__(*frames)

    monkeypatch.setattr(outputs, "WriterProcess", Recorded)
    monkeypatch.setattr(generate, "_writes_from_a_process", lambda device: True)
    monkeypatch.setattr(generate, "sample_latents", sampled)
    monkeypatch.setattr(generate, "HostFrames", Chunk)
    config = _config(tmp_path, tiny_stage2, formats=["apng"])
    if fails:
        with pytest.raises(WanAlphaError, match="sampling failed"):
            generate.run(config)
        assert events == ["start", "sampling"]
    else:
        files = generate.run(config)
        # clip 2's process starts before clip 1's first chunk decodes (9 frames: 3 chunks a clip)
        assert events == ["start", "sampling", "start"] + ["chunk"] * 6
        assert sorted(f.name for f in files if f.suffix == ".apng") == ["output_000.apng", "output_001.apng"]
        for clip in ("output_000", "output_001"):
            assert len(list((tmp_path / "out" / f"{clip}_rgba_frames").glob("*.png"))) == 9
    assert all(p._process.returncode == 0 and not p.running() for p in started)  # ended, none killed


def test_writer_process_started_ahead(tmp_path: Path) -> None:
    """outputs.WriterProcess: taken once by a ProcessClipWriter (which writes the clip as its own child would);
    one never taken ends cleanly on close; one that ended while it waited is replaced by decode_and_write. And
    writer_ahead starts one only where decode_and_write would write from a child process."""
    import torch

    from wanalpha.generate import decode_and_write, writer_ahead
    from wanalpha.models.rgba import RGBAlphaVAE
    from wanalpha.models.vae import VAEConfig
    from wanalpha.outputs import ProcessClipWriter, WriterProcess

    assert writer_ahead(torch.device("cpu")) is None
    process = WriterProcess()
    with ProcessClipWriter(tmp_path / "a/output", 16, [], process=process) as clip:
        clip.add(np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 8, 8), np.uint8))
        assert [p.name for p in clip.close()][-1] == "output_rgba_frames"
    with pytest.raises(WanAlphaError, match="taken"):
        process.take()
    idle = WriterProcess()
    idle.close()
    assert idle._process.returncode == 0 and not idle.running()
    process.close()  # taken: its writer's to end, nothing to do
    dead = WriterProcess()
    dead._process.kill()
    dead._process.wait()
    with pytest.raises(WanAlphaError, match="writer process ended unexpectedly"):  # taken as it is: its own error
        ProcessClipWriter(tmp_path / "c/output", 16, [], process=dead).close()
    dead = WriterProcess()
    dead._process.kill()
    dead._process.wait()
    torch.manual_seed(0)
    vae = RGBAlphaVAE(VAEConfig(dim=8), with_encoder=False).eval()
    latents, stems = [torch.randn(1, 16, 2, 4, 4)], [tmp_path / "b/output"]
    files, _ = decode_and_write(vae, latents, stems, 16, [], in_process=False, ahead=dead)
    assert len(list((tmp_path / "b/output_rgba_frames").glob("*.png"))) == 5 and len(files) == 4
    with pytest.raises(WanAlphaError, match="taken"):  # closed by decode_and_write, a fresh one in its place
        dead.take()
