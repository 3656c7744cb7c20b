"""Several API processes behind gunicorn: a Python process runs one command at a time
(the GIL), so throughput grows with processes, not threads. Each process builds its own
application after the fork.

The followers of the log (the read models', the feed's) run in one process of their own
beside the workers: in a worker they would take the GIL from its requests for every event,
and every worker's followers would queue on the same position rows to do the work once.
The master starts it once it listens, starts it again if it ends, and stops it on the way
out; the follower ends by itself if the master dies."""

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

from gunicorn.app.base import BaseApplication

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
            code = self.process.wait()  # 0 when gunicorn's master collected it first
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


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, options: dict[str, Any], follow: bool) -> None:
        self.options = options
        self.follow = follow
        self.follower = _Follower()
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)
        if self.follow:
            self.cfg.set("when_ready", lambda server: self.follower.start())
            self.cfg.set("on_exit", lambda server: self.follower.stop())

    def load(self) -> Any:
        from infrastructure.api import create_app
        from infrastructure.store.bootstrap import bootstrap

        return create_app(bootstrap(Settings.from_env()), follow=False)


def serve_processes(host: str, port: int, workers: int, threads: int, follow: bool) -> None:
    # No control socket: it is one path per user (a second server on the machine would take
    # it over), for a run-time interface that trialog doesn't offer.
    options = {"bind": f"{host}:{port}", "workers": workers, "threads": threads,
               "worker_class": "gthread", "accesslog": None, "timeout": 60,
               "control_socket_disable": True}
    _Gunicorn(options, follow).run()
