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
        process = _CONTEXT.Process(target=_main,
                                   args=(list(args), str(cwd), dict(env), files, stdin))
        process.start()
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
    # The streams as the interpreter opens them: the locale's error handler (C.UTF-8's
    # `surrogateescape`), newlines read as they are, stderr a line at a time, stdout
    # written through under PYTHONUNBUFFERED.
    errors = "surrogateescape" if locale.getpreferredencoding(False).lower() in (
        "utf-8", "ascii", "ansi_x3.4-1968") else "strict"
    sys.stdin = open(0, newline="\n", errors=errors, closefd=False)  # noqa: SIM115
    written = open(1, "wb", buffering=0, closefd=False)  # noqa: SIM115
    sys.stdout = io.TextIOWrapper(written, errors=errors,
                                  write_through=bool(env.get("PYTHONUNBUFFERED")))
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace",  # noqa: SIM115
                      closefd=False)
    sys.argv = ["trialog", *args]
    from infrastructure.cli import main

    code = main(args)
    # What the interpreter does at its exit, which a child of multiprocessing skips (it
    # ends with os._exit): objects collected (SQLite's last connection checkpoints its
    # write-ahead log and removes it), then the atexit functions.
    gc.collect()
    atexit._run_exitfuncs()
    sys.exit(code)


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
