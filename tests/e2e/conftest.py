"""A real server: `trialog serve` in its own process, once per database kind for the session
(tests use unique participant ids), with a token per role and its JSON log in a file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from domain.access import EVERY_SITE
from infrastructure.store.bootstrap import bootstrap
from infrastructure.store.tokens import ROLES, create_token
from tests.conftest import TEST_SECRETS, settings_for
from tests.databases import SHARED_URL

TRIALOG = str(Path(sys.executable).with_name("trialog"))


@dataclass
class Server:
    url: str
    log: Path
    tokens: dict[str, str] = field(default_factory=dict)  # role -> token
    names: dict[str, str] = field(default_factory=dict)  # role -> token name
    database: str = ""  # the URL of the server's database

    def client(self, role: str) -> Client:
        return Client(self.url, self.tokens[role])

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines()


class Client:
    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def get(self, path: str, **params: Any) -> requests.Response:
        return self.session.get(self.url + path, params=params, timeout=30)

    def post(self, path: str, body: Any) -> requests.Response:
        return self.session.post(self.url + path, json=body, timeout=30)

    def command(self, type_: str, participant_id: str, data: dict[str, Any],
                **envelope: Any) -> requests.Response:
        body = {"command_id": str(uuid.uuid4()), "type": type_,
                "participant_id": participant_id, "data": data, **envelope}
        return self.post("/v1/commands", body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until_up(url: str, process: subprocess.Popen[Any], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"trialog serve exited:\n{log.read_text()}")
        try:
            if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # not listening, or booting
            time.sleep(0.1)
    raise RuntimeError("trialog serve did not answer /healthz within 30 s")


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp(f"server-{request.param}")
    url = (f"sqlite:///{folder / 'trialog.db'}" if request.param == "sqlite"
           else SHARED_URL)
    trialog = bootstrap(settings_for(url), migrate=True)
    port = free_port()
    running = Server(f"http://127.0.0.1:{port}", folder / "server.log", database=url)
    for role in ROLES:
        name = f"{role}-{uuid.uuid4().hex[:8]}"
        running.tokens[role] = create_token(trialog.engine, name, role, EVERY_SITE)
        running.names[role] = name
    trialog.close()
    env = {**os.environ, "TRIALOG_DATABASE_URL": url, **TEST_SECRETS}
    with open(running.log, "w") as log:
        process = subprocess.Popen([TRIALOG, "serve", "--port", str(port)], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_up(running.url, process, running.log)
        yield running
    finally:
        process.terminate()
        process.wait(timeout=10)
