"""The command line (or any function of Trialog's) run in a process of its own, as a user
runs it, but forked from a server process that has imported Trialog once
(`multiprocessing`'s forkserver): starting Python and importing the stack costs about two
seconds a run, a fork a few milliseconds.

Each run gets its own environment, folder and standard streams (files, as a shell's
redirections give them), and its exit code is the process's. What needs the process as
started from the shell (signals to its group, a pipe or a full disk as its output, the
import's own processes) runs `python -m infrastructure.cli` instead.
"""

from __future__ import annotations

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


def _write_all(fd: int, data: bytes) -> None:
    try:
        with open(fd, "wb") as pipe:
            pipe.write(data)
    except BrokenPipeError:  # the command stopped reading
        pass


def _main(args: list[str], cwd: str, env: dict[str, str], files: list[str],
          stdin: str | None) -> None:
    os.environ.clear()
    os.environ.update(env)
    time.tzset()
    os.chdir(cwd)
    for fd, path, flags in zip((0, 1, 2), files, (os.O_RDONLY, *[os.O_WRONLY | os.O_CREAT] * 2),
                               strict=True):
        opened = os.open(path, flags, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    if stdin is not None:  # a pipe, as `subprocess.run(input=...)` gives
        read, write = os.pipe()
        os.dup2(read, 0)
        os.close(read)
        threading.Thread(target=_write_all, args=(write, stdin.encode()), daemon=True).start()
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own streams
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace",  # noqa: SIM115
                      closefd=False)
    sys.argv = ["trialog", *args]
    from infrastructure.cli import main

    sys.exit(main(args))
