"""Run the `wanalpha` command line in fresh processes without paying its imports each time.

Most of the suite's time went on starting `wanalpha` as a subprocess: Python, then torch, peft and the rest of what
a command imports, seconds per run on a 2-core machine, over a hundred runs. Here one helper process (the zygote)
imports those third-party packages once and forks a child per run: the child is a new process with its own pid,
working directory, environment, stdin/stdout/stderr and exit code, which imports wanalpha afresh (nothing of
wanalpha is imported before the fork, so whatever it reads at import — the environment included — is the run's own)
and calls the console script's function (`wanalpha.cli:main`) with the run's arguments. It exits as the interpreter
would: an uncaught exception prints its traceback and exits 1; SystemExit's code is the exit code; non-daemon threads
are waited for and atexit handlers run.

The zygote runs no torch operation before forking (importing is not running); numpy's BLAS starts one thread at
import, whose library handles fork (as in PyTorch's DataLoader, which forks its workers from such processes). A run
that raises or times out in the caller kills the zygote and its child (their process group); the next run starts a
new one. `WANALPHA_TEST_EXEC=1` runs every command as a plain subprocess of the console script instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
from multiprocessing.connection import Connection

# What a command imports that costs time and reads nothing of the run's environment at import: torch (its thread
# count is set per run: wanalpha.threads.configure), and the torch modules that peft's import pulls in (peft itself,
# accelerate and transformers import huggingface_hub, which reads HF_HOME & co. at import: the child imports them).
PRELOAD = (
    "numpy",
    "torch",
    "torch._dynamo",
    "torch.distributed.tensor",
    "safetensors.torch",
    "pydantic",
    "typer",
    "rich",
    "yaml",
    "av",
    "PIL.Image",
)


def _exit_code(code) -> int:
    """SystemExit's code as the interpreter turns it into a process exit status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _child(program: str, args: list[str], cwd: str, env: dict[str, str], out: int, err: int) -> None:
    """In the forked child: become the run, then leave with its exit code (never returns)."""
    code = 1
    try:
        import random

        random.seed()  # the zygote's state is every child's: draw a fresh one, as a new interpreter does
        null = os.open(os.devnull, os.O_RDONLY)
        for fd, target in ((null, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = [program, *args]
        try:
            if "numpy" in sys.modules:
                sys.modules["numpy"].random.seed()
            from wanalpha.cli import main

            code = _exit_code(main())  # the console script: sys.exit(main())
        except SystemExit as stop:
            code = _exit_code(stop.code)
        except BaseException:  # noqa: BLE001 - the interpreter's own handling of an uncaught exception
            import traceback

            traceback.print_exc()
            code = 1
        import atexit
        import threading

        if hasattr(threading, "_shutdown"):
            threading._shutdown()  # non-daemon threads are waited for, as at interpreter exit
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed stream: nothing to flush
                stream.flush()
        os._exit(code)


def _serve(fd: int) -> None:
    """The zygote: preload, then one forked child per request, answered with its exit code."""
    import importlib
    import time
    import warnings

    warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001, S112 - not installed here: the child imports what it needs
            continue
    conn = Connection(fd)
    while True:
        try:
            program, args, cwd, env, out_path, err_path, timeout = conn.recv()
        except (EOFError, OSError):
            return
        out = os.open(out_path, os.O_WRONLY)
        err = os.open(err_path, os.O_WRONLY)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            conn.close()
            _child(program, args, cwd, env, out, err)
        os.close(out)
        os.close(err)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                status = None
                break
            time.sleep(0.005)
        conn.send(None if status is None else os.waitstatus_to_exitcode(status))


class Zygote:
    """The helper process, started on first use; `run` is subprocess.run's answer for `program args`."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = dict(env)  # the zygote's own environment: the session's, before any test changed it
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            code = "import sys; sys.path[:0] = sys.argv[2:]; from cli_runner import _serve; _serve(int(sys.argv[1]))"
            path = [os.path.dirname(os.path.abspath(__file__)), *sys.path]
            self._process = subprocess.Popen(
                [sys.executable, "-c", code, str(theirs.fileno()), *path],
                pass_fds=[theirs.fileno()],
                env=self._env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: killed whole (with the child) when a run goes wrong
            )
        self._conn = Connection(ours.detach())

    def run(
        self, program: str, args: list[str], cwd: str, env: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess:
        if self._process is None or self._process.poll() is not None:
            self._start()
        with tempfile.TemporaryDirectory() as folder:
            out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
            for path in (out, err):
                open(path, "w").close()
            try:
                self._conn.send((program, args, cwd, env, out, err, timeout))
                code = self._conn.recv()
            except BaseException:  # interrupted, or the zygote died: no state of it can be trusted
                self.kill()
                raise
            with open(out, encoding="utf-8", errors="replace") as f, open(err, encoding="utf-8", errors="replace") as g:
                stdout, stderr = f.read(), g.read()
        if code is None:
            raise subprocess.TimeoutExpired([program, *args], timeout, stdout, stderr)
        return subprocess.CompletedProcess([program, *args], code, stdout, stderr)

    def kill(self) -> None:
        """End the zygote and any child of it now (their process group)."""
        import signal

        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
