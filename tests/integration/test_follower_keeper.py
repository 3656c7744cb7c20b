"""The API master's keeper of the followers' process (`trialog serve --workers N`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from infrastructure.api import server


def test_a_fork_of_the_master_while_the_follower_starts_does_not_hold_up_its_start(
        monkeypatch):
    # Popen learns that its process has exec'd when the pipe it made for that closes; the
    # master forks (as granian does when it starts or replaces a worker) just after the
    # keeper made that pipe
    about_to_fork = threading.Event()
    make_pipe = os.pipe

    def pipe_then_let_the_master_fork() -> tuple[int, int]:
        made = make_pipe()
        if threading.current_thread().name == "follower-keeper":
            about_to_fork.set()
            time.sleep(0.3)  # the fork happens now, or waits for the start to be done
        return made

    monkeypatch.setattr(os, "pipe", pipe_then_let_the_master_fork)
    monkeypatch.setattr(server, "FOLLOWER",
                        [sys.executable, "-c", "import time; time.sleep(60)"])
    keeper = server._Follower()
    keeper.start()
    other = None
    try:
        assert about_to_fork.wait(10), "the keeper did not start the follower"
        other = os.fork()
        if other == 0:  # a long-lived copy of the master, like a worker
            time.sleep(30)
            os._exit(0)
        deadline = time.monotonic() + 10
        while keeper.process is None:
            assert time.monotonic() < deadline, "the follower's start waited for the other fork"
            time.sleep(0.05)
        assert keeper.process.poll() is None  # it runs
        assert keeper.process.args == server.FOLLOWER
    finally:
        if other:
            os.kill(other, signal.SIGKILL)
            os.waitpid(other, 0)
        keeper.stop()


def test_a_worker_whose_master_died_before_it_started_ends_at_once():
    # forked by a master that then died: its parent is no longer that master, and the
    # death signal asked for now would never come
    not_the_parent = str(os.getpid() + 1_000_000)
    started = subprocess.run(
        [sys.executable, "-c", ("from infrastructure.api import server\n"
                                "server.application()\n"
                                "print('built')\n")],
        env={**os.environ, server.MASTER_VARIABLE: not_the_parent},
        capture_output=True, text=True, timeout=60, check=False)
    assert started.returncode == 0, started.stderr
    assert "built" not in started.stdout


def test_a_follower_whose_master_died_before_it_asked_for_the_signal_ends_at_once():
    # the keeper starts the follower asking to end with the master whose pid it gives: a
    # parent that is no longer that master died before the signal was asked for
    import functools

    not_the_parent = os.getpid() + 1_000_000
    ends = functools.partial(server._end_with_parent, not_the_parent)
    follower = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                preexec_fn=ends)  # noqa: PLW1509
    try:
        assert follower.wait(timeout=20) == 0
    finally:
        follower.kill()


def test_a_request_environment_keeps_only_the_request_variables(monkeypatch):
    monkeypatch.setattr(os, "environ", {"TRIALOG_SOME_KEY": "secret",  # this test's own
                                         "HTTP_X_REQUEST_ID": "same", "CONTENT_TYPE": "text/plain"})
    seen = []
    wsgi = server._without_process_environment(lambda environ, start: seen.append(environ))
    assert "HTTP_X_REQUEST_ID" not in os.environ and "CONTENT_TYPE" not in os.environ
    # as granian builds each request's environment: the process's, then the request's
    copied = dict(os.environ)
    wsgi(copied | {"REQUEST_METHOD": "GET", "PATH_INFO": "/healthz", "HTTP_HOST": "h"}, None)
    wsgi(copied | {"REQUEST_METHOD": "POST", "PATH_INFO": "/v1/commands", "HTTP_HOST": "h",
                   "HTTP_X_REQUEST_ID": "same", "CONTENT_TYPE": "application/json"}, None)
    bare, sent = seen
    assert bare == {"REQUEST_METHOD": "GET", "PATH_INFO": "/healthz", "HTTP_HOST": "h"}
    assert sent["HTTP_X_REQUEST_ID"] == "same"  # the client's header, equal or not
    assert sent["CONTENT_TYPE"] == "application/json"
    assert "TRIALOG_SOME_KEY" not in sent


WORKER_OF_A_DYING_MASTER = """
import os, signal, time
ready, told = os.pipe()
os.environ["TRIALOG_SERVE_MASTER"] = str(os.getpid())
worker = os.fork()
if worker == 0:
    quiet = os.open(os.devnull, os.O_WRONLY)  # the master's output ends with the master
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    from infrastructure.api import server
    server.application()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a graceful stop that never ends
    os.write(told, b"built")
    time.sleep(120)
    os._exit(0)
os.read(ready, 5)
print(worker, flush=True)
os._exit(0)  # the master dies
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_a_worker_ends_with_its_master_even_if_its_graceful_stop_would_hang(tmp_path):
    """A master that dies ends its workers whatever granian's stop would do: no master is
    left to bound it (seen once: a worker still running a minute after its master)."""
    from tests.conftest import TEST_SECRETS

    env = {**os.environ, **TEST_SECRETS,
           "TRIALOG_DATABASE_URL": f"sqlite:///{tmp_path / 'worker.db'}"}
    master = subprocess.run([sys.executable, "-c", WORKER_OF_A_DYING_MASTER], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    worker = int(master.stdout.split()[0])
    deadline = time.monotonic() + 10
    try:
        while _running(worker):
            assert time.monotonic() < deadline, "the worker outlived its master"
            time.sleep(0.05)
    finally:
        if _running(worker):
            os.kill(worker, signal.SIGKILL)
