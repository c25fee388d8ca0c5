"""Every output file of one generated clip, written while the decoders are still producing its frames.

    with ClipWriter(Path("out/output"), fps=16, formats=["webm", "mov"]) as clip:
        for rgb, alpha in chunks:            # (t,H,W,3) and (t,H,W) uint8, in frame order
            clip.add(rgb, alpha)
        files = clip.close()

Each video file has an encoder thread of its own fed through a queue (H.264 RGB, alpha and checkerboard composite
mp4s, then the alpha containers), and the RGBA PNG frames go to a pool of threads; the encoders and PNG compression
run outside Python's lock, so the files are mostly written by the time the last chunk is decoded. Every file
appears whole under its name or not at all (temporary name, then rename); leaving the `with` block by an error or
Ctrl-C stops the writers and removes what they had not finished.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from wanalpha.data.checker import checker_composite
from wanalpha.errors import WanAlphaError

FORMAT_SUFFIX = {"webm": ".webm", "mov": ".mov", "webp": ".webp", "apng": ".apng"}
_DONE = object()


def _png(path: Path, rgb: np.ndarray, alpha: np.ndarray) -> None:
    from wanalpha.data.video import write_image

    write_image(path, np.concatenate([rgb, alpha[..., None]], axis=-1))


class _EncoderThread:
    """One VideoEncoder on a thread of its own, fed (rgb, alpha) chunks through a queue; `frames` turns a chunk into
    the encoder's frames."""

    def __init__(self, encoder, frames, stop: threading.Event) -> None:
        self.encoder, self.frames, self.stop = encoder, frames, stop
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"write {encoder.path.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while (item := self.queue.get()) is not _DONE:
                if self.stop.is_set():
                    break
                self.encoder.write(self.frames(*item))
            if self.stop.is_set():
                self.encoder.abort()
            else:
                self.encoder.close()
        except BaseException as error:  # noqa: BLE001 - handed to the feeding thread by ClipWriter
            self.error = error
            self.encoder.abort()


class ClipWriter:
    """The files of one clip (see the module): {stem}_rgb.mp4, {stem}_alpha.mp4, {stem}_composite.mp4,
    {stem}_rgba_frames/00000.png…, then {stem}.webm / .mov / .webp / .apng for `formats`."""

    def __init__(self, stem: Path, fps: float, formats: list[str], png_workers: int | None = None) -> None:
        from wanalpha.data.video import h264_encoder, rgba_encoder, rgba_frames

        stem = Path(stem)
        named = stem.with_name
        self.folder = named(stem.name + "_rgba_frames")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()
        self._frames = 0
        self._pngs: list[Future] = []
        self._pool = ThreadPoolExecutor(
            max_workers=png_workers or min(8, os.cpu_count() or 1), thread_name_prefix="write png"
        )
        self._closed = False
        self._encoders: list[_EncoderThread] = []
        outputs = [
            (named(stem.name + "_rgb.mp4"), None, lambda rgb, alpha: rgb),
            (named(stem.name + "_alpha.mp4"), None, lambda rgb, alpha: alpha),
            (named(stem.name + "_composite.mp4"), None, checker_composite),
        ]
        outputs += [(named(stem.name + FORMAT_SUFFIX[fmt]), fmt, rgba_frames) for fmt in formats]
        try:  # a failure part way (an unwritable folder, a missing codec) undoes what was set up
            for path, fmt, frames in outputs:
                encoder = h264_encoder(path, fps) if fmt is None else rgba_encoder(path, fps, fmt)
                try:
                    self._encoders.append(_EncoderThread(encoder, frames, self._stop))
                except BaseException:
                    encoder.abort()
                    raise
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> ClipWriter:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            self.abort()
        elif not self._closed:  # left without close(): finish the files
            self.close()

    def _raise_first_error(self) -> None:
        for writer in self._encoders:
            if writer.error is not None:
                raise writer.error
        for future in self._pngs:
            if future.done() and future.exception() is not None:
                raise future.exception()

    def add(self, rgb: np.ndarray, alpha: np.ndarray) -> None:
        """The next frames, in order: rgb (t,H,W,3) and alpha (t,H,W) uint8 (not modified afterwards)."""
        if self._closed or self._stop.is_set():
            raise WanAlphaError(f"{self.folder.parent}: frames added to a clip already closed or aborted")
        if rgb.dtype != np.uint8 or alpha.dtype != np.uint8 or rgb.shape[:3] != alpha.shape or rgb.shape[-1] != 3:
            raise ValueError(f"expected uint8 rgb (t,H,W,3) and alpha (t,H,W), got {rgb.shape} and {alpha.shape}")
        self._raise_first_error()  # a failed writer stops the clip early
        for writer in self._encoders:
            writer.queue.put((rgb, alpha))
        for frame, a in zip(rgb, alpha, strict=True):
            self._pngs.append(self._pool.submit(_png, self.folder / f"{self._frames:05d}.png", frame, a))
            self._frames += 1

    def close(self) -> list[Path]:
        """Wait for every file; returns the mp4s, the PNG folder, then the alpha containers. Raises the first
        writer's error (the files that did finish stay)."""
        if self._stop.is_set():
            raise WanAlphaError(f"{self.folder.parent}: this clip's writing was aborted; nothing to close")
        self._closed = True
        for writer in self._encoders:
            writer.queue.put(_DONE)
        for writer in self._encoders:
            writer.thread.join()
        self._pool.shutdown(wait=True)
        self._raise_first_error()
        paths = [writer.encoder.path for writer in self._encoders]
        return paths[:3] + [self.folder] + paths[3:]

    def abort(self) -> None:
        """Stop every writer and remove the files they had not finished (queued chunks are dropped), and the PNG
        folder if no frame reached it."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if not self._closed:
            self._closed = True
            for writer in self._encoders:
                writer.queue.put(_DONE)
        for writer in self._encoders:
            writer.thread.join()
        with contextlib.suppress(OSError):  # not empty: the finished frames stay
            self.folder.rmdir()


def _serve(conn) -> None:
    """The child of ProcessClipWriter: a ClipWriter fed over `conn`. Messages in: ("open", stem, fps, formats,
    png_workers) first, then ("frames", shape) followed by the rgb and alpha bytes, then ("close",); out: ("ready",),
    then ("files", paths) or ("error", exception). Ctrl-C is the parent's to handle (the child runs in a session of
    its own; the parent's abort kills it); a parent that goes away aborts it (its end of the socket closes)."""
    try:
        _, stem, fps, formats, png_workers = conn.recv()
        writer = ClipWriter(Path(stem), fps, formats, png_workers)
    except BaseException as error:  # noqa: BLE001 - handed to the parent
        with contextlib.suppress(OSError):
            conn.send(("error", _portable(error)))
        return
    try:
        conn.send(("ready",))
        while True:
            message = conn.recv()
            if message[0] == "frames":
                t, h, w = message[1]
                rgb = np.empty((t, h, w, 3), np.uint8)
                alpha = np.empty((t, h, w), np.uint8)
                conn.recv_bytes_into(rgb.reshape(-1))  # 1-D: the buffer's length is its byte count
                conn.recv_bytes_into(alpha.reshape(-1))
                writer.add(rgb, alpha)
            else:  # ("close",)
                conn.send(("files", [str(p) for p in writer.close()]))
                return
    except BaseException as error:  # noqa: BLE001 - a failed writer, or the parent gone (EOFError)
        writer.abort()
        with contextlib.suppress(OSError):
            conn.send(("error", _portable(error)))


def _child(fd: int) -> None:
    """The writer process's program (`python -c`, WriterProcess): import the writers' modules while no clip is asked
    for yet (the process may be started ahead of its clip), then serve the parent over the socket `fd`."""
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    try:
        with contextlib.suppress(Exception):  # a failing import fails the clip's set-up again, with its own error
            import av  # noqa: F401

            import wanalpha.data.video  # noqa: F401
        _serve(conn)
    finally:
        conn.close()


def _portable(error: BaseException) -> BaseException:
    """The error itself where it survives pickling (OSError, VideoError, …), else a WanAlphaError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any pickling failure
        return WanAlphaError(f"{type(error).__name__}: {error}")


class WriterProcessUnavailable(WanAlphaError):
    """No child process could be started for ProcessClipWriter (nothing was written)."""


_CHILD_PROGRAM = (
    "import sys; sys.path[:0] = sys.argv[2:]; from wanalpha.outputs import _child; _child(int(sys.argv[1]))"
)


class WriterProcess:
    """A writer process for one clip, started before the clip is known: a fresh `python -c` (ProcessClipWriter's
    child) that imports the writers' modules, PyAV's included, and then waits for its clip. Started while the GPU
    samples (generate), its start (0.3–0.5 s on an H100 host, docs/benchmarks.md) no longer delays the encoders once
    the first frames are decoded. ProcessClipWriter takes it (`take`); one never taken is ended by `close` (it sees
    its input end and exits). Raises WriterProcessUnavailable where no process can be started (limits, memory)."""

    def __init__(self) -> None:
        import socket
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        try:
            ours, theirs = socket.socketpair()
            with theirs:
                self._process = subprocess.Popen(
                    [sys.executable, "-c", _CHILD_PROGRAM, str(theirs.fileno()), *sys.path],
                    pass_fds=[theirs.fileno()],
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # Ctrl-C reaches the parent only, which aborts the child
                )
        except OSError as error:  # no process could be made: the caller may write in-process
            with contextlib.suppress(NameError):
                ours.close()
            raise WriterProcessUnavailable(f"cannot start a writer process ({error})") from error
        self._conn = Connection(ours.detach())
        self._taken = False

    def take(self) -> tuple:
        """The process and its connection, for the one writer that uses them."""
        if self._taken:
            raise WanAlphaError("this writer process was taken or closed already")
        self._taken = True
        return self._process, self._conn

    def running(self) -> bool:
        """Whether it waits for its clip: not taken or closed, and not ended."""
        return not self._taken and self._process.poll() is None

    def close(self) -> None:
        """End the process if no writer took it (a taken one is its writer's to end)."""
        import subprocess

        if self._taken:
            return
        self._taken = True
        self._conn.close()
        try:
            self._process.wait(timeout=60)  # it ends once its imports are done (as _finish waits for a writer's)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> WriterProcess:
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.close()


class ProcessClipWriter:
    """ClipWriter's files written by a child process: the same files, names, order and guarantees (whole files or
    none; an error or Ctrl-C removes what was not finished), with the encoders and PNG compression off this
    process's interpreter. generate uses it while the decoders run on a GPU: there the writer threads' share of
    Python's lock held up the thread that launches the decoders' kernels (docs/benchmarks.md).

    The child is a fresh `python -c` that imports this module alone (not the parent's main module, as
    multiprocessing's spawn would: a command's import of torch and the CLI, seconds), in a session of its own. It
    starts without being waited for: frames travel through a socket (a few MB a chunk), sent by a thread of their
    own once the child is ready, so neither the constructor nor `add` waits on it. An error of the child, its
    set-up's included, is raised by the next `add` after it or by `close`. `process`: one started ahead
    (WriterProcess), else it starts its own."""

    def __init__(
        self,
        stem: Path,
        fps: float,
        formats: list[str],
        png_workers: int | None = None,
        process: WriterProcess | None = None,
    ) -> None:
        stem = Path(stem)
        self.folder = stem.with_name(stem.name + "_rgba_frames")
        self._dir = stem.parent
        self._process, self._conn = (process or WriterProcess()).take()
        with contextlib.suppress(OSError):  # a child started ahead that has ended: the sender's read says so
            self._conn.send(("open", str(stem), fps, list(formats), png_workers))  # buffered: read first
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._failed: BaseException | None = None  # the child's set-up error, or a failed send
        self._ready = threading.Event()  # the child's "ready" was read (by the sender): later replies are errors
        self._closed = self._aborted = False
        self._sender = threading.Thread(target=self._send, name=f"send {stem.name}", daemon=True)
        self._sender.start()

    def __enter__(self) -> ProcessClipWriter:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            self.abort()
        elif not self._closed:
            self.close()

    def _receive(self) -> tuple:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            import subprocess

            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)  # its end of the socket closes as it exits: its code in a moment
            code = self._process.returncode
            return ("error", WanAlphaError(f"{self._dir}: the writer process ended unexpectedly (exit code {code})"))

    def _send(self) -> None:
        try:
            reply = self._receive()
            if reply[0] != "ready":
                self._failed = self._failure(reply)
                return
            self._ready.set()
            while (item := self._outbox.get()) is not _DONE:
                rgb, alpha = item
                self._conn.send(("frames", alpha.shape))
                self._conn.send_bytes(rgb.reshape(-1))  # 1-D: a buffer's length is its first dimension
                self._conn.send_bytes(alpha.reshape(-1))
        except BaseException as error:  # noqa: BLE001 - the child has gone (its reply says why)
            self._failed = error

    def _stop_sending(self) -> None:
        """No more frames: the sender sends what is queued and ends."""
        self._closed = True
        self._outbox.put(_DONE)
        self._sender.join()

    def _failure(self, reply: tuple) -> BaseException:
        return reply[1] if reply[0] == "error" else WanAlphaError(f"{self._dir}: the writer process stopped")

    def _reply(self) -> tuple:
        """The child's answer after the frames: its set-up's error where it never became ready, else the next
        message."""
        if not self._ready.is_set():
            return ("error", self._failed)
        if self._failed is not None and not self._conn.poll(5):  # a send failed with the child alive, mid-message
            self._process.kill()
            return ("error", self._failed)
        return self._receive()

    def _check(self) -> None:
        if self._failed is not None or (self._ready.is_set() and self._conn.poll()):
            self._stop_sending()
            reply = self._reply()
            self._finish()
            raise self._failure(reply)

    def add(self, rgb: np.ndarray, alpha: np.ndarray) -> None:
        """The next frames, in order: rgb (t,H,W,3) and alpha (t,H,W) uint8 (not modified afterwards)."""
        if self._closed:
            raise WanAlphaError(f"{self._dir}: frames added to a clip already closed or aborted")
        if rgb.dtype != np.uint8 or alpha.dtype != np.uint8 or rgb.shape[:3] != alpha.shape or rgb.shape[-1] != 3:
            raise ValueError(f"expected uint8 rgb (t,H,W,3) and alpha (t,H,W), got {rgb.shape} and {alpha.shape}")
        self._check()  # a failed writer stops the clip early
        self._outbox.put((np.ascontiguousarray(rgb), np.ascontiguousarray(alpha)))

    def close(self) -> list[Path]:
        """Wait for every file; returns them as ClipWriter.close does, or raises the first writer's error."""
        if self._closed:
            raise WanAlphaError(f"{self._dir}: this clip's writing was closed or aborted already")
        self._stop_sending()
        if self._ready.is_set() and self._failed is None:
            with contextlib.suppress(OSError):
                self._conn.send(("close",))
        reply = self._reply()
        self._finish()
        if reply[0] != "files":
            raise self._failure(reply)
        return [Path(p) for p in reply[1]]

    def abort(self) -> None:
        """Stop the child and remove what its writers had not finished (queued frames are dropped; finished files
        stay, as ClipWriter.abort leaves them). The child is killed, not asked: abort may interrupt the sender or a
        close mid-message (Ctrl-C), where the pipe's protocol cannot be trusted, and a child inside its close would
        not read a request before its files were done. Its unfinished files are named with its pid (_finish)."""
        if self._aborted:
            return
        self._aborted = self._closed = True
        with contextlib.suppress(queue.Empty):
            while True:
                self._outbox.get_nowait()
        self._outbox.put(_DONE)
        if self._process.poll() is None:
            self._process.kill()  # the sender's wait or send then ends (the child's end of the socket is gone)
        self._sender.join()
        self._finish()

    def _finish(self) -> None:
        """Reap the child; one that does not end is stopped, and its temporary files (named with its pid: the
        clip's files beside the stem, the PNGs in the frames folder) go, and the frames folder if it is empty."""
        import subprocess

        self._conn.close()  # a child still reading sees the end of its input and aborts
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._process.returncode != 0:
            for folder in (self._dir, self.folder):
                for leftover in folder.glob(f".*.{self._process.pid}-*.tmp*"):
                    leftover.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # not empty: the finished frames stay
                self.folder.rmdir()
