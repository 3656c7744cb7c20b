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


def _end_with_parent(parent: int | None = None, signum: int = signal.SIGTERM) -> None:
    """In a worker's or the follower's process before it runs: ``signum`` when the master
    dies (Linux); given the master's pid, an end at once if it died before this call."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signum)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the master still stops them on its way out
    if parent is not None and os.getppid() != parent:
        os._exit(0)  # nothing would stop this process


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
                    ends = functools.partial(_end_with_parent, os.getpid())
                    self.process = subprocess.Popen(FOLLOWER, preexec_fn=ends)  # noqa: PLW1509
            code = self.process.wait()
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


MASTER_VARIABLE = "TRIALOG_SERVE_MASTER"  # the serving master's pid, for its workers


def application() -> Any:
    """One worker's WSGI application, built in the worker once it has started."""
    from infrastructure.api import create_app
    from infrastructure.logs import configure_logging
    from infrastructure.store.bootstrap import bootstrap

    # Until the application is built, granian's worker keeps the handlers it inherited from
    # the master, which only note a stop: a SIGTERM now (the master stopping, or dying)
    # ends the worker at once instead.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    master = os.environ.get(MASTER_VARIABLE)
    # A master that dies ends its workers with SIGKILL, not SIGTERM: granian's graceful
    # stop of a worker is the master's to bound (it kills a worker still stopping after
    # workers_kill_timeout), and without it a stop could wait for ever (seen once, under
    # load). Nothing is lost that a stop would keep: a command cut short is rolled back
    # with its connection, and its client sends it again.
    _end_with_parent(int(master) if master is not None else None, signal.SIGKILL)
    configure_logging()  # the master's, again: a worker not forked would have none
    app = create_app(bootstrap(Settings.from_env()), follow=False)
    app.wsgi_app = _without_process_environment(app.wsgi_app)  # type: ignore[method-assign]
    return app


# Names a request's WSGI environment gives its own meaning (CGI's, and the headers').
_CGI = frozenset({
    "AUTH_TYPE", "CONTENT_LENGTH", "CONTENT_TYPE", "GATEWAY_INTERFACE", "HTTPS",
    "PATH_INFO", "PATH_TRANSLATED", "QUERY_STRING", "RAW_URI", "REMOTE_ADDR", "REMOTE_HOST",
    "REMOTE_IDENT", "REMOTE_USER", "REQUEST_METHOD", "REQUEST_URI", "SCRIPT_NAME",
    "SERVER_NAME", "SERVER_PORT", "SERVER_PROTOCOL", "SERVER_SOFTWARE"})


def _without_process_environment(app: Any) -> Any:
    """``app``, given each request's WSGI environment without the variables granian copies
    into it from the process's environment once the application is built (the database's
    address, the keys): they are not the request's. Variables named as a request's would
    be (``HTTP_...``, CGI's) leave this process's environment first, so that what remains
    to remove can never be one the request set."""
    for key in [key for key in os.environ if key in _CGI or key.startswith("HTTP_")]:
        del os.environ[key]
    inherited = tuple(os.environ)

    def wsgi(environ: dict[str, Any], start_response: Any) -> Any:
        for key in inherited:
            environ.pop(key, None)
        return app(environ, start_response)

    return wsgi


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
    os.environ[MASTER_VARIABLE] = str(os.getpid())  # read by the workers it forks
    follower = _Follower()
    if follow:
        follower.start()
    try:
        server.serve()
    finally:
        follower.stop()
