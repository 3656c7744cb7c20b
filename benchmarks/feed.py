"""The event feed and webhooks: `GET /v1/feed` paged from the start to the end through a
`trialog serve` process, and webhook deliveries to a local receiver, each beside the raw
library's PostgreSQL recorder reading the same store's notification log in the same run.

The library baseline: the library's own PostgreSQL recorder (`eventsourcing.postgres`,
psycopg, the same module as the other baselines' `raw_env`) cannot read our table as it
is, since our events table (made by `eventsourcing_sqlalchemy`) calls the notification id
`id` and the library's recorder selects `notification_id`. A view renames that one column
(`SELECT id AS notification_id, ...`, nothing copied, the same rows and indexes), and an
`Application` named after the view reads it as `raw_log_read` in __main__.py does: pages
of 1,000 notifications, each turned into a domain event (decrypt and decode, with our
`date` transcoding registered and our mapper named by the library's `MAPPER_TOPIC`, which
takes off each state's sealed topic, so that our events decode at all).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import requests
from eventsourcing.application import Application
from eventsourcing.persistence import JSONTranscoder
from eventsourcing.utils import get_topic
from sqlalchemy import text, update

from benchmarks import projection
from benchmarks.baseline import read_whole_log
from domain.access import Scope
from domain.participant import Participant
from domain.randomization import AllocationSequence
from domain.sealing import SealingMapper
from domain.service import DateAsISO
from infrastructure.audit.feed import MAX_LIMIT, Feed
from infrastructure.jobs import webhooks
from infrastructure.readside.projections import FeedProjection, TrialProjection
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.stored import events_table
from infrastructure.store.tables import webhooks as webhooks_table
from infrastructure.store.tokens import create_token
from tests.e2e.conftest import free_port

SITES = ("CASE", "METRO")
LIBRARY_VIEW = "feedlibrarylog_events"  # the view the library's recorder reads


# --- the store ---------------------------------------------------------------------------

def seed(t: Trialog, participants: int, events_each: int, per_save: int = 50) -> int:
    """Participants of ``events_each`` events (screening, consent, randomization, then a
    dose a day), alternately of CASE and METRO, saved through the service ``per_save`` at
    a time; the number of events in the store."""
    audit = projection._audit
    sequences = {site: AllocationSequence.open(t.protocol.study_id, site, audit())
                 for site in SITES}
    group: list[Any] = []
    for i in range(participants):
        site = SITES[i % len(SITES)]
        data = projection.early_screening()
        data["site_id"] = site
        p = Participant.screen(f"{site}-{uuid.uuid4().hex[:12]}", data, t.protocol, audit())
        p.record_consent(projection.early_consent(), audit())
        p.randomize({"registered_on": projection.REGISTERED}, sequences[site],
                    t.service.allocation_seed, t.protocol, audit())
        for day in range(events_each - 3):
            p.record_dose({"taken_on": projection.REGISTERED + timedelta(days=day),
                           "taken": True, "dose_mcg": 1000}, audit())
        group.append(p)
        if len(group) == per_save:
            t.service.save(*group)
            group = []
    t.service.save(*sequences.values(), *group)
    return head(t)


def head(t: Trialog) -> int:
    table = events_table(t.service.recorder)
    with t.engine.connect() as connection:
        return int(connection.scalar(text(f"SELECT max(id) FROM {table.name}")) or 0)


# --- the library's baseline --------------------------------------------------------------

class LibraryLog(Application[Any]):
    """The raw library's application over the view of our events table."""

    name = LIBRARY_VIEW.removesuffix("_events")

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        transcoder.register(DateAsISO())


def library_view(t: Trialog) -> None:
    table = events_table(t.service.recorder)
    with t.engine.begin() as connection:
        connection.execute(text(
            f"CREATE VIEW {LIBRARY_VIEW} AS SELECT id AS notification_id, originator_id, "
            f"originator_version, topic, state FROM {table.name}"))


def library_log_read(t: Trialog, raw_env: dict[str, str]) -> tuple[int, float]:
    """(events, events/s): the library's PostgreSQL recorder reads the whole log from the
    view (see the module's docstring), as `raw_log_read` does, timed without its
    start-up."""
    app = LibraryLog(env={**raw_env, "CREATE_TABLE": "n",
                          "CIPHER_TOPIC": "eventsourcing.cryptography:AESCipher",
                          "CIPHER_KEY": t.settings.cipher_key,
                          # The store's states begin with their sealed topics: the
                          # library's mapper setting names the mapper that reads them.
                          "MAPPER_TOPIC": get_topic(SealingMapper)})
    try:
        return read_whole_log(app)
    finally:
        app.close()


# --- GET /v1/feed ------------------------------------------------------------------------

def scoped_token(t: Trialog, site: str = "CASE") -> str:
    return create_token(t.engine, f"bench-feed-{site.lower()}-{uuid.uuid4().hex[:8]}",
                        "service", Scope.of([site]))


def feed_read(base: str, token: str, limit: int = MAX_LIMIT) -> tuple[int, int, float]:
    """(events received, positions covered, seconds): one client pages the feed from
    position 0 to the end, ``limit`` positions a request."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    session.trust_env = False  # a consumer that knows its server: no proxy look-ups
    received, after = 0, 0
    start = time.perf_counter()
    while True:
        answer = session.get(f"{base}/v1/feed", params={"after": after, "limit": limit},
                             timeout=120)
        if answer.status_code != 200:
            raise RuntimeError(f"feed answered {answer.status_code}: {answer.text[:500]}")
        page = orjson.loads(answer.content)
        if page["next"] == after:
            break
        received += len(page["events"])
        after = page["next"]
    return received, after, time.perf_counter() - start


# --- webhooks ----------------------------------------------------------------------------

RECEIVER = """
import sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
count, lock = [0], threading.Lock()
class Receiver(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        with lock:
            count[0] += 1
        self.send_response(204)
        self.end_headers()
    def do_GET(self):
        body = str(count[0]).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Receiver).serve_forever()
"""


def receiver_process(port: int) -> subprocess.Popen[bytes]:
    """A threaded HTTP server in its own process answering every POST 204 (and GET with
    how many POSTs it received)."""
    process = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("the webhook receiver did not start")


def webhook_deliveries(t: Trialog, url: str, n: int) -> tuple[int, float]:
    """(deliveries, seconds): a subscription to every site and type, set back ``n``
    positions from the head, delivered by `webhooks.deliver` in this process (what one
    `deliver_webhook` task runs) until it is up to date; a fresh Feed, as a worker process
    has when it starts."""
    webhook_id, _ = webhooks.add(t, url, [], [])
    newest = head(t)
    with t.engine.begin() as connection:
        connection.execute(update(webhooks_table)
                           .where(webhooks_table.c.webhook_id == webhook_id)
                           .values(position=newest - n))
    before = int(requests.get(url, timeout=10).text)
    start = time.perf_counter()
    outcome = webhooks.deliver(t, webhook_id, feed=Feed(t))
    seconds = time.perf_counter() - start
    if outcome != "done":
        raise RuntimeError(f"deliver answered {outcome!r}")
    received = int(requests.get(url, timeout=10).text) - before
    if received != n:
        raise RuntimeError(f"the receiver got {received} deliveries, not {n}")
    return received, seconds


def catch_up(t: Trialog) -> None:
    """The read side caught up, the feed's pages rendered ahead among it, so that the
    server's followers are idle while the feed is read (the steady state, as for the
    history figures)."""
    TrialProjection(t, batch_size=5000).catch_up()
    FeedProjection(t, batch_size=5000).catch_up()


def server_seconds(log: Path, path: str = "/v1/feed") -> tuple[int, float]:
    """(requests, seconds) of ``path`` as the server logged them (from its authentication
    to its answer, without sending the answer)."""
    count, ms = 0, 0.0
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("path") == path and "duration_ms" in entry:
            count += 1
            ms += entry["duration_ms"]
    return count, ms / 1000


def figures(t: Trialog, url: str, raw_env: dict[str, str], secrets: dict[str, str],
            workdir: Path, participants: int, events_each: int,
            deliveries: int) -> dict[str, Any]:
    """Builds the store, then, in this order: the library's read, the feed read with an
    every-site admin token (a fresh server), the same with a CASE service token (another
    fresh server), the library's read again, the webhook deliveries, the library's read a
    third time. The library's figure is all its reads' events over their time."""
    from benchmarks import http

    start = time.perf_counter()
    seed(t, participants, events_each)
    # The readers' tokens made first: each grant is an event of the log the reads cover.
    tokens = {False: create_token(t.engine, f"bench-feed-{uuid.uuid4().hex[:8]}", "admin"),
              True: scoped_token(t)}
    events = head(t)
    catch_up(t)
    built = time.perf_counter() - start
    library_view(t)
    library = [library_log_read(t, raw_env)]
    reads: dict[str, dict[str, Any]] = {}
    for name, scoped in (("feed_read", False), ("feed_read_scoped", True)):
        with http.serving(url, secrets, t.engine, workdir, tokens[scoped]) as (base, token):
            received, positions, seconds = feed_read(base, token)
        if positions != events:
            raise RuntimeError(f"{name} covered {positions} positions of {events}")
        requests_logged, server = server_seconds(
            workdir / f"serve-{base.rsplit(':', 1)[1]}.log")
        reads[name] = {"events": received, "positions": positions, "seconds": seconds,
                       "requests": requests_logged, "server_seconds": server}
    library.append(library_log_read(t, raw_env))
    port = free_port()
    receiver = receiver_process(port)
    try:
        delivered, delivery_seconds = webhook_deliveries(t, f"http://127.0.0.1:{port}/hook",
                                                         deliveries)
    finally:
        receiver.terminate()
        receiver.wait(10)
    library.append(library_log_read(t, raw_env))
    if any(count != events for count, _ in library):
        raise RuntimeError(f"the library read {library} events, not {events}")
    return {"events": events, "built_seconds": built, "reads": reads,
            "library_rates": [rate for _, rate in library],
            "library": sum(c for c, _ in library) / sum(c / r for c, r in library),
            "deliveries": delivered, "delivery_seconds": delivery_seconds}
