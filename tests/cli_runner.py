"""The command line (or any function of Trialog's) run in a process of its own, as a user
runs it, but forked from a server process that has imported Trialog once
(`multiprocessing`'s forkserver): starting Python and importing the stack costs about two
seconds a run, a fork a few milliseconds.

Each run gets its own environment, folder and standard streams (files, as a shell's
redirections give them, or a pipe for its input), and its exit code is the process's; it
ends as the interpreter ends (objects collected, atexit functions run). What only an
interpreter started for the run has is not tested this way: its imports, its hash seed
(every run shares the server's) and the settings read as Python starts (`PYTHON*`, the
locale: the server's, from the tests' environment). What needs the process as started from
the shell (signals to its group, a pipe or a full disk as its output, the module run as
`python -m infrastructure.cli`) is started so (`test_cli`).
"""

from __future__ import annotations

import atexit
import gc
import io
import locale
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["infrastructure.cli"])


def run_cli(args: Sequence[str], cwd: Path | str, env: Mapping[str, str], *,
            stdin: str | None = None, timeout: float = 240,
            ) -> subprocess.CompletedProcess[str]:
    """``trialog args`` in ``cwd`` with exactly ``env``, as ``subprocess.run(...,
    capture_output=True, text=True)`` answers it; ``stdin`` is its input, through a pipe
    (else the null device)."""
    with tempfile.TemporaryDirectory(prefix="trialog-cli-") as streams:
        files = [os.devnull, *(os.path.join(streams, name) for name in ("out", "err"))]
        for made in files[1:]:  # there even if the run fails before it writes
            Path(made).touch()
        process = forked(_main, list(args), str(cwd), dict(env), files, stdin)
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["trialog", *args], timeout,
                                            Path(files[1]).read_bytes(),
                                            Path(files[2]).read_bytes())
        return subprocess.CompletedProcess(["trialog", *args], process.exitcode,
                                           _text(files[1]), _text(files[2]))


def forked(target: Callable[..., object], *args: object) -> multiprocessing.Process:
    """``target(*args)`` started in a process forked from the same server (Trialog imported:
    processes meant to race start within milliseconds of each other, not seconds)."""
    process = _CONTEXT.Process(target=target, args=args)
    process.start()
    return process


def _text(path: str) -> str:
    """A captured stream as ``text=True`` reads it (the locale's encoding, newlines
    made ``\\n``)."""
    data = Path(path).read_bytes()
    return io.TextIOWrapper(io.BytesIO(data), encoding=locale.getpreferredencoding(False)).read()


def _main(args: list[str], cwd: str, env: dict[str, str], files: list[str],
          stdin: str | None) -> None:
    os.environ.clear()
    os.environ.update(env)
    time.tzset()
    os.chdir(cwd)
    for fd, path, flags in zip((0, 1, 2), files, (os.O_RDONLY, os.O_WRONLY, os.O_WRONLY),
                               strict=True):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    if stdin is not None:  # a pipe, as `subprocess.run(input=...)` gives
        _pipe_in(stdin.encode())
    gc.freeze()  # the server's own objects are not this run's to finalise
    # The streams as the interpreter opens them: its error handler for the locale (the
    # server's: C.UTF-8's `surrogateescape`), newlines as they are, stderr a line at a
    # time, both written through under PYTHONUNBUFFERED.
    errors = getattr(sys.__stdout__, "errors", None) or "strict"
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    sys.stdin = open(0, newline="\n", errors=errors, closefd=False)  # noqa: SIM115
    sys.stdout = _written(1, errors, unbuffered, line_buffering=False)
    sys.stderr = _written(2, "backslashreplace", unbuffered, line_buffering=not unbuffered)
    sys.argv = ["trialog", *args]
    from infrastructure.cli import main

    try:
        code = main(args)
    finally:
        _as_the_interpreter_ends()
    sys.exit(code)


def _written(fd: int, errors: str, unbuffered: bool, *, line_buffering: bool) -> io.TextIOWrapper:
    raw = open(fd, "wb", buffering=0 if unbuffered else -1, closefd=False)  # noqa: SIM115
    return io.TextIOWrapper(raw, errors=errors, newline="\n", line_buffering=line_buffering,
                            write_through=unbuffered)


def _as_the_interpreter_ends() -> None:
    """What the interpreter does at its exit, which a child of multiprocessing skips (it
    ends with os._exit): threads waited for, the atexit functions run, objects collected
    (SQLite's last connection checkpoints its write-ahead log and removes it). Objects a
    module still holds are not finalised, as the interpreter's own end would."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    gc.collect()


def _pipe_in(data: bytes) -> None:
    """Standard input a pipe that a process of its own writes ``data`` into (a thread
    would be seen by the command: with threads running, the import forks no pool)."""
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        try:
            with open(write, "wb") as pipe:
                pipe.write(data)
        except BrokenPipeError:  # the command stopped reading
            pass
        finally:
            os._exit(0)
    os.close(write)
    os.dup2(read, 0)
    os.close(read)
