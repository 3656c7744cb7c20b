"""The API master's keeper of the followers' process (`trialog serve --workers N`)."""

from __future__ import annotations

import os
import signal
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
    import subprocess

    started = subprocess.run([sys.executable, "-c", (
        "import os\n"
        "from infrastructure.api import server\n"
        "server._MASTER = os.getppid() + 1_000_000  # not this process's parent\n"
        "server.application()\n"
        "print('built')\n")], capture_output=True, text=True, timeout=60, check=False)
    assert started.returncode == 0, started.stderr
    assert "built" not in started.stdout
