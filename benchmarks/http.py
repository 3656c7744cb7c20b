"""HTTP command throughput: `trialog serve` in its own process, 8 concurrent clients, beside
the raw library saving single-event aggregates from 8 threads on the same database; the same
with site-scoped tokens; and the latency of a person's sign-in."""

from __future__ import annotations

import json
import os
import secrets
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

import argon2
import requests
import urllib3
from eventsourcing.application import Application
from sqlalchemy import select
from urllib3.util.retry import Retry

from benchmarks.baseline import Ping
from domain.access import Scope
from infrastructure.store.people import PEPPERED, create_user
from infrastructure.store.tables import users
from infrastructure.store.tokens import create_token
from tests.e2e.conftest import free_port
from tests.e2e.payloads import screening

TRIALOG = str(Path(sys.executable).with_name("trialog"))
CLIENTS = 8
# The deployment the README recommends on a small machine: two processes.
SERVE_ARGS = os.environ.get("TRIALOG_BENCH_SERVE_ARGS", "--workers 2 --threads 8")


@contextmanager
def serving(url: str, secrets: dict[str, str], engine: Any, workdir: Path,
            token: str | None = None) -> Iterator[tuple[str, str]]:
    """A server on a free port, and ``token`` (made, an admin's, when not given: its grant
    is an event of the log)."""
    if token is None:
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
        _wait_until_up(base, process, log)
        yield base, token
    finally:
        process.terminate()
        process.wait(timeout=10)


def _wait_until_up(base: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """As the e2e tests' wait, but a /healthz that is slow to answer on a loaded machine
    (a read timeout, not only a refused connection) is asked again."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"trialog serve exited:\n{log.read_text()}")
        try:
            if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            time.sleep(0.1)
    raise RuntimeError("trialog serve did not answer /healthz within 60 s")


def _screen_body(site: str = "CASE") -> dict[str, Any]:
    return {"command_id": str(uuid.uuid4()), "type": "ScreenParticipant",
            "participant_id": f"{site}-{uuid.uuid4().hex[:12]}", "data": screening(site)}


class Client:
    """An upstream system's client: one connection kept open (urllib3's pool of one),
    and a request sent again when the server had just closed that connection as idle (its
    keep-alive timeout): the same body, so the same command id. Without requests' layers
    above urllib3, a command costs this process about half the CPU (~0.7 ms against ~1.3
    on the 2-core machine of the README, where the clients share the cores with the
    server they measure)."""

    def __init__(self, base: str, token: str) -> None:
        url = urllib3.util.parse_url(base)
        retry = Retry(total=3, connect=3, read=3, status=0, allowed_methods=None,
                      backoff_factor=0.05)
        self.pool = urllib3.HTTPConnectionPool(url.host, url.port, maxsize=1, block=True,
                                               retries=retry, timeout=60.0)
        self.headers = {"Authorization": f"Bearer {token}",
                        "Content-Type": "application/json"}

    def post(self, path: str, body: Any, timeout: float = 60.0) -> tuple[int, Any]:
        """The status and the decoded answer (its first 500 bytes when it is not JSON, as
        a proxy's or a crashed server's error page)."""
        answer = self.pool.request("POST", path, body=json.dumps(body).encode(),
                                   headers=self.headers, timeout=timeout)
        try:
            return answer.status, answer.json()
        except ValueError:
            return answer.status, answer.data[:500]


def _commands(client: Client, n: int, site: str = "CASE") -> None:
    for _ in range(n):
        status, answer = client.post("/v1/commands", _screen_body(site))
        if status not in (200, 201):  # 200: a retry answered from its record
            raise RuntimeError(f"{status}: {answer}")


# `commands_http` and `commands_http_scoped` are measured alternately on the same server:
# ROUNDS rounds of each in the order A B B A A B ... (A: the admin token of
# `commands_http`, every site; B: site-scoped service tokens, four clients scoped to CASE
# screening CASE- participants, four scoped to METRO screening METRO- ones), so that drift
# (the store growing, other load on the machine) falls on both alike. A round is 8
# concurrent clients issuing total / ROUNDS / 8 screenings each; each client keeps its
# HTTP session (connection) across rounds. Each figure is all its commands over the sum of
# its rounds' times, so `commands_http` is still `total` commands from 8 clients, as its
# library baseline's saves are.
ROUNDS = int(os.environ.get("TRIALOG_BENCH_HTTP_ROUNDS", "6"))
SCOPED_SITES = ("CASE", "METRO")


def scoped_tokens(engine: Any) -> list[tuple[str, str]]:
    """A service token scoped to each site: (token, site) for each of the 8 clients."""
    by_site = {site: create_token(engine, f"bench-{site.lower()}-{uuid.uuid4().hex[:8]}",
                                  "service", Scope.of([site]))
               for site in SCOPED_SITES}
    return [(by_site[site], site)
            for site in SCOPED_SITES for _ in range(CLIENTS // len(SCOPED_SITES))]


def http_commands_alternating(base: str, token: str, scoped: list[tuple[str, str]],
                              total: int) -> tuple[float, float, list[float]]:
    """Commands/s with the every-site token and with the scoped ones (see ROUNDS), and the
    ratio scoped / every-site of each pair of rounds (to show the noise)."""
    plain = [(Client(base, token), "CASE") for _ in range(CLIENTS)]
    sited = [(Client(base, t), site) for t, site in scoped]
    for client, site in plain + sited:  # warm up each client's connection and token
        _commands(client, 3, site)
    each = total // ROUNDS // CLIENTS
    seconds: dict[str, list[float]] = {"plain": [], "scoped": []}

    def round_of(name: str, clients: list[tuple[Client, str]]) -> None:
        start = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(lambda client: _commands(client[0], each, client[1]), clients))
        seconds[name].append(time.perf_counter() - start)

    for i in range(ROUNDS):
        order = [("plain", plain), ("scoped", sited)]
        for name, clients in order if i % 2 == 0 else reversed(order):
            round_of(name, clients)
    done = each * CLIENTS * ROUNDS
    ratios = [round(p / s, 3) for p, s in zip(seconds["plain"], seconds["scoped"],
                                               strict=True)]
    return done / sum(seconds["plain"]), done / sum(seconds["scoped"]), ratios


def warmed_clients(base: str, token: str) -> list[Client]:
    """8 clients, each with its connection kept and three commands sent."""
    clients = [Client(base, token) for _ in range(CLIENTS)]
    for client in clients:
        _commands(client, 3)
    return clients


def from_each(clients: list[Client], each: int) -> None:
    """``each`` screenings from every client at once."""
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(lambda client: _commands(client, each), clients))


def _turned_away(client: Client, n: int) -> None:
    for _ in range(n):
        answer = client.pool.request("POST", "/v1/commands",
                                     body=json.dumps(_screen_body()).encode(),
                                     headers={"Content-Type": "application/json"})
        if answer.status != 401:
            raise RuntimeError(f"a request without a token answered {answer.status}")


def turned_away(clients: list[Client], each: int) -> float:
    """The floor under `commands_http`: requests/s when the clients send ``each`` screenings
    at once with no token, each answered 401 at the door: no command, one query (the read
    models' position for the answer's header, which a command's answer takes from the
    command instead). HTTP, the WSGI stack, that query and the clients' own work remain, on
    the same cores. The clients are warmed (their connections open) beforehand."""
    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(lambda client: _turned_away(client, each), clients))
    return each * len(clients) / (time.perf_counter() - start)


def http_commands(base: str, token: str, total: int) -> float:
    """Commands/s from 8 concurrent clients, each keeping its connection, after a warm-up
    of three commands each (one round of ``http_commands_alternating``'s, unscoped)."""
    clients = warmed_clients(base, token)
    each = total // CLIENTS
    start = time.perf_counter()
    from_each(clients, each)
    return each * CLIENTS / (time.perf_counter() - start)


def sessions_p95_ms(base: str, engine: Any, n: int = 50,
                    warm_up: int = 3) -> tuple[float, dict[str, Any]]:
    """p95 of POST /v1/sessions with the right password, one client, sequential; and the
    Argon2 parameters of the person's stored hash after the sign-ins (the server rehashes
    a hash whose parameters differ from its own, so these are the ones it verifies)."""
    login, password = f"bench-person-{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(18)
    create_user(engine, login, "Bench Person", "coordinator", Scope.of(["CASE"]), password)
    session = requests.Session()
    samples = []
    for i in range(warm_up + n):
        start = time.perf_counter()
        answer = session.post(f"{base}/v1/sessions",
                              json={"login": login, "password": password}, timeout=60)
        elapsed = time.perf_counter() - start
        if answer.status_code != 201 or not answer.json().get("token"):
            raise RuntimeError(f"sessions answered {answer.status_code}: {answer.text}")
        if i >= warm_up:
            samples.append(elapsed)
    with engine.connect() as connection:
        stored = connection.execute(select(users.c.password_hash)
                                    .where(users.c.login == login)).scalar_one()
    p = argon2.extract_parameters(stored.removeprefix(PEPPERED))
    parameters = {"type": f"argon2{p.type.name.lower()}", "version": p.version,
                  "time_cost": p.time_cost, "memory_cost_kib": p.memory_cost,
                  "parallelism": p.parallelism, "hash_len": p.hash_len,
                  "salt_len": p.salt_len}
    return p95_ms(samples), parameters


def screened_and_consented(participants: int, sites: tuple[str, ...] = ("CASE",)
                           ) -> list[dict[str, Any]]:
    """Two commands a participant (its screening, then its consent), the participants
    taken from the sites in turn."""
    commands = []
    for i in range(participants):
        body = _screen_body(sites[i % len(sites)])
        commands.append(body)
        commands.append({**body, "command_id": str(uuid.uuid4()), "type": "RecordConsent",
                         "data": {"consent_version": "2.1", "signed_on": "2026-03-02",
                                  "signed_by": "participant", "language": "en"}})
    return commands


def bulk_import(base: str, token: str, participants: int) -> float:
    """Events per second through the batch endpoint, 100 commands per request."""
    client = Client(base, token)
    commands = screened_and_consented(participants)
    start = time.perf_counter()
    for i in range(0, len(commands), 100):
        status, answer = client.post("/v1/commands/batch",
                                     {"commands": commands[i:i + 100]}, timeout=120.0)
        if status != 200:
            raise RuntimeError(f"batch answered {status}: {answer}")
        statuses = {r["status"] for r in answer["results"]}
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


def cli_import(url: str, secrets: dict[str, str], workdir: Path, participants: int,
               jobs: int) -> float:
    """Events per second of `trialog import --jobs N` over a file of screenings and
    consents of both sites' participants, timed as its user waits for it: from the
    process's start to its exit."""
    path = workdir / f"import-{uuid.uuid4().hex[:8]}.ndjson"
    commands = screened_and_consented(participants, ("CASE", "METRO"))
    path.write_bytes(b"".join(json.dumps(body).encode() + b"\n" for body in commands))
    env = {**os.environ, "TRIALOG_DATABASE_URL": url, **secrets}
    start = time.perf_counter()
    done = subprocess.run([TRIALOG, "import", str(path), "--jobs", str(jobs)], env=env,
                          capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.stdout != f"{len(commands)} accepted, 0 repeated, 0 refused\n":
        raise RuntimeError(f"trialog import: {done.stdout}{done.stderr}")
    path.unlink()
    return len(commands) / elapsed


def raw_batched_saves(env: dict[str, str], total: int, per_save: int = 100) -> float:
    """The library's own recorder: ``per_save`` new single-event aggregates in each save
    (one transaction), one thread, as the bulk import's client sends its batches."""
    app: Application[Any] = Application(env=env)
    try:
        app.save(*(Ping() for _ in range(per_save)))
        start = time.perf_counter()
        for _ in range(total // per_save):
            app.save(*(Ping() for _ in range(per_save)))
        return total // per_save * per_save / (time.perf_counter() - start)
    finally:
        app.close()


def history_p95_ms(base: str, token: str, participant_ids: list[str],
                   warm_up: int = 0) -> tuple[float, float]:
    """p95 of GET /v1/participants/{id}/history, one client, reading the participants in
    the order given (one id again and again, or each once); the first ``warm_up`` reads
    are not counted. Also their median (ms)."""
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
    return p95_ms(samples), round(statistics.median(samples) * 1000, 2)


def p95_ms(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=20)[18] * 1000
