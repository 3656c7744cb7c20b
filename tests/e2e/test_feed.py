"""The event feed over HTTP: every event a valid CloudEvent (read by the cloudevents SDK,
not our code), chained by digests, resumable with no gap or repeat under 8 concurrent
writers, filtered by the caller's sites, and without contact details for roles that may
not see them."""

from __future__ import annotations

import itertools
import json
import threading
import uuid

import pytest
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from sqlalchemy import create_engine, text

from domain.access import EVERY_SITE, Scope
from infrastructure.store.bootstrap import bootstrap
from infrastructure.store.tokens import create_token
from tests.conftest import settings_for
from tests.e2e import payloads as p
from tests.e2e.conftest import Client
from tests.e2e.test_lifecycle import enrol

JSON = JSONFormat()


@pytest.fixture(scope="module")
def tokens(server):
    """Clients by name: METRO- and CASE-scoped service tokens, an all-sites service token
    and an all-sites coordinator (who sees contact details)."""
    t = bootstrap(settings_for(server.database))
    suffix = uuid.uuid4().hex[:6]
    made = {name: Client(server.url, create_token(t.engine, f"feed-{name}-{suffix}", role,
                                                  scope))
            for name, role, scope in (("metro", "service", Scope.of(["METRO"])),
                                      ("case", "service", Scope.of(["CASE"])),
                                      ("service", "service", EVERY_SITE),
                                      ("coordinator", "coordinator", EVERY_SITE))}
    t.close()
    return made


def head(client: Client) -> int:
    answer = client.get("/v1/feed/checkpoint")
    assert answer.status_code == 200, answer.text
    return int(answer.json()["position"])


def read_all(client: Client, after: int, until: int | None = None,
             limit: int = 100) -> list[dict]:
    """Pages from ``after`` until a page covers ``until`` (or comes back empty)."""
    events: list[dict] = []
    while True:
        answer = client.get("/v1/feed", after=after, limit=limit)
        assert answer.status_code == 200, answer.text
        page = answer.json()
        events += page["events"]
        assert page["next"] >= after
        if page["next"] == after or (until is not None and page["next"] >= until):
            return events
        after = page["next"]


def test_every_event_is_a_cloud_event_chained_by_digest(server, tokens):
    client = tokens["coordinator"]
    start = head(client)
    pid, _ = enrol(client)
    assert client.command("RecordDose", pid, p.dose(1)).status_code == 201
    mine = [e for e in read_all(client, start, head(client)) if e["subject"] == pid]
    assert [e["data"]["type"] for e in mine] == [
        "ParticipantScreened", "ConsentRecorded", "ParticipantRandomized", "DoseRecorded"]
    for event in mine:
        parsed = JSON.read(CloudEvent, json.dumps(event).encode())
        assert parsed.get_specversion() == "1.0"
        assert parsed.get_id() == str(event["position"])
        assert parsed.get_source() == "/trials/NCT04205786"
        assert parsed.get_type() == "org.trialog." + event["data"]["type"]
        assert parsed.get_subject() == pid
        assert parsed.get_extension("position") == event["position"]
        assert parsed.get_data()["version"] == event["data"]["version"]
    # Each event names its predecessor's digest: the chain the consumer received holds.
    assert mine[0]["previousdigest"] == ""
    for before, after in itertools.pairwise(mine):
        assert after["previousdigest"] == before["digest"]
    positions = [e["position"] for e in mine]
    assert positions == sorted(positions)
    # A coordinator sees contact details; a service token never does.
    assert "participant@example.org" in json.dumps(mine)
    served = [e for e in read_all(tokens["service"], start, head(client))
              if e["subject"] == pid]
    assert [e["digest"] for e in served] == [e["digest"] for e in mine]
    assert "participant@example.org" not in json.dumps(served)
    assert "1958-06-15" not in json.dumps(served)


def test_a_metro_reader_never_gets_a_case_event(server, tokens):
    admin = server.client("admin")
    start = head(admin)
    case_pid, _ = enrol(admin, "CASE")
    metro_pid, _ = enrol(admin, "METRO")
    until = head(admin)
    metro = read_all(tokens["metro"], start, until, limit=3)
    case = read_all(tokens["case"], start, until, limit=3)
    assert metro_pid in {e["subject"] for e in metro}
    assert case_pid in {e["subject"] for e in case}
    assert all(case_pid not in json.dumps(e) for e in metro)
    assert all(metro_pid not in json.dumps(e) for e in case)
    assert not any(e["subject"] == "allocation/CASE" for e in metro)
    # The checkpoint counts what the reader may see, up to its position.
    checkpoint = tokens["metro"].get("/v1/feed/checkpoint").json()
    seen = read_all(tokens["metro"], 0, checkpoint["position"], limit=1000)
    seen = [e for e in seen if e["position"] <= checkpoint["position"]]
    assert checkpoint["events"] == len(seen)
    assert checkpoint["digest"] == seen[-1]["digest"]


def test_a_reader_resuming_with_after_misses_and_repeats_nothing_under_8_writers(server,
                                                                                tokens):
    if not server.database.startswith("postgresql"):
        pytest.skip("concurrent writers are a PostgreSQL matter; SQLite has one writer")
    admin = server.client("admin")
    start = head(admin)
    stop = threading.Event()
    errors: list[str] = []

    def write() -> None:
        client = Client(server.url, server.tokens["service"])
        while not stop.is_set():
            answer = client.command("ScreenParticipant", p.participant_id(), p.screening())
            if answer.status_code != 201:
                errors.append(answer.text)

    writers = [threading.Thread(target=write) for _ in range(8)]
    for writer in writers:
        writer.start()
    received: list[int] = []
    after = start
    try:
        while len(received) < 300:
            page = admin.get("/v1/feed", after=after, limit=7).json()
            received += [e["position"] for e in page["events"]]
            after = page["next"]
    finally:
        stop.set()
        for writer in writers:
            writer.join()
    end = head(admin)
    received += [e["position"] for e in read_all(admin, after, end, limit=50)]
    with create_engine(server.database).connect() as connection:
        stored = connection.execute(text(
            "SELECT id FROM trialog_events WHERE id > :start AND id <= :end ORDER BY id"),
            {"start": start, "end": end}).scalars().all()
    assert not errors
    assert received == stored  # every position once, in order


def test_contact_details_in_the_feed_are_accounted_for(server, tokens):
    coordinator = tokens["coordinator"]
    start = head(coordinator)
    pid, _ = enrol(server.client("admin"))
    read_all(coordinator, start, head(coordinator))
    read_all(tokens["service"], start, head(coordinator))  # redacted: nothing disclosed
    disclosures = server.client("auditor").get("/v1/audit/access",
                                               participant_id=pid).json()["disclosures"]
    assert [d["endpoint"] for d in disclosures] == ["GET /v1/feed"]
    assert disclosures[0]["actor"].startswith("feed-coordinator-")


def test_a_forgotten_stream_is_classified_again_not_skipped(server):
    """The feed's memory of which stream is whose site is bounded: a stream it forgot
    between two pages is read again, never passed over."""
    from domain.access import EVERY_SITE
    from infrastructure.audit.feed import Feed, Reader

    t = bootstrap(settings_for(server.database))
    try:
        admin = server.client("admin")
        start = head(admin)
        for _ in range(3):
            enrol(admin)
        end = head(admin)
        small = Feed(t, max_streams=2)
        events, after = [], start
        while after < end:
            page, after = small.page(after, 4, Reader(EVERY_SITE))
            events += page
        everything, _ = Feed(t).page(start, end - start, Reader(EVERY_SITE))
        assert [e["position"] for e in events if e["position"] <= end] == \
            [e["position"] for e in everything]
    finally:
        t.close()


def test_admins_list_the_webhook_subscriptions_without_their_secrets(server, tokens):
    from infrastructure.jobs import webhooks

    t = bootstrap(settings_for(server.database))
    try:
        webhook_id, secret = webhooks.add(t, "http://127.0.0.1:9/hook", ["METRO"], [])
    finally:
        t.close()
    answer = server.client("admin").get("/v1/webhooks")
    assert answer.status_code == 200, answer.text
    [listed] = [w for w in answer.json()["webhooks"] if w["webhook_id"] == webhook_id]
    assert (listed["sites"], listed["status"], listed["failed"]) == (["METRO"], "active", 0)
    assert secret not in answer.text and "whsec_" not in answer.text
    assert tokens["coordinator"].get("/v1/webhooks").status_code == 403


def test_a_cursor_past_the_newest_position_is_refused_not_an_empty_page(server, tokens):
    """Such a cursor no answer gave (a database restored from an older backup): an empty
    page would have the reader skip every event written up to it."""
    reader = tokens["service"]
    newest = head(reader)
    at_the_head = reader.get("/v1/feed", after=newest)  # others may write meanwhile
    assert at_the_head.status_code == 200
    assert all(e["position"] > newest for e in at_the_head.json()["events"])
    past = reader.get("/v1/feed", after=newest + 1000)
    assert (past.status_code, list(past.json()["fields"])) == (422, ["after"])
    assert "newest position" in past.json()["fields"]["after"][0]
