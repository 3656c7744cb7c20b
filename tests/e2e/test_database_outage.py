"""A PostgreSQL restart under load: clients get 503 database_unavailable with Retry-After
(never a 500) while the database is away, the server recovers by itself, and every command
that was acknowledged is stored exactly once."""

from __future__ import annotations

import base64
import glob
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import sqlalchemy

from domain.access import EVERY_SITE
from infrastructure.store.bootstrap import bootstrap
from infrastructure.store.tokens import create_token
from tests.conftest import TEST_KEY, settings_for
from tests.e2e import payloads as p
from tests.e2e.conftest import TRIALOG, free_port, wait_until_up

BINARIES = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
SECRETS = {"TRIALOG_CIPHER_KEY": TEST_KEY,
           "TRIALOG_ALLOCATION_SEED": base64.b64encode(b"outage-test-seed" * 2).decode(),
           "TRIALOG_PSEUDONYM_KEY": base64.b64encode(b"outage-test-pseudonyms!" + b"x" * 9
                                                     ).decode()}


class PrivateServer:
    """A PostgreSQL cluster of the test's own, on its own port, that it may restart."""

    def __init__(self) -> None:
        self.bin = Path(BINARIES[-1])
        # Not under pytest's folders: the server's user must be able to reach its own.
        self.data = Path(tempfile.mkdtemp(prefix="trialog-pg-")) / "pgdata"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:  # the server refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        self.data.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.data.parent, "postgres")
            shutil.chown(self.data, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self.start()

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.data / "log"),
                  "-o", f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1",
                  "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "stop")


@contextmanager
def private_postgres() -> Iterator[PrivateServer]:
    server = PrivateServer()
    try:
        server.init()
        yield server
    finally:
        try:
            server.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(server.data.parent, ignore_errors=True)


def screen(url: str, token: str, outcomes: Counter, acknowledged: list, stop: threading.Event
           ) -> None:
    """Screens new participants until stopped, retrying each command with its command_id
    until it is acknowledged (as an upstream service does)."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    while not stop.is_set():
        pid = p.participant_id()
        body = {"command_id": str(uuid.uuid4()), "type": "ScreenParticipant",
                "participant_id": pid, "data": p.screening()}
        for _ in range(200):
            try:
                answer = session.post(f"{url}/v1/commands", json=body, timeout=30)
            except requests.ConnectionError:
                outcomes["connection_error"] += 1
                time.sleep(0.1)
                continue
            outcomes[answer.status_code] += 1
            if answer.status_code == 503:
                assert answer.json()["error"] == "database_unavailable"
                assert int(answer.headers["Retry-After"]) > 0
                time.sleep(0.1)
                continue
            if answer.status_code in (200, 201):
                acknowledged.append((pid, body["command_id"]))
            break


@pytest.mark.skipif(not BINARIES, reason="needs the PostgreSQL server binaries")
def test_a_postgresql_restart_under_load_answers_503_and_loses_nothing(tmp_path):
    with private_postgres() as pg:
        trialog = bootstrap(settings_for(pg.url, **SECRETS), migrate=True)
        token = create_token(trialog.engine, "service-outage", "service", EVERY_SITE)
        trialog.close()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = tmp_path / "server.log"
        env = {**os.environ, "TRIALOG_DATABASE_URL": pg.url, **SECRETS}
        with open(log, "w") as out:
            process = subprocess.Popen([TRIALOG, "serve", "--port", str(port)], env=env,
                                       stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until_up(url, process, log)
            outcomes: Counter = Counter()
            acknowledged: list = []
            stop = threading.Event()
            clients = [threading.Thread(target=screen, args=(url, token, outcomes,
                                                             acknowledged, stop))
                       for _ in range(4)]
            for client in clients:
                client.start()
            time.sleep(1.0)
            pg.stop()
            time.sleep(2.0)  # the database is away
            pg.start()
            time.sleep(1.5)
            stop.set()
            for client in clients:
                client.join(timeout=120)
            after = requests.get(f"{url}/v1/participants/{acknowledged[-1][0]}",
                                 headers={"Authorization": f"Bearer {token}"}, timeout=30)
            health = requests.get(f"{url}/v1/participants", timeout=30, params={
                "after": after.json()["position"]},
                headers={"Authorization": f"Bearer {token}"})
            healthz = requests.get(f"{url}/healthz", timeout=30).json()
        finally:
            process.terminate()
            process.wait(timeout=10)

        assert outcomes[500] == 0, (outcomes, log.read_text()[-3000:])
        assert outcomes[503] > 0, outcomes
        assert after.status_code == 200  # recovered without a restart
        assert health.status_code == 200  # the read models caught up
        assert (healthz["status"], healthz["quarantined"]) == ("ok", 0)  # nobody set aside
        engine = sqlalchemy.create_engine(pg.url)
        with engine.connect() as c:
            stored = Counter(c.execute(sqlalchemy.text(  # (not the token's grant)
                "SELECT participant_id FROM trialog_commands "
                "WHERE participant_id NOT LIKE 'access:%'")).scalars())
        engine.dispose()
        assert len(acknowledged) > 10
        assert all(stored[pid] == 1 for pid, _ in acknowledged)
        assert sum(stored.values()) == len(acknowledged)


def test_a_database_error_that_is_not_an_outage_is_a_500_not_a_503(tmp_path):
    """A missing table is the server's fault: retrying would not help, so it is not
    answered as if the database were away."""
    url = f"sqlite:///{tmp_path / 'broken.db'}"
    trialog = bootstrap(settings_for(url), migrate=True)
    token = create_token(trialog.engine, "auditor-broken", "auditor")
    with trialog.engine.begin() as c:
        c.execute(sqlalchemy.text("DROP TABLE rm_deviations"))
    trialog.close()
    port = free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "TRIALOG_DATABASE_URL": url, **SECRETS}
    with open(log, "w") as out:
        process = subprocess.Popen([TRIALOG, "serve", "--port", str(port), "--no-projection"],
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}", process, log)
        answer = requests.get(f"http://127.0.0.1:{port}/v1/deviations", timeout=30,
                              headers={"Authorization": f"Bearer {token}"})
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert (answer.status_code, answer.json()["error"]) == (500, "internal_error")
    assert "Retry-After" not in answer.headers
