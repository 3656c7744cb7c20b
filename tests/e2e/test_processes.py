"""`trialog serve --workers N`: gunicorn's workers answer, and the followers of the log run
in one process of their own beside them, started and stopped with them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

from infrastructure.store.bootstrap import bootstrap
from infrastructure.store.tokens import create_token
from tests.conftest import TEST_SECRETS, settings_for
from tests.databases import PG_SERVER, fresh_postgres_database
from tests.e2e import payloads as p
from tests.e2e.conftest import TRIALOG, Client, free_port, wait_until_up


def _children(pid: int) -> list[tuple[int, str]]:
    """The processes whose parent is `pid`, with their whole command lines, read from /proc
    (`ps` cuts its lines at $COLUMNS, which the suite may be run with)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            if parent != pid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                args = cmdline.read().rstrip(b"\0").replace(b"\0", b" ").decode()
        except OSError:
            continue  # it ended while we looked, or is not ours to read
        found.append((int(entry), args))
    return found


def test_children_are_seen_with_their_whole_command_lines(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    tail = "x" * 200
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", tail])
    try:
        deadline = time.monotonic() + 10
        while not (args := dict(_children(os.getpid())).get(child.pid, "")).endswith(tail):
            assert time.monotonic() < deadline, f"not the whole command line: {args!r}"
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_answer_and_one_follower_process_keeps_the_read_models(tmp_path):
    with fresh_postgres_database("trialog") as name:
        url = f"{PG_SERVER}/{name}"
        t = bootstrap(settings_for(url), migrate=True)
        token = create_token(t.engine, f"procs-{uuid.uuid4().hex[:6]}", "admin")
        t.close()
        port, log = free_port(), tmp_path / "serve.log"
        runtime_dir = tmp_path / "run"  # where gunicorn would put a control socket
        runtime_dir.mkdir()
        env = {**os.environ, "TRIALOG_DATABASE_URL": url, "XDG_RUNTIME_DIR": str(runtime_dir),
               **TEST_SECRETS}
        with open(log, "w") as out:
            server = subprocess.Popen([TRIALOG, "serve", "--port", str(port), "--workers", "2"],
                                      env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until_up(base, server, log)
            # the master answers once it listens; its workers and the follower's process
            # (forked, then exec'd as `projections follow`) may still be starting
            deadline = time.monotonic() + 20
            while True:
                children = _children(server.pid)
                followers = [pid for pid, args in children if "projections follow" in args]
                if len(followers) == 1 and len(children) == 3:  # two workers, one follower
                    break
                assert time.monotonic() < deadline, f"the processes did not start: {children}"
                time.sleep(0.1)
            # no control socket: a path per user, which a second server on the machine
            # would take over, for an interface trialog doesn't use
            assert list(runtime_dir.iterdir()) == []
            admin = Client(base, token)
            pid = p.participant_id("CASE")
            answer = admin.command("ScreenParticipant", pid, p.screening("CASE"))
            assert answer.status_code == 201, answer.text
            deadline = time.monotonic() + 20
            while pid not in {row["participant_id"] for row in
                              admin.get("/v1/participants").json()["participants"]}:
                assert time.monotonic() < deadline, "the read models did not catch up"
                time.sleep(0.1)
            feed = admin.get("/v1/feed", params={"after": 0, "limit": 1000}).json()
            assert pid in {event["subject"] for event in feed["events"]}
            os.kill(followers[0], signal.SIGKILL)  # the followers' process dies: started again
            deadline = time.monotonic() + 20
            while not (again := [pid for pid, args in _children(server.pid)
                                 if "projections follow" in args and pid != followers[0]]):
                assert time.monotonic() < deadline, "the followers were not started again"
                time.sleep(0.2)
            followers = again
        finally:
            server.terminate()
            server.wait(30)
        assert not _alive(followers[0])  # stopped with the workers
