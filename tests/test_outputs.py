"""Writing a clip while it decodes: chunked decoding equals whole decoding, the streamed files equal the files
written from whole arrays, and an interrupted or failing clip leaves no partial file behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wanalpha.data.video import read_rgba_video, read_video, write_h264, write_rgba_video
from wanalpha.outputs import ClipWriter, ProcessClipWriter, WriterProcess


def _clip(frames: int = 9, height: int = 32, width: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A disc moving over a gradient, with a soft alpha edge."""
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.empty((frames, height, width, 3), np.uint8)
    alpha = np.empty((frames, height, width), np.uint8)
    for t in range(frames):
        r = np.hypot(ys - height / 2, xs - (8 + 3 * t))
        alpha[t] = np.clip(255 * (10 - r) / 3, 0, 255).astype(np.uint8)
        rgb[t] = np.stack([xs * 5 % 256, ys * 7 % 256, np.full_like(xs, 40 * t % 256)], -1).astype(np.uint8)
    return rgb, alpha


def _chunks(n: int) -> list[slice]:
    """The decoder's chunks: frame 0, then 4 at a time."""
    return [slice(0, 1)] + [slice(s, s + 4) for s in range(1, n, 4)]


@pytest.mark.parametrize("writer", [ClipWriter, ProcessClipWriter])
def test_streamed_files_equal_whole_writes(tmp_path: Path, writer) -> None:
    """Either writer (threads here, or a child process) streams the files that whole-array writes give."""
    rgb, alpha = _clip()
    with writer(tmp_path / "s/output", 16, ["webm", "apng"]) as clip:
        for chunk in _chunks(len(rgb)):
            clip.add(rgb[chunk], alpha[chunk])
        files = clip.close()
    names = [p.name for p in files]
    assert names == [
        "output_rgb.mp4",
        "output_alpha.mp4",
        "output_composite.mp4",
        "output_rgba_frames",
        "output.webm",
        "output.apng",
    ]
    write_h264(tmp_path / "rgb.mp4", rgb, 16)
    write_h264(tmp_path / "alpha.mp4", alpha, 16)
    write_rgba_video(tmp_path / "clip.apng", rgb, alpha, 16, "apng")
    # The H.264 streams decode to the same frames (their container bytes once differed under heavy CPU load).
    for streamed, whole in (("s/output_rgb.mp4", "rgb.mp4"), ("s/output_alpha.mp4", "alpha.mp4")):
        got, expected = read_video(tmp_path / streamed)[0], read_video(tmp_path / whole)[0]
        assert got.shape[0] == 9 and np.array_equal(got, expected), streamed
    assert (tmp_path / "s/output.apng").read_bytes() == (tmp_path / "clip.apng").read_bytes()
    pngs = sorted((tmp_path / "s/output_rgba_frames").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(9)]
    assert np.array_equal(read_rgba_video(tmp_path / "s/output.apng")[..., 3], alpha)
    assert not list(tmp_path.rglob(".*tmp*"))  # no temporary file left


def test_streamed_video_holds_the_frames(tmp_path: Path) -> None:
    """Read back, the streamed H.264 RGB is the input within lossy-codec error (crf 18), all 9 frames; a clip left
    without close() is finished by the `with` block."""
    import av

    rgb, alpha = _clip()
    with ClipWriter(tmp_path / "output", 16, []) as clip:
        for chunk in _chunks(len(rgb)):
            clip.add(rgb[chunk], alpha[chunk])
    with av.open(str(tmp_path / "output_rgb.mp4")) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert frames.shape == rgb.shape
    assert np.abs(frames.astype(int) - rgb.astype(int)).mean() < 4
    assert len(list((tmp_path / "output_rgba_frames").glob("*.png"))) == 9


def test_failed_setup_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    """An encoder that cannot be created (here the alpha container's) undoes the ones already made."""
    from wanalpha.data import video

    def unavailable(path, fps, fmt):
        raise video.VideoError(f"{path}: no {fmt} encoder here")

    monkeypatch.setattr(video, "rgba_encoder", unavailable)
    with pytest.raises(video.VideoError, match="no webm encoder"):
        ClipWriter(tmp_path / "output", 16, ["webm"])
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("writer", [ClipWriter, ProcessClipWriter])
def test_interrupted_clip_leaves_nothing(tmp_path: Path, writer) -> None:
    rgb, alpha = _clip()
    with pytest.raises(KeyboardInterrupt), writer(tmp_path / "output", 16, ["webm", "mov"]) as clip:
        clip.add(rgb[:5], alpha[:5])
        raise KeyboardInterrupt
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".png"]
    assert leftovers == []  # no video file, finished or temporary; PNG frames written before the stop may stay
    assert not list(tmp_path.rglob(".*tmp*"))


def test_failing_writer_stops_the_clip(tmp_path: Path, monkeypatch) -> None:
    """An encoder that fails (a full disk, say) raises its error to the caller, at the latest on close(), and its
    file is not left behind half-written."""
    from wanalpha.data import video

    def broken(self, frames):
        raise OSError("No space left on device")

    rgb, alpha = _clip()
    clip = ClipWriter(tmp_path / "output", 16, ["mov"])
    monkeypatch.setattr(video.VideoEncoder, "write", broken)
    with pytest.raises(OSError, match="No space"), clip:
        for chunk in _chunks(len(rgb)):
            clip.add(rgb[chunk], alpha[chunk])
        clip.close()
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".mp4", ".mov")]
    assert not list(tmp_path.rglob(".*tmp*"))


def test_process_writer_failures(tmp_path: Path) -> None:
    """The child's errors reach the caller as themselves, and nothing half-written stays: its writers cannot be set
    up (the folder is a file), a writer fails mid-clip (at the next add or on close), and a child killed mid-clip
    (its temporary files, named with its pid, are removed)."""
    import os
    import signal

    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError), ProcessClipWriter(tmp_path / "file/output", 16, []) as clip:
        clip.close()  # the constructor does not wait for the child: its set-up error comes here
    for writer in (ClipWriter, ProcessClipWriter):  # aborted at once (the child perhaps not ready): nothing stays
        writer(tmp_path / "early/output", 16, ["mov"]).abort()
        assert list((tmp_path / "early").iterdir()) == []
    rgb, alpha = _clip()
    ahead = WriterProcess()  # a child started before its clip: aborted mid-clip, it is killed and leaves nothing
    clip = ProcessClipWriter(tmp_path / "ahead/output", 16, ["mov"], process=ahead)
    clip.add(rgb[:5], alpha[:5])
    clip.abort()
    assert clip._process.returncode is not None and not ahead.running()
    left = [p for p in (tmp_path / "ahead").rglob("*") if p.is_file()]  # finished PNG frames may stay, whole
    assert not [p for p in left if ".tmp" in p.name or p.suffix in (".mp4", ".mov")]
    rgb, alpha = _clip()
    clip = ProcessClipWriter(tmp_path / "a/output", 16, ["mov"])
    with pytest.raises(OSError), clip:
        clip.add(rgb[:5], alpha[:5])
        clip.folder.rename(tmp_path / "moved")  # the PNG frames' folder becomes a file: the next PNGs fail
        clip.folder.write_text("x")
        clip.add(rgb[5:], alpha[5:])
        clip.close()
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".mp4", ".mov") or "tmp" in p.name]
    clip = ProcessClipWriter(tmp_path / "b/output", 16, ["mov"])
    clip.add(rgb[:5], alpha[:5])
    os.kill(clip._process.pid, signal.SIGKILL)
    with pytest.raises(Exception, match="writer process"), clip:
        for _ in range(50):  # the pipe fills or the child's end is seen
            clip.add(rgb[:5], alpha[:5])
        clip.close()
    assert not [p for p in (tmp_path / "b").rglob("*") if p.is_file() and p.suffix != ".png"]


def test_process_writer_interrupted_mid_close(tmp_path: Path) -> None:
    """Ctrl-C inside close (here: while it waits for the sender, with frames still queued and the sender
    mid-message): the clip is aborted at once, the child is reaped, and no temporary file stays (clip files or PNGs)."""
    rgb, alpha = _clip()
    clip = ProcessClipWriter(tmp_path / "c/output", 16, ["mov"])
    join = clip._sender.join

    def interrupted(*args, **kwargs):
        clip._sender.join = join
        raise KeyboardInterrupt

    clip._sender.join = interrupted
    with pytest.raises(KeyboardInterrupt), clip:
        for _ in range(20):
            clip.add(rgb, alpha)
        clip.close()
    assert clip._process.returncode is not None and not clip._sender.is_alive()
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_bad_chunk_is_refused(tmp_path: Path) -> None:
    rgb, alpha = _clip()
    with pytest.raises(ValueError, match="uint8"), ClipWriter(tmp_path / "output", 16, []) as clip:
        clip.add(rgb.astype(np.float32), alpha)


@pytest.mark.parametrize("tiles", [None, (4, 4)])
def test_decode_frames_equal_decode(tiles) -> None:
    """RGBAlphaVAE.decode_frames yields 1 then 4 frames per latent frame, equal to decode()'s (whole and tiled)."""
    from wanalpha.models.rgba import RGBAlphaVAE
    from wanalpha.models.vae import VAEConfig

    torch.manual_seed(0)
    model = RGBAlphaVAE(VAEConfig(dim=8), with_encoder=False).eval()
    for p in model.parameters():  # decoders that differ (a fresh RGBAlphaVAE's are one initialisation)
        p.data.normal_(0, 0.2)
    z = torch.randn(1, 16, 3, 6, 6)
    with torch.no_grad():
        rgb, alpha = model.decode(z, tile_size=tiles)
        chunks = list(model.decode_frames(z, tile_size=tiles))
    assert [c[0].shape[2] for c in chunks] == [1, 4, 4]
    assert torch.equal(torch.cat([c[0] for c in chunks], 2), rgb)
    assert torch.equal(torch.cat([c[1] for c in chunks], 2), alpha)


def test_spawned_children_do_not_rerun_the_command(monkeypatch) -> None:
    """A child that multiprocessing spawns (the parallel commands' workers) imports the parent's main module under
    another name (`python -m wanalpha` → wanalpha.__main__ as __mp_main__), which must not run the command line
    again."""
    import runpy

    from wanalpha import cli

    ran = []
    monkeypatch.setattr(cli, "main", lambda *args, **kwargs: ran.append(args))
    runpy.run_module("wanalpha.__main__", run_name="__mp_main__")
    assert ran == []
    runpy.run_module("wanalpha.__main__", run_name="__main__")
    assert ran == [()]


def test_no_writer_process_falls_back_to_threads(tmp_path: Path, monkeypatch) -> None:
    """Where no child process can be started (process limits, memory), ProcessClipWriter says so with its own error
    and generate's decode stage writes the same files from its threads, with a warning."""
    import subprocess

    from wanalpha.generate import decode_and_write
    from wanalpha.models.rgba import RGBAlphaVAE
    from wanalpha.models.vae import VAEConfig
    from wanalpha.outputs import WriterProcessUnavailable

    def refused(*args, **kwargs):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(subprocess, "Popen", refused)
    with pytest.raises(WriterProcessUnavailable, match="cannot start a writer process"):
        ProcessClipWriter(tmp_path / "a/output", 16, [])
    torch.manual_seed(0)
    vae = RGBAlphaVAE(VAEConfig(dim=8), with_encoder=False).eval()
    with torch.no_grad(), pytest.warns(UserWarning, match="writing the files from this process"):
        latents, stems = [torch.randn(1, 16, 2, 4, 4)], [tmp_path / "b/output"]
        files, _ = decode_and_write(vae, latents, stems, 16, [], in_process=False)
    names = ["output_rgb.mp4", "output_alpha.mp4", "output_composite.mp4", "output_rgba_frames"]
    assert [p.name for p in files] == names
    assert len(list((tmp_path / "b/output_rgba_frames").glob("*.png"))) == 5


def test_numpy_composite_equals_the_metric() -> None:
    """The writers' torch-free checkerboard composite equals metrics.checkerboard_composite truncated to uint8, for
    every rgb value × alpha value over both squares' grey, and the board is render.checkerboard's."""
    from wanalpha.data.checker import CHECKER_LIGHT, checker_composite, checker_grey
    from wanalpha.data.render import checkerboard
    from wanalpha.metrics import checkerboard_composite

    height, width = 480, 832
    assert torch.equal(checkerboard(height, width), torch.from_numpy(checker_grey(height, width)).expand(3, -1, -1))
    light = ((checker_grey(height, width) + 1) * np.float32(127.5)).round() == CHECKER_LIGHT
    rgb = np.zeros((1, height, width, 3), np.uint8)
    alpha = np.zeros((1, height, width), np.uint8)
    values = np.arange(256 * 256)
    for square in (light, ~light):  # each (rgb, alpha) pair on a pixel of that square's grey
        where = np.flatnonzero(square)[: values.size]
        rgb.reshape(-1, 3)[where] = (values // 256)[:, None]
        alpha.reshape(-1)[where] = values % 256
        expected = checkerboard_composite(torch.from_numpy(rgb), torch.from_numpy(alpha)).numpy().astype(np.uint8)
        assert np.array_equal(checker_composite(rgb, alpha), expected)


def test_writer_child_runs_without_torch() -> None:
    """The writer process imports wanalpha.outputs and what a clip's files need, never torch (seconds of import, on
    the GPU machine a held interpreter lock while the parent decodes)."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, tempfile, pathlib; from wanalpha.outputs import ClipWriter\n"
        "with tempfile.TemporaryDirectory() as d:\n"
        "    w = ClipWriter(pathlib.Path(d) / 'o', 16, ['webm'])\n"
        "    w.add(np.zeros((1, 16, 16, 3), np.uint8), np.zeros((1, 16, 16), np.uint8)); w.close()\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_frame_threaded_encoders_write_the_slice_threaded_packets(tmp_path: Path) -> None:
    """The encoders given frame threads (video.FRAME_THREADED: ProRes 4444) write the packets PyAV's default slice
    threads write, frame for frame, through the writer itself (VideoEncoder), and do run frame-threaded."""
    import av

    from wanalpha.data.video import FRAME_THREADED, rgba_encoder

    rgb, alpha = _clip(frames=12)
    rgba = np.concatenate([rgb, alpha[..., None]], axis=-1)
    assert {"prores_ks"} == FRAME_THREADED

    def packets(path: Path) -> list[bytes]:
        with av.open(str(path)) as container:
            return [bytes(p) for p in container.demux(video=0) if p.size]

    encoder = rgba_encoder(tmp_path / "frames.mov", 16, "mov")
    assert encoder._stream.codec_context.thread_type.name == "FRAME"
    encoder.write(rgba)
    encoder.close()
    FRAME_THREADED.clear()
    try:
        encoder = rgba_encoder(tmp_path / "slices.mov", 16, "mov")
        assert encoder._stream.codec_context.thread_type.name != "FRAME"
        encoder.write(rgba)
        encoder.close()
    finally:
        FRAME_THREADED.add("prores_ks")
    ours, theirs = packets(tmp_path / "frames.mov"), packets(tmp_path / "slices.mov")
    assert len(ours) == len(rgb) and ours == theirs


def test_webm_holds_no_frame_back_and_loses_nothing_by_it() -> None:
    """The WebM's VP9 encoder emits each frame's packet as the frame arrives (lag-in-frames 0), so nothing of its
    work is left for the end of the clip; and the file is byte for byte libvpx's default (a 25-frame lag), which
    with alpha makes no alt-ref frames, the lag's only use (muxed bit-exact: the track's id is otherwise random)."""
    import io

    import av

    from wanalpha.data.video import ALPHA_FORMATS

    rgb, alpha = _clip(frames=30)
    container, codec, pix_fmt, options = ALPHA_FORMATS["webm"]

    def encoded(options: dict, alpha: np.ndarray) -> tuple[bytes, list[int]]:
        """The file, and how many packets each frame's encode call gave back."""
        buffer, emitted = io.BytesIO(), []
        with av.open(buffer, "w", format=container, container_options={"fflags": "+bitexact"}) as out:
            stream = out.add_stream(codec, rate=16, options=options)
            stream.height, stream.width, stream.pix_fmt = *rgb.shape[1:3], pix_fmt
            for frame in [*np.concatenate([rgb, alpha[..., None]], axis=-1), None]:  # None: the clip's end
                got = stream.encode(None if frame is None else av.VideoFrame.from_ndarray(frame, format="rgba"))
                emitted += [] if frame is None else [len(got)]
                for packet in got:
                    out.mux(packet)
        return buffer.getvalue(), emitted

    ours, emitted = encoded(options, alpha)
    assert emitted == [1] * len(rgb)  # one packet per frame, at once
    theirs, held = encoded({k: v for k, v in options.items() if k != "lag-in-frames"}, alpha)
    assert sum(held[:20]) == 0  # libvpx's default lag: the first frames' packets wait
    assert ours == theirs
    assert encoded(options, 255 - alpha)[0] != ours  # the alpha plane is in these bytes
