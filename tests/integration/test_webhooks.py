"""Webhooks with a real Celery worker, Redis, PostgreSQL and an HTTP receiver: deliveries
verified by the standardwebhooks package (not our code), in order, only the subscription's
sites and no contact details; a receiver that goes away and comes back gets everything in
order; 410 disables; what fails every attempt is kept and redelivered."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from standardwebhooks import Webhook

from domain import commands as c
from domain.access import EVERY_SITE, Scope
from infrastructure.audit.feed import Feed, Reader
from infrastructure.jobs import webhooks
from tests.integration import test_workers
from tests.integration.test_workers import REGISTERED, wait_until

stack = test_workers.stack  # the fixture: a Celery worker, Redis, PostgreSQL, an SMTP server


@dataclass
class Receiver:
    """A local HTTP receiver: keeps each delivery it answers 2xx; ``answer`` is the status
    it gives (with ``retry_after``)."""

    secret: str = ""
    answer: int = 204
    retry_after: str | None = None
    received: list[dict[str, Any]] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    unverified: int = 0
    port: int = 0
    server: ThreadingHTTPServer | None = None

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = receiver.answer
                if 200 <= status < 300:
                    try:
                        Webhook(receiver.secret).verify(body, dict(self.headers.items()))
                    except Exception:  # noqa: BLE001 - counted, then refused
                        receiver.unverified += 1
                        status = 400
                    else:
                        if self.headers["webhook-id"] not in receiver.ids:  # deduplicated
                            receiver.ids.add(self.headers["webhook-id"])
                            receiver.received.append(json.loads(body))
                self.send_response(status)
                if receiver.retry_after and status >= 400:
                    self.send_header("Retry-After", receiver.retry_after)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def positions(self) -> list[int]:
        return [e["position"] for e in self.received]


class Quiet(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A local HTTP server of ``handler`` while in the block: its address."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver().start()
    yield running
    if running.server is not None:
        running.stop()


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhooks, "BACKOFF_BASE", 0.05)
    monkeypatch.setattr(webhooks, "BACKOFF_CAP", 0.2)


def subscribe(stack, receiver: Receiver, sites=(), types=()) -> str:
    webhook_id, secret = webhooks.add(stack.trialog, receiver.url, list(sites), list(types))
    receiver.secret = secret
    return webhook_id


def delivered_until(stack, condition, timeout: float = 30) -> None:
    """Runs the periodic dispatch (as beat would) until ``condition`` holds."""
    def check() -> bool:
        stack.task("dispatch_webhooks").delay()
        return bool(condition())
    wait_until(check, timeout)


def stored_positions(stack, sites=None) -> list[int]:
    scope = Scope.of(sites) if sites else EVERY_SITE
    events, _ = Feed(stack.trialog).page(0, 1000, Reader(scope))
    return [e["position"] for e in events]


def test_deliveries_are_verified_ordered_and_only_of_the_subscriptions_sites(stack, receiver):
    everything = receiver
    metro = Receiver().start()
    try:
        subscribe(stack, everything)
        subscribe(stack, metro, sites=["METRO"])
        case_pid, metro_pid = stack.enrol(site="CASE"), stack.enrol(site="METRO")
        expected = stored_positions(stack)
        expected_metro = stored_positions(stack, ["METRO"])
        delivered_until(stack, lambda: everything.positions() == expected
                        and metro.positions() == expected_metro)
        assert everything.unverified == metro.unverified == 0
        assert {e["subject"] for e in metro.received} == {metro_pid, "allocation/METRO"}
        assert case_pid not in json.dumps(metro.received)
        assert metro.positions() == sorted(metro.positions())
        # Never a contact detail: deliveries are for systems, like a service token.
        assert "@example.org" not in json.dumps(everything.received)
        assert "1958-06-15" not in json.dumps(everything.received)
        assert {e["specversion"] for e in everything.received} == {"1.0"}
    finally:
        metro.stop()


def test_a_receiver_that_goes_away_gets_everything_in_order_when_it_is_back(
        stack, receiver, fast_retries):
    subscribe(stack, receiver)
    first = stack.enrol()
    delivered_until(stack, lambda: len(receiver.received) >= 3)
    receiver.stop()  # killed mid-stream: connections refused
    second, third = stack.enrol(), stack.enrol()
    stack.send(c.CompleteVisit(first, {"visit": "baseline", "completed_on": REGISTERED}))
    for _ in range(5):
        stack.task("dispatch_webhooks").delay()
    wait_until(lambda: webhooks.listing(stack.trialog)[0]["attempts"] > 0)
    receiver.start()  # back, on the same port
    expected = stored_positions(stack)
    delivered_until(stack, lambda: receiver.positions() == expected)
    assert {second, third} <= {e["subject"] for e in receiver.received}
    assert webhooks.listing(stack.trialog)[0]["attempts"] == 0


def test_retry_after_is_honoured_and_410_disables(stack, receiver):
    subscribe(stack, receiver)
    receiver.answer, receiver.retry_after = 503, "120"
    stack.enrol()
    delivered_until(stack, lambda: webhooks.listing(stack.trialog)[0]["attempts"] == 1)
    [listed] = webhooks.listing(stack.trialog)
    wait = (datetime.fromisoformat(listed["retry_at"]) - datetime.now(UTC)).total_seconds()
    assert 100 < wait <= 120 and listed["last_error"] == "HTTP 503"
    assert webhooks.deliver(stack.trialog, listed["webhook_id"]) == "waiting"
    receiver.answer, receiver.retry_after = 410, None
    with stack.trialog.engine.begin() as connection:  # as if the two minutes had passed
        connection.execute(webhooks.webhooks.update().values(retry_at=None))
    assert webhooks.deliver(stack.trialog, listed["webhook_id"]) == "disabled"
    assert webhooks.listing(stack.trialog)[0]["status"] == "disabled"
    assert webhooks.due(stack.trialog) == []


def test_a_redirect_is_not_followed(stack, receiver):
    """A 307 would have the signed event POSTed to an address nobody subscribed: the
    delivery fails, saying so, and the other address gets nothing."""
    class Redirecting(Quiet):
        def do_POST(self) -> None:
            self.send_response(307)
            self.send_header("Location", receiver.url)
            self.send_header("Content-Length", "0")
            self.end_headers()

    with serving(Redirecting) as url:
        webhook_id, _ = webhooks.add(stack.trialog, url, [], [])
        stack.enrol()
        assert webhooks.deliver(stack.trialog, webhook_id) == "waiting"  # to retry
    [listed] = [w for w in webhooks.listing(stack.trialog) if w["webhook_id"] == webhook_id]
    assert listed["last_error"].startswith(f"HTTP 307 to {receiver.url}: redirects are not")
    assert receiver.received == []


def test_what_fails_every_attempt_is_kept_and_redelivered(stack, receiver, fast_retries,
                                                          monkeypatch):
    monkeypatch.setattr(webhooks, "MAX_ATTEMPTS", 2)
    webhook_id = subscribe(stack, receiver)
    receiver.answer = 500
    stack.enrol()
    expected = stored_positions(stack)
    delivered_until(stack, lambda: webhooks.listing(stack.trialog)[0]["failed"]
                    == len(expected))
    assert receiver.received == []
    receiver.answer = 200
    assert webhooks.redeliver(stack.trialog, webhook_id) == (len(expected), 0)
    assert receiver.positions() == expected
    [listed] = webhooks.listing(stack.trialog)
    assert (listed["failed"], listed["last_error"]) == (0, None)  # none stands now

    with stack.trialog.engine.begin() as connection:  # as an event's last attempt leaves it
        connection.execute(webhooks.webhooks.update().values(last_error="HTTP 500"))
    count = len(receiver.received)
    stack.enrol()
    delivered_until(stack, lambda: len(receiver.received) > count)
    assert webhooks.listing(stack.trialog)[0]["last_error"] is None  # the next one went


def test_a_rotated_secret_signs_beside_the_old_one_for_a_day(stack, receiver):
    webhook_id = subscribe(stack, receiver)
    old = receiver.secret
    new = webhooks.rotate(stack.trialog, webhook_id)
    assert new != old and new.startswith("whsec_")
    pid = stack.enrol()
    for secret in (old, new):  # a receiver on either secret verifies every delivery
        receiver.secret = secret
        count = len(receiver.received)
        stack.send(c.ReportMedication(pid, {"drug": "ibuprofen", "started_on": REGISTERED,
                                            "stopped_on": None, "contains_b12": False}))
        delivered_until(stack, lambda n=count: len(receiver.received) > n)
    assert receiver.unverified == 0 and len(receiver.received) >= 5


def test_the_retries_of_one_event_cover_more_than_an_hour(stack):
    from datetime import timedelta

    now = datetime.now(UTC)
    for _ in range(200):
        waits = sum((webhooks.backoff(n, None, now) for n in range(1, webhooks.MAX_ATTEMPTS)),
                    timedelta())
        assert waits > timedelta(minutes=70)
    assert webhooks.backoff(3, "120", now) >= timedelta(seconds=120)
    assert webhooks.backoff(3, "99999", now) == timedelta(seconds=webhooks.BACKOFF_CAP)
    # A Retry-After of digits beyond ASCII is no number of seconds: it is not heeded (a
    # superscript two, which HTTP's Latin-1 allows, failed the delivery's bookkeeping).
    for odd in ("²", "1²", "٣"):
        assert webhooks.backoff(1, odd, now) <= timedelta(seconds=webhooks.BACKOFF_BASE * 2)


def test_after_a_retried_event_goes_through_the_next_one_gets_every_attempt(
        stack, receiver, monkeypatch):
    webhook_id = subscribe(stack, receiver)
    stack.enrol()
    with stack.trialog.engine.begin() as connection:  # as after a long outage
        connection.execute(webhooks.webhooks.update().values(
            attempts=webhooks.MAX_ATTEMPTS - 1))
    answers = iter([204, 500])  # the retried event goes through, the next one fails once
    real_post = webhooks.SENDER.post

    def post(t, row, event):
        receiver.answer = next(answers, 204)
        return real_post(t, row, event)

    monkeypatch.setattr(webhooks.SENDER, "post", post)
    assert webhooks.deliver(stack.trialog, webhook_id) == "waiting"
    [listed] = webhooks.listing(stack.trialog)
    assert (listed["attempts"], listed["failed"]) == (1, 0)


def test_a_receiver_that_sends_its_body_slowly_holds_a_deliverer_no_longer_than_its_timeout(
        stack):
    """Headers at once, then a byte every half second: the per-read timeout never ran out,
    and the body was read whole (each of two such receivers held a worker process for
    good, and the others' deliveries, deviations and reminders waited)."""
    sent: list[int] = []

    class Trickling(Quiet):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            written = 0
            try:
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    written += 1
                    time.sleep(0.5)
            except OSError:  # the deliverer closed the connection
                pass
            sent.append(written)

    with serving(Trickling) as url:
        webhook_id, _ = webhooks.add(stack.trialog, url, [], ["ParticipantScreened"])
        stack.enrol()
        assert webhooks.deliver(stack.trialog, webhook_id,
                                sender=webhooks.Sender(timeout=1.0)) == "done"  # its 200
        wait_until(lambda: sent, 20)  # the receiver's handler ends once cut off
    assert sent[0] < 100


def test_a_deliverer_that_dies_sends_again_only_what_it_delivered_since_its_last_record(
        stack, receiver, monkeypatch):
    """The position was recorded once per page (200 events) or on a failure: a deliverer
    killed mid-page had every event of the page sent again."""
    class Died(BaseException):
        pass

    monkeypatch.setattr(webhooks, "SAVE_EVERY", 0.0)
    webhook_id = subscribe(stack, receiver)
    stack.enrol()
    real_post, posted = webhooks.SENDER.post, []

    def post(t, row, event):
        if len(posted) == 2:
            raise Died
        posted.append(event["position"])
        return real_post(t, row, event)

    monkeypatch.setattr(webhooks.SENDER, "post", post)
    with pytest.raises(Died):
        webhooks.deliver(stack.trialog, webhook_id)
    [listed] = [w for w in webhooks.listing(stack.trialog) if w["webhook_id"] == webhook_id]
    assert listed["position"] == posted[-1]


def test_a_deliverer_stops_after_its_budget_and_the_next_goes_on_in_order(
        stack, receiver, monkeypatch):
    """A deliverer starts deliveries for WORK_BUDGET (the task's time limit is beyond it):
    it records where it is and says "more"; the next dispatch goes on from there."""
    monkeypatch.setattr(webhooks, "WORK_BUDGET", 0.2)
    webhook_id = subscribe(stack, receiver)
    stack.enrol()
    real_post = webhooks.SENDER.post

    def slow(t, row, event):
        time.sleep(0.15)
        return real_post(t, row, event)

    monkeypatch.setattr(webhooks.SENDER, "post", slow)
    assert webhooks.deliver(stack.trialog, webhook_id) == "more"
    [listed] = [w for w in webhooks.listing(stack.trialog) if w["webhook_id"] == webhook_id]
    assert 0 < len(receiver.positions()) < len(stored_positions(stack))
    assert listed["position"] == receiver.positions()[-1]
    monkeypatch.setattr(webhooks, "WORK_BUDGET", 60.0)
    assert webhooks.deliver(stack.trialog, webhook_id) == "done"
    assert receiver.positions() == stored_positions(stack)  # in order, none twice


def test_an_attempt_the_task_s_time_limit_stops_is_a_failed_one(stack, receiver):
    """What the task raises at its soft time limit (a receiver sending its answer slowly)
    ends the attempt as failed, to be tried again, and the deliverer's state stays."""
    class Limit(Exception):
        pass

    class Stopped(webhooks.Sender):
        def post(self, t, row, event):
            raise Limit

    webhook_id = subscribe(stack, receiver)
    stack.enrol()
    assert webhooks.deliver(stack.trialog, webhook_id, sender=Stopped(),
                            interrupted=(Limit,)) == "waiting"
    [listed] = [w for w in webhooks.listing(stack.trialog) if w["webhook_id"] == webhook_id]
    assert (listed["attempts"], listed["last_error"]) == (
        1, "no whole answer within the deliverer's time limit")
    assert receiver.received == []


@pytest.mark.parametrize("compressor", [None, "eventsourcing.compressor:ZlibCompressor"])
def test_a_secret_sealed_by_an_earlier_release_still_signs(database_url, monkeypatch,
                                                          compressor):
    """Secrets are sealed by the store's cipher alone, in base64, even when the store
    compresses its events: one sealed before, by an AES cipher of the same key built apart
    from the store's, opens to the same secret, and a new one opens by that cipher too."""
    import base64

    from eventsourcing.cryptography import AESCipher
    from eventsourcing.utils import Environment

    from infrastructure.store.bootstrap import bootstrap
    from tests.conftest import settings_for

    if compressor:
        monkeypatch.setenv("COMPRESSOR_TOPIC", compressor)
    trialog = bootstrap(settings_for(database_url), migrate=True)
    try:
        assert (trialog.service.mapper.compressor is not None) == bool(compressor)
        secret = webhooks.new_secret()
        earlier = AESCipher(Environment(env={"CIPHER_KEY": trialog.settings.cipher_key}))
        sealed_before = base64.b64encode(earlier.encrypt(secret.encode())).decode()
        assert webhooks._open(trialog, sealed_before) == secret
        sealed = webhooks._seal(trialog, secret)
        assert secret not in sealed and webhooks._open(trialog, sealed) == secret
        assert earlier.decrypt(base64.b64decode(sealed)).decode() == secret
    finally:
        trialog.close()
