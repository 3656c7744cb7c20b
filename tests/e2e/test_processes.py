"""`trialog serve --workers N`: granian's workers answer, and the followers of the log run
in one process of their own beside them, started and stopped with them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from infrastructure.store.bootstrap import bootstrap
from infrastructure.store.tokens import create_token
from tests.conftest import TEST_SECRETS, settings_for
from tests.databases import PG_SERVER, fresh_postgres_database
from tests.e2e import payloads as p
from tests.e2e.conftest import TRIALOG, Client, free_port, wait_until_up


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command's name (state, parent, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ").decode()


def _children(pid: int) -> list[tuple[int, str]]:
    """The processes whose parent is `pid`, with their whole command lines, read from /proc
    (`ps` cuts its lines at $COLUMNS, which the suite may be run with)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if int(_stat(int(entry))[1]) != pid:
                continue
            found.append((int(entry), _cmdline(int(entry))))
        except OSError:
            continue  # it ended while we looked, or is not ours to read
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


def _described(pid: int) -> tuple[int, str, str]:
    """A process's command line and state, for a failure's message."""
    try:
        return (pid, _cmdline(pid), " ".join(_stat(pid)[:6]))
    except OSError as e:
        return (pid, "", str(e))


def _alive(pid: int) -> bool:
    """Running: neither gone nor ended and not yet collected (a zombie)."""
    try:
        return _stat(pid)[0] != "Z"
    except OSError:
        return False


@contextmanager
def _serving(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Client]]:
    """`trialog serve --workers 2` on a fresh database, once a worker answers: the server,
    its address and an admin's client. Its environment holds a variable named as a
    request's header would be in a request's WSGI environment."""
    with fresh_postgres_database("trialog") as name:
        url = f"{PG_SERVER}/{name}"
        t = bootstrap(settings_for(url), migrate=True)
        token = create_token(t.engine, f"procs-{uuid.uuid4().hex[:6]}", "admin")
        t.close()
        port, log = free_port(), tmp_path / "serve.log"
        env = {**os.environ, "TRIALOG_DATABASE_URL": url, **TEST_SECRETS,
               "HTTP_X_REQUEST_ID": "from-the-environment"}
        with open(log, "w") as out:
            server = subprocess.Popen([TRIALOG, "serve", "--port", str(port), "--workers", "2"],
                                      env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until_up(base, server, log)
            yield server, base, Client(base, token)
        finally:
            if server.poll() is None:
                server.terminate()
            server.wait(30)


def _started(server: subprocess.Popen[bytes]) -> tuple[list[int], list[int]]:
    """The workers' and the follower's process ids, once all three have started (the
    server answers once one worker listens; the others may still be starting)."""
    deadline = time.monotonic() + 20
    while True:
        children = _children(server.pid)
        followers = [pid for pid, args in children if "projections follow" in args]
        if len(followers) == 1 and len(children) == 3:  # two workers, one follower
            return [pid for pid, _ in children if pid not in followers], followers
        assert time.monotonic() < deadline, f"the processes did not start: {children}"
        time.sleep(0.1)


def test_workers_answer_and_one_follower_process_keeps_the_read_models(tmp_path):
    with _serving(tmp_path) as (server, _, admin):
        _, followers = _started(server)
        pid = p.participant_id("CASE")
        answer = admin.command("ScreenParticipant", pid, p.screening("CASE"))
        assert answer.status_code == 201, answer.text
        deadline = time.monotonic() + 20
        while pid not in {row["participant_id"] for row in
                          admin.get("/v1/participants").json()["participants"]}:
            assert time.monotonic() < deadline, "the read models did not catch up"
            time.sleep(0.1)
        feed = admin.get("/v1/feed", after=0, limit=1000).json()
        assert pid in {event["subject"] for event in feed["events"]}
        os.kill(followers[0], signal.SIGKILL)  # the followers' process dies: started again
        deadline = time.monotonic() + 20
        while not (again := [pid for pid, args in _children(server.pid)
                             if "projections follow" in args and pid != followers[0]]):
            assert time.monotonic() < deadline, "the followers were not started again"
            time.sleep(0.2)
        followers = again
    assert not _alive(followers[0])  # stopped with the workers
    # every line is trialog's JSON, granian's own included; by default no more threads
    # than granian advises for the cores, so no warning of it
    lines = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines()]
    assert any(line["logger"].startswith("_granian") for line in lines)
    assert not [line for line in lines if line["level"] == "warning"]


def test_workers_take_a_large_batch_send_an_export_are_replaced_and_end_with_their_master(
        tmp_path):
    with _serving(tmp_path) as (server, base, admin):
        workers, followers = _started(server)
        commands = [{"command_id": str(uuid.uuid4()), "type": "ScreenParticipant",
                     "participant_id": p.participant_id("CASE"), "data": p.screening("CASE")}
                    for _ in range(1000)]
        body = json.dumps({"commands": commands}).encode()
        assert len(body) > 512 * 1024  # more than granian's buffer for a request's head
        answer = admin.session.post(f"{base}/v1/commands/batch", data=body, timeout=120,
                                    headers={"Content-Type": "application/json"})
        assert answer.status_code == 200, answer.text[:500]
        assert [r["status"] for r in answer.json()["results"]] == [201] * 1000
        # Over 8 MiB sent chunked (no Content-Length): the workers read it up to the
        # limit and it was refused as JSON that ends too soon (400 malformed_json).
        pieces = iter([b" " * (8 * 2**20), b"{"])  # one byte over: all of it read
        chunked = admin.session.post(f"{base}/v1/commands/batch", data=pieces, timeout=60,
                                     headers={"Content-Type": "application/json"})
        assert (chunked.status_code, chunked.json()["error"]) == (413, "body_too_large")
        with admin.session.get(f"{base}/v1/exports/odm", stream=True, timeout=60) as export:
            assert export.status_code == 200
            whole = b"".join(export.iter_content(65536))
            assert export.headers["Content-Length"] == str(len(whole))
            text = whole.decode()
        assert all(f'SubjectKey="{c["participant_id"]}"' in text for c in commands)
        # the server's environment is not the request's: no header comes from it
        assert uuid.UUID(admin.get("/healthz").headers["X-Request-Id"])
        os.kill(workers[0], signal.SIGKILL)  # a worker dies: another takes its place
        deadline = time.monotonic() + 30
        while True:
            now = [pid for pid, args in _children(server.pid) if "projections follow" not in args]
            if len(now) == 2 and workers[0] not in now:
                break
            assert time.monotonic() < deadline, f"the worker was not replaced: {now}"
            time.sleep(0.2)
        workers = now
        assert admin.get("/v1/participants").status_code == 200
        os.kill(server.pid, signal.SIGKILL)  # the master dies: its processes end with it
        server.wait(10)
        # the follower first ends the step it is in (1,000 screenings to apply, on a
        # loaded machine)
        deadline = time.monotonic() + 60
        while alive := [pid for pid in workers + followers if _alive(pid)]:
            assert time.monotonic() < deadline, ("still running without their master",
                                                 [_described(pid) for pid in alive])
            time.sleep(0.2)
