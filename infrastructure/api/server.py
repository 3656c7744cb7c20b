"""Several API processes behind granian (its HTTP handling is compiled, so a request costs
the API process less Python than through gunicorn): a Python process runs one command at a
time (the GIL), so throughput grows with processes, not threads. Each process builds its
own application after the fork.

The followers of the log (the read models', the feed's) run in one process of their own
beside the workers: in a worker they would take the GIL from its requests for every event,
and every worker's followers would queue on the same position rows to do the work once.
The master starts it, starts it again if it ends, and stops it on the way out; the
follower and the workers end by themselves if the master dies."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any

from infrastructure.store.settings import Settings

FOLLOWER = [sys.executable, "-m", "infrastructure.cli", "projections", "follow"]
RESTART_AFTER = 2.0  # seconds between a follower's end and its next start
log = logging.getLogger("trialog.server")


def _end_with_parent() -> None:
    """In the follower's process before it runs: SIGTERM when the master dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the master's on_exit still stops it


# Held while the follower's process is started. Popen waits for the new process to exec on
# a pipe that only closes when every copy of its write end is closed; a worker the master
# forked meanwhile would keep a copy for its whole life, and the follower would never be
# seen to start (nor, after its end, to be started again). So the master does not fork
# while the lock is held: a fork of this process takes it first.
_STARTING = threading.RLock()


@functools.cache  # once per process
def _guard_forks() -> None:
    os.register_at_fork(before=_STARTING.acquire, after_in_parent=_STARTING.release,
                        after_in_child=_STARTING.release)


class _Follower:
    """The follower process, kept running by a thread of the master until ``stop``."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.process: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._keep, name="follower-keeper", daemon=True).start()

    def _keep(self) -> None:
        _guard_forks()
        while not self.stopping.is_set():
            with self.lock:
                if self.stopping.is_set():
                    return
                with _STARTING:
                    self.process = subprocess.Popen(FOLLOWER, preexec_fn=_end_with_parent)  # noqa: PLW1509
            code = self.process.wait()  # 0 when the master's server collected it first
            if not self.stopping.is_set():
                log.error("the followers' process ended (exit code %s); starting it again",
                          code)
                self.stopping.wait(RESTART_AFTER)

    def stop(self) -> None:
        with self.lock:
            self.stopping.set()
            process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def application() -> Any:
    """One worker's WSGI application, built in the worker once it has started."""
    _end_with_parent()
    from infrastructure.api import create_app
    from infrastructure.store.bootstrap import bootstrap

    return create_app(bootstrap(Settings.from_env()), follow=False)


# granian's own lines (a worker's start or end, a failure) go to trialog's JSON log.
_LOGGING = {"version": 1, "disable_existing_loggers": False,
            "formatters": {"json": {"()": "infrastructure.logs.JsonFormatter"}},
            "handlers": {"json": {"class": "logging.StreamHandler", "formatter": "json",
                                  "stream": "ext://sys.stderr"}},
            "loggers": {"_granian": {"handlers": ["json"], "propagate": False},
                        "granian.access": {"handlers": [], "propagate": False}}}


def serve_processes(host: str, port: int, workers: int, threads: int, follow: bool) -> None:
    from granian.constants import Interfaces
    from granian.server import Server

    server = Server(f"{__name__}:application", address=host, port=port,
                    interface=Interfaces.WSGI, workers=workers, blocking_threads=threads,
                    websockets=False, factory=True, respawn_failed_workers=True,
                    log_dictconfig=_LOGGING,
                    workers_kill_timeout=30)
    follower = _Follower()
    if follow:
        follower.start()
    try:
        server.serve()
    finally:
        follower.stop()
