"""HTTP command throughput: `trialog serve` in its own process, 8 concurrent clients, beside
the raw library saving single-event aggregates from 8 threads on the same database."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from eventsourcing.application import Application

from benchmarks.baseline import Ping
from infrastructure.store.tokens import create_token
from tests.e2e.conftest import free_port, wait_until_up
from tests.e2e.payloads import screening

TRIALOG = str(Path(sys.executable).with_name("trialog"))
CLIENTS = 8
# The deployment the README recommends on a small machine: two processes.
SERVE_ARGS = os.environ.get("TRIALOG_BENCH_SERVE_ARGS", "--workers 2 --threads 8")


@contextmanager
def serving(url: str, secrets: dict[str, str], engine: Any,
            workdir: Path) -> Iterator[tuple[str, str]]:
    token = create_token(engine, f"bench-{uuid.uuid4().hex[:8]}", "admin")
    port = free_port()
    log = workdir / f"serve-{port}.log"
    env = {**os.environ, "TRIALOG_DATABASE_URL": url, **secrets}
    with open(log, "w") as out:
        process = subprocess.Popen([TRIALOG, "serve", "--port", str(port), "--threads", "16",
                                    *SERVE_ARGS.split()],
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base, process, log)
        yield base, token
    finally:
        process.terminate()
        process.wait(timeout=10)


def _screen_body() -> dict[str, Any]:
    return {"command_id": str(uuid.uuid4()), "type": "ScreenParticipant",
            "participant_id": f"CASE-{uuid.uuid4().hex[:12]}", "data": screening()}


def _client(base: str, token: str, n: int) -> None:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    for _ in range(n):
        answer = session.post(f"{base}/v1/commands", json=_screen_body(), timeout=60)
        if answer.status_code != 201:
            raise RuntimeError(f"{answer.status_code}: {answer.text}")


def http_commands(base: str, token: str, total: int) -> float:
    """Single-event commands per second from 8 concurrent clients."""
    _client(base, token, 20)  # warm up
    each = total // CLIENTS
    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(lambda _: _client(base, token, each), range(CLIENTS)))
    return each * CLIENTS / (time.perf_counter() - start)


def bulk_import(base: str, token: str, participants: int) -> float:
    """Events per second through the batch endpoint, 100 commands per request."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    commands = []
    for _ in range(participants):
        body = _screen_body()
        commands.append(body)
        commands.append({**body, "command_id": str(uuid.uuid4()), "type": "RecordConsent",
                         "data": {"consent_version": "2.1", "signed_on": "2026-03-02",
                                  "signed_by": "participant", "language": "en"}})
    start = time.perf_counter()
    for i in range(0, len(commands), 100):
        answer = session.post(f"{base}/v1/commands/batch",
                              data=json.dumps({"commands": commands[i:i + 100]}),
                              headers={"Content-Type": "application/json"}, timeout=120)
        statuses = {r["status"] for r in answer.json()["results"]}
        if statuses != {201}:
            raise RuntimeError(f"batch answered {statuses}")
    return len(commands) / (time.perf_counter() - start)


def raw_concurrent_saves(env: dict[str, str], total: int) -> float:
    """The library's own recorder: one new single-event aggregate per save, 8 threads."""
    app: Application[Any] = Application(env={**env, "POSTGRES_POOL_SIZE": str(CLIENTS),
                                             "POSTGRES_MAX_OVERFLOW": "0"})
    try:
        each = total // CLIENTS
        for _ in range(20):
            app.save(Ping())
        start = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(lambda _: [app.save(Ping()) for _ in range(each)], range(CLIENTS)))
        return each * CLIENTS / (time.perf_counter() - start)
    finally:
        app.close()


def history_p95_ms(base: str, token: str, participant_ids: list[str],
                   warm_up: int = 0) -> float:
    """p95 of GET /v1/participants/{id}/history, one client, reading the participants in
    the order given (one id again and again, or each once); the first ``warm_up`` reads
    are not counted."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    samples = []
    for i, pid in enumerate(participant_ids):
        start = time.perf_counter()
        answer = session.get(f"{base}/v1/participants/{pid}/history", timeout=60)
        elapsed = time.perf_counter() - start
        if answer.status_code != 200 or len(answer.json()["events"]) < 500:
            raise RuntimeError(f"history answered {answer.status_code}")
        if i >= warm_up:
            samples.append(elapsed)
    return p95_ms(samples)


def p95_ms(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=20)[18] * 1000
