"""Webhooks: each subscription gets the events of its sites and types, one POST per event,
in log order, signed by the Standard Webhooks convention.

A subscription keeps its position (the last event delivered or passed over). One
deliverer at a time works on a subscription (a PostgreSQL session lock), reading the feed
after the position with no contact details. A delivery that is not answered 2xx (or times
out) is tried again later with exponential backoff and jitter, or after the receiver's
``Retry-After``: the subscription's ``retry_at``, which the periodic dispatch honours, so
no task waits and no countdown outlives the broker's visibility timeout. After
``MAX_ATTEMPTS`` (at least 73 minutes of trying) the event is kept as failed, for
``trialog webhook redeliver``, and delivery goes on with the next. A ``410 Gone`` disables
the subscription. A deliverer that dies sends again the events answered 2xx since it
last recorded its position (at most SAVE_EVERY before): receivers deduplicate by
``webhook-id``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import orjson
import requests
import urllib3
from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection

from domain.access import EVERY_SITE, Scope
from infrastructure.audit.feed import TYPE_PREFIX, Feed, Reader
from infrastructure.store import locks
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.stored import decrypter, events_table
from infrastructure.store.tables import as_utc, webhook_failures, webhooks

log = logging.getLogger("trialog.webhooks")
TIMEOUT = 10.0  # s, per delivery: its answer's status and body, whole
PAGE = 200  # events read from the feed at a time
BODY_KEPT = 4096  # bytes of an answer's body read (to reuse the connection); past them,
# or past TIMEOUT, the connection is closed: the status is the answer
WORK_BUDGET = 60.0  # s a deliverer starts new deliveries for; the next dispatch goes on
SAVE_EVERY = 0.5  # s between two records of the position while delivering: a deliverer
# that dies re-sends at most the events answered since (receivers deduplicate)
BACKOFF_BASE = 2.0  # s: the first retry's delay; doubled each time
BACKOFF_CAP = 600.0  # s: the longest delay between two attempts
# Attempts before an event is kept as failed: with the backoff below, the waits add up
# to at least 73 minutes (110 on average), so a receiver down for an hour loses nothing.
MAX_ATTEMPTS = 22
ROTATION_GRACE = timedelta(hours=24)  # the previous secret also signs this long


class WebhookError(ValueError):
    """A subscription can't be made or found; the message says why."""


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _seal(t: Trialog, secret: str) -> str:
    """The secret as the table keeps it: encrypted by the store's cipher (never compressed,
    whatever the store does), in base64."""
    cipher = t.service.mapper.cipher
    assert cipher is not None  # the store always encrypts (bootstrap's CIPHER_TOPIC)
    return base64.b64encode(cipher.encrypt(secret.encode())).decode()


def _open(t: Trialog, sealed: str) -> str:
    return decrypter(t.service.mapper.cipher)(base64.b64decode(sealed)).decode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """``v1,`` and the base64 HMAC-SHA256 of ``id.timestamp.body`` under the secret."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def type_name(value: str) -> str:
    return value.removeprefix(TYPE_PREFIX)


# --- subscriptions -----------------------------------------------------------------------

def _check_url(url: str) -> None:
    """An http(s) address with a host and a valid port, on one line."""
    why = "--url: must be an http:// or https:// address with a host (at most 2,000 characters)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not one
    except ValueError:
        raise WebhookError(why) from None
    if (parts.scheme.lower() not in ("http", "https") or not parts.hostname
            or len(url) > 2000 or any(c.isspace() or not c.isprintable() for c in url)):
        raise WebhookError(why)


def event_types() -> set[str]:
    """The names of every event the log can hold (a subscription's --type is one)."""
    from eventsourcing.domain import CanMutateAggregate

    from domain.participant import Participant
    from domain.randomization import AllocationSequence
    from domain.revocations import AccessRegister
    from domain.trial import TrialDatabase

    classes = {value for aggregate in (Participant, AllocationSequence, TrialDatabase,
                                       AccessRegister)
               for value in vars(aggregate).values()
               if isinstance(value, type) and issubclass(value, CanMutateAggregate)}
    # The classes others derive from are never stored as themselves.
    return {c.__name__ for c in classes
            if not any(o is not c and issubclass(o, c) for o in classes)}



def add(t: Trialog, url: str, sites: list[str], types: list[str]) -> tuple[str, str]:
    """A new subscription from the log's current head; its id and its secret (shown
    once)."""
    _check_url(url)
    unknown = [s for s in sites if t.protocol.site(s) is None]
    if unknown:
        raise WebhookError(f"--site: unknown site {unknown[0]!r}; the protocol's sites are "
                           f"{', '.join(t.protocol.site_ids)}")
    known = event_types()
    unknown = [x for x in types if type_name(x) not in known]
    if unknown:
        raise WebhookError(f"--type: no event is of type {unknown[0]!r}; they are "
                           f"{', '.join(sorted(known))}")
    webhook_id, secret = str(uuid.uuid4()), new_secret()
    table = events_table(t.service.recorder)
    with t.engine.begin() as connection:
        head = connection.execute(select(func.max(table.c.id))).scalar() or 0
        connection.execute(insert(webhooks).values(
            webhook_id=webhook_id, url=url,
            sites=json.dumps(sorted(set(sites))) if sites else None,
            types=json.dumps(sorted({type_name(x) for x in types})) if types else None,
            secret=_seal(t, secret), position=int(head), status="active", attempts=0,
            created_at=datetime.now(UTC)))
    return webhook_id, secret


def rotate(t: Trialog, webhook_id: str) -> str:
    """A new secret; the previous one also signs for 24 hours, while receivers switch."""
    row = _row(t, webhook_id)
    secret = new_secret()
    with t.engine.begin() as connection:
        connection.execute(update(webhooks).where(webhooks.c.webhook_id == webhook_id).values(
            secret=_seal(t, secret), previous_secret=row.secret,
            previous_until=datetime.now(UTC) + ROTATION_GRACE))
    return secret


def listing(t: Trialog) -> list[dict[str, Any]]:
    """Every subscription with its position and failures (never its secret)."""
    with t.engine.connect() as connection:
        rows = connection.execute(select(webhooks).order_by(webhooks.c.created_at)).all()
        failed = dict(connection.execute(
            select(webhook_failures.c.webhook_id, func.count())
            .where(webhook_failures.c.redelivered_at.is_(None))
            .group_by(webhook_failures.c.webhook_id)).all())
    return [{"webhook_id": r.webhook_id, "url": r.url, "status": r.status,
             "sites": json.loads(r.sites) if r.sites else None,
             "types": json.loads(r.types) if r.types else None,
             "position": r.position, "failed": failed.get(r.webhook_id, 0),
             "attempts": r.attempts, "last_error": r.last_error,
             "retry_at": as_utc(r.retry_at).isoformat() if r.retry_at else None,
             "created_at": as_utc(r.created_at).isoformat()} for r in rows]


def _row(t: Trialog, webhook_id: str) -> Any:
    with t.engine.connect() as connection:
        row = connection.execute(select(webhooks)
                                 .where(webhooks.c.webhook_id == webhook_id)).first()
    if row is None:
        raise WebhookError(f"no webhook {webhook_id}")
    return row


def _reader(row: Any) -> Reader:
    scope = Scope.of(json.loads(row.sites)) if row.sites else EVERY_SITE
    types = frozenset(json.loads(row.types)) if row.types else None
    return Reader(scope, contact=False, types=types)


# --- delivery ----------------------------------------------------------------------------

class Sender:
    """One HTTP session per process, its connections reused."""

    def __init__(self, timeout: float = TIMEOUT) -> None:
        self.timeout = timeout
        self.session = requests.Session()
        # The receivers are configured here: no proxy settings read from the environment
        # for every request (a quarter of a delivery's time).
        self.session.trust_env = False
        self._secrets: dict[str, str] = {}

    def secret(self, t: Trialog, sealed: str) -> str:
        if sealed not in self._secrets:
            self._secrets[sealed] = _open(t, sealed)
        return self._secrets[sealed]

    def post(self, t: Trialog, row: Any, event: dict[str, Any]) -> requests.Response:
        body = orjson.dumps(event)
        message_id = f"msg_{row.webhook_id}_{event['position']}"
        timestamp = int(time.time())
        signatures = [sign(self.secret(t, row.secret), message_id, timestamp, body)]
        if row.previous_secret and row.previous_until and \
                as_utc(row.previous_until) > datetime.now(UTC):
            signatures.append(sign(self.secret(t, row.previous_secret), message_id,
                                   timestamp, body))
        # A redirect is not followed: the signed event would go to an address nobody
        # subscribed (or, after a 301, as a GET whose 2xx would count as delivered).
        headers = {"content-type": "application/cloudevents+json",
                   "webhook-id": message_id, "webhook-timestamp": str(timestamp),
                   "webhook-signature": " ".join(signatures)}
        deadline = time.monotonic() + self.timeout
        answer = self.session.post(row.url, data=body, timeout=self.timeout,
                                   headers=headers, allow_redirects=False, stream=True)
        _drain(answer, deadline)
        return answer


def _drain(answer: requests.Response, deadline: float) -> None:
    """Reads the rest of an answer (its status and headers are in), each read returning
    what one receipt brings, so that none waits past the deadline by more than one socket
    timeout: a receiver that sends its body slowly, or a large one, has its connection
    closed (a per-read timeout alone let one byte every few seconds hold a worker for
    good, and the body read whole held it all in memory). Read to its end, the connection
    goes back to the pool."""
    kept = 0
    try:
        while kept <= BODY_KEPT and time.monotonic() <= deadline:
            part = answer.raw.read1(BODY_KEPT + 1 - kept)
            if not part:
                answer.raw.release_conn()
                return
            kept += len(part)
    except (urllib3.exceptions.HTTPError, OSError):
        pass  # the status stands; the connection is not reused
    answer.raw.close()  # not read to its end: the connection is dropped
    answer.close()


SENDER = Sender()


def deliver(t: Trialog, webhook_id: str, feed: Feed | None = None,
            sender: Sender = SENDER,
            interrupted: tuple[type[BaseException], ...] = ()) -> str:
    """Delivers the subscription's events after its position, in order, until it is up
    to date, an attempt fails, or it has worked WORK_BUDGET; what happened: done, busy,
    failed, disabled, waiting, more. Its position is recorded every SAVE_EVERY.
    ``interrupted``: what the task raises at its time limit (an attempt it stops fails)."""
    feed = feed or Feed(t)
    started = time.monotonic()
    with _alone_with(t, webhook_id) as connection:
        if connection is None:
            return "busy"
        while True:
            if time.monotonic() - started > WORK_BUDGET:  # the next dispatch goes on
                return "more"
            row = connection.execute(select(webhooks)
                                     .where(webhooks.c.webhook_id == webhook_id)).first()
            if row is None or row.status != "active":
                return "disabled"
            if row.retry_at is not None and as_utc(row.retry_at) > datetime.now(UTC):
                return "waiting"
            events, next_position = feed.page(row.position, PAGE, _reader(row))
            if next_position == row.position:
                return "done"
            delivered = row.position
            saved = time.monotonic()
            for event in events:
                if time.monotonic() - started > WORK_BUDGET:  # the next dispatch goes on
                    _advance(connection, webhook_id, delivered)
                    return "more"
                outcome = _attempt(t, connection, sender, row, event, interrupted)
                if outcome != "delivered":
                    _advance(connection, webhook_id, delivered)
                    return outcome
                delivered = event["position"]
                if time.monotonic() - saved > SAVE_EVERY:
                    _advance(connection, webhook_id, delivered)
                    saved = time.monotonic()
                if row.attempts or row.last_error:  # the retried event went through: the
                    # count starts again (read once: the next deliveries write nothing)
                    row = connection.execute(select(webhooks).where(
                        webhooks.c.webhook_id == webhook_id)).one()
            _advance(connection, webhook_id, next_position)


def _attempt(t: Trialog, connection: Connection, sender: Sender, row: Any,
             event: dict[str, Any], interrupted: tuple[type[BaseException], ...] = ()) -> str:
    try:
        answer = sender.post(t, row, event)
        status, error, retry_after = answer.status_code, f"HTTP {answer.status_code}", \
            answer.headers.get("Retry-After")
        if answer.is_redirect:
            error += (f" to {answer.headers.get('Location', '?')[:300]}: redirects are not "
                      "followed; subscribe the address it names")
    except requests.RequestException as e:
        status, error, retry_after = None, f"{type(e).__name__}: {e}"[:500], None
    except interrupted:  # the task's time limit (workers.tasks): an answer sent slowly
        status, retry_after = None, None
        error = "no whole answer within the deliverer's time limit"
    if status is not None and 200 <= status < 300:
        if row.attempts or row.last_error:  # an error that no longer stands is not shown
            connection.execute(update(webhooks).where(webhooks.c.webhook_id == row.webhook_id)
                               .values(attempts=0, retry_at=None, last_error=None))
        return "delivered"
    now = datetime.now(UTC)
    if status == 410:
        connection.execute(update(webhooks).where(webhooks.c.webhook_id == row.webhook_id)
                           .values(status="disabled", disabled_at=now,
                                   last_error="410 Gone: the receiver asked to stop"))
        log.warning("webhook disabled by 410", extra={"webhook_id": row.webhook_id})
        return "disabled"
    attempts = row.attempts + 1
    log.warning("webhook delivery failed", extra={
        "webhook_id": row.webhook_id, "position": event["position"], "error": error,
        "attempts": attempts})
    if attempts >= MAX_ATTEMPTS:
        connection.execute(insert(webhook_failures).values(
            webhook_id=row.webhook_id, position=event["position"], attempts=attempts,
            last_error=error, failed_at=now))
        connection.execute(update(webhooks).where(webhooks.c.webhook_id == row.webhook_id)
                           .values(attempts=0, retry_at=None, last_error=error,
                                   position=event["position"]))
        return "failed"
    connection.execute(update(webhooks).where(webhooks.c.webhook_id == row.webhook_id)
                       .values(attempts=attempts, last_error=error,
                               retry_at=now + backoff(attempts, retry_after, now)))
    return "waiting"


def backoff(attempts: int, retry_after: str | None, now: datetime) -> timedelta:
    """Exponential with jitter over the upper half (so the waits add up to a known
    least), at most BACKOFF_CAP; a receiver's Retry-After (in seconds or as a date) when
    it asks for longer, also at most BACKOFF_CAP."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempts)
    delay = random.uniform(ceiling / 2, ceiling)
    asked = _retry_after(retry_after, now)
    if asked is not None:
        delay = max(delay, min(asked, BACKOFF_CAP))
    return timedelta(seconds=delay)


def _retry_after(value: str | None, now: datetime) -> float | None:
    if not value:
        return None
    if value.strip().isascii() and value.strip().isdigit():  # ("²" is a digit to isdigit)
        return float(value.strip())
    try:
        return (parsedate_to_datetime(value) - now).total_seconds()
    except (TypeError, ValueError):
        return None


def _advance(connection: Connection, webhook_id: str, position: int) -> None:
    connection.execute(update(webhooks).where(webhooks.c.webhook_id == webhook_id,
                                              webhooks.c.position < position)
                       .values(position=position))


def due(t: Trialog) -> list[str]:
    """Active subscriptions behind the log's head and not waiting for a retry."""
    table = events_table(t.service.recorder)
    now = datetime.now(UTC)
    with t.engine.connect() as connection:
        head = connection.execute(select(func.max(table.c.id))).scalar() or 0
        return list(connection.execute(select(webhooks.c.webhook_id).where(
            webhooks.c.status == "active", webhooks.c.position < head,
            webhooks.c.retry_at.is_(None) | (webhooks.c.retry_at <= now))).scalars())


def redeliver(t: Trialog, webhook_id: str, sender: Sender = SENDER) -> tuple[int, int]:
    """Sends the subscription's failed deliveries again, in order, once each; how many
    were delivered and how many failed again."""
    row = _row(t, webhook_id)
    feed = Feed(t)
    with t.engine.connect() as connection:
        positions = connection.execute(
            select(webhook_failures.c.position)
            .where(webhook_failures.c.webhook_id == webhook_id,
                   webhook_failures.c.redelivered_at.is_(None))
            .order_by(webhook_failures.c.position)).scalars().all()
    done = again = 0
    for position in positions:
        events, _ = feed.page(position - 1, 1, _reader(row))
        delivered = False
        if events:
            try:
                answer = sender.post(t, row, events[0])
                delivered = 200 <= answer.status_code < 300
            except requests.RequestException:
                delivered = False
        if delivered or not events:
            with t.engine.begin() as connection:
                connection.execute(update(webhook_failures).where(
                    webhook_failures.c.webhook_id == webhook_id,
                    webhook_failures.c.position == position)
                    .values(redelivered_at=datetime.now(UTC)))
            done += 1
        else:
            again += 1
    if done and not again:  # every failure delivered: none stands, unless one retries now
        with t.engine.begin() as connection:
            connection.execute(update(webhooks).where(webhooks.c.webhook_id == webhook_id,
                                                      webhooks.c.attempts == 0)
                               .values(last_error=None))
    return done, again


_LOCAL: dict[str, threading.Lock] = {}
_LOCAL_GUARD = threading.Lock()


@contextmanager
def _alone_with(t: Trialog, webhook_id: str) -> Iterator[Connection | None]:
    """An autocommit connection held by one deliverer of the subscription at a time (a
    PostgreSQL session lock, gone with the connection if the deliverer dies); None when
    another has it. On SQLite (the embedded default) the lock is this process's: run one
    worker process there."""
    engine = t.engine.execution_options(isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        if t.engine.dialect.name != "postgresql":
            with _LOCAL_GUARD:
                lock = _LOCAL.setdefault(webhook_id, threading.Lock())
            if not lock.acquire(blocking=False):
                yield None
                return
            try:
                yield connection
            finally:
                lock.release()
            return
        with locks.held(connection, f"trialog:webhook:{webhook_id}") as alone:
            yield connection if alone else None
