"""The read-model projection: exactly once under concurrent writers, the same tables after
a rebuild, and after a crash mid-batch."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from uuid import uuid4

import orjson
import pytest
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Enum,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    cast,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError

from domain import commands as c
from domain.access import EVERY_SITE, Scope
from domain.participant import participant_uuid
from infrastructure.audit.feed import Feed, Reader
from infrastructure.readside.projections import FeedProjection, LogFollower, TrialProjection
from infrastructure.readside.quarantine import count as quarantine_count
from infrastructure.store.tables import (
    READ_MODELS,
    feed_events,
    insert_rows,
    participants,
    positions,
)
from tests.conftest import TEST_SECRETS
from tests.factories import consent, new_participant_id, screening
from tests.integration.helpers import dose, enrol, send

TRIALOG = str(Path(sys.executable).with_name("trialog"))
applied_table = Table("test_applied", MetaData(), Column("id", Integer, primary_key=True))


class Recorder(LogFollower):
    """Writes every notification id it is given, in the batch's transaction: a second
    application of one id breaks the primary key."""

    name = "test_recorder"
    topic_prefix = ""

    def apply(self, session, batch) -> None:
        if batch:
            session.execute(insert(applied_table), [{"id": position} for position, _ in batch])


def snapshot(t) -> dict[str, list[tuple]]:
    with t.engine.connect() as connection:
        return {table.name: sorted(tuple(row) for row in connection.execute(select(table)))
                for table in READ_MODELS}


def workload(t, participants_: int = 6) -> None:
    for _ in range(participants_):
        pid = enrol(t)
        for day in range(4):
            send(t, c.RecordDose(pid, dose(day)))
        send(t, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": dose(0)["taken_on"],
                                      "bpi_sf": {"worst": 6, "least": 2, "average": 4,
                                                 "now": 4}}))
    send(t, c.WithdrawParticipant(pid, {"withdrawn_on": dose(5)["taken_on"],
                                        "scope": "treatment", "reason_code": "toxicity"}))


def stored_versions(t) -> dict[str, int]:
    with t.engine.connect() as connection:
        return dict(connection.execute(select(participants.c.participant_id,
                                              participants.c.version)).all())


@pytest.mark.parametrize("isolated_url", ["postgresql"], indirect=True)
def test_a_live_follower_applies_every_event_once_under_8_concurrent_writers(isolated):
    applied_table.create(isolated.engine)
    recorder, projection = Recorder(isolated, batch_size=50), TrialProjection(isolated, 50)
    pids = _following(isolated, [recorder, projection], writers=8, participants_=80)
    with isolated.engine.connect() as connection:
        every_id = set(connection.execute(select(recorder.events_table.c.id)).scalars())
        applied = list(connection.execute(select(applied_table.c.id)).scalars())
    assert len(every_id) > 80 * 8
    assert sorted(applied) == sorted(every_id)  # none skipped, none twice (primary key)
    versions = stored_versions(isolated)
    assert {pid: versions[pid] for pid in pids} == {
        pid: isolated.service.get_participant(pid).version for pid in pids}


@pytest.mark.parametrize("isolated_url", ["postgresql"], indirect=True)
def test_two_followers_of_one_name_apply_every_event_once_under_concurrent_writers(isolated):
    """Two processes' followers of the same name share its position row: the claim locks
    it, so a batch is applied by one of them only, and none is skipped. (A second
    application would break the primary key and set its participant aside: the
    quarantine stays empty.)"""
    applied_table.create(isolated.engine)
    twins = [Recorder(isolated, batch_size=7) for _ in range(2)]
    _following(isolated, twins, writers=6, participants_=40)
    with isolated.engine.connect() as connection:
        every_id = set(connection.execute(select(twins[0].events_table.c.id)).scalars())
        applied = list(connection.execute(select(applied_table.c.id)).scalars())
        assert quarantine_count(connection) == 0
    assert len(every_id) > 40 * 8
    assert sorted(applied) == sorted(every_id)


def _following(t, followers: list[LogFollower], writers: int,
               participants_: int) -> list[str]:
    """Runs the followers in threads while ``writers`` threads write ``participants_``
    participants, until every follower has caught up; the participants' ids."""
    stop = threading.Event()
    threads = [threading.Thread(target=f.follow, args=(stop,)) for f in followers]
    for thread in threads:
        thread.start()
    with ThreadPoolExecutor(writers) as pool:
        pids = list(pool.map(lambda _: _write_one(t), range(participants_)))
    deadline = time.monotonic() + 60
    while min(f.position() for f in followers) < followers[0].head():
        assert time.monotonic() < deadline, "the followers did not catch up"
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join()
    return pids


def _write_one(t) -> str:
    pid = enrol(t)
    for day in range(5):
        send(t, c.RecordDose(pid, dose(day)))
    return pid


def test_a_rebuild_gives_row_for_row_the_live_built_tables(isolated):
    projection = TrialProjection(isolated, batch_size=7)
    workload(isolated)
    projection.catch_up()
    live = snapshot(isolated)
    assert len(live["rm_participants"]) == 6 and len(live["rm_visits"]) == 6 * 4
    assert projection.rebuild() == projection.head()
    assert snapshot(isolated) == live


def test_a_participant_changed_elsewhere_is_read_back_not_taken_from_the_cache(isolated):
    first, second = TrialProjection(isolated), TrialProjection(isolated)
    pid = enrol(isolated)
    first.catch_up()  # caches the participant at version 3
    send(isolated, c.RecordConsent(pid, consent()))
    second.catch_up()  # another process applies version 4
    send(isolated, c.RecordDose(pid, dose(0)))
    first.catch_up()  # version 5: the cached version 3 is stale
    assert stored_versions(isolated)[pid] == 5
    live = snapshot(isolated)
    TrialProjection(isolated).rebuild()
    assert snapshot(isolated) == live


@pytest.mark.parametrize("isolated_url", ["postgresql", "sqlite"], indirect=True)
def test_a_follower_killed_mid_batch_resumes_to_the_same_tables(isolated, isolated_url):
    for _ in range(4):
        workload(isolated, participants_=10)
    projection = TrialProjection(isolated)
    head = projection.head()
    env = {**os.environ, "TRIALOG_DATABASE_URL": isolated_url, **TEST_SECRETS}
    command = [TRIALOG, "projections", "follow", "--batch-size", "20"]
    follower = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 60
    while projection.position() == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    follower.send_signal(signal.SIGKILL)
    follower.wait()
    assert 0 < projection.position() < head  # it was killed part-way

    restarted = subprocess.Popen(command, env=env)
    try:
        while projection.position() < head:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        restarted.terminate()
        restarted.wait(timeout=10)
    resumed = snapshot(isolated)
    projection.rebuild()
    assert snapshot(isolated) == resumed


# `trialog projections follow` in which a thread that waits on an event holds its lock for
# a while, as the main thread may when the followers keep the GIL from it: a SIGTERM or a
# SIGINT arriving then must still end the process.
_HELD_WAITS = """
import sys, threading, time

class Held(threading.Event):
    def wait(self, timeout=None):
        if timeout is None or threading.current_thread() is not threading.main_thread():
            return super().wait(timeout)
        with self._cond:  # the whole wait, in Python's bytecodes, at which handlers run
            until = time.monotonic() + timeout
            while not self._flag and time.monotonic() < until:
                pass
            return self._flag

threading.Event = Held
from infrastructure.cli import main
sys.exit(main(["projections", "follow"]))
"""


@pytest.mark.parametrize("isolated_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("ending", [signal.SIGTERM, signal.SIGINT])
def test_a_follower_ends_on_a_signal_whatever_its_main_thread_holds(isolated, isolated_url,
                                                                    ending):
    workload(isolated, participants_=5)
    projection = TrialProjection(isolated)
    env = {**os.environ, "TRIALOG_DATABASE_URL": isolated_url, **TEST_SECRETS}
    follower = subprocess.Popen([sys.executable, "-c", _HELD_WAITS], env=env)
    try:
        deadline = time.monotonic() + 60
        while projection.position() < projection.head():
            assert time.monotonic() < deadline, "the follower did not catch up"
            time.sleep(0.05)
        follower.send_signal(ending)
        assert follower.wait(timeout=30) == 0
    finally:
        follower.kill()
        follower.wait()


def test_followers_starting_together_create_their_position_row_once(trialog):
    """Several API processes start their followers at once on a fresh database: the one
    that loses the race to create the position row carries on (no error)."""
    import threading
    import uuid

    from infrastructure.readside.projections import TrialProjection

    name = f"race-{uuid.uuid4().hex[:8]}"
    start, errors = threading.Barrier(6), []

    def begin() -> None:
        follower = TrialProjection(trialog)
        follower.name = name
        start.wait()
        try:
            follower.ensure_position()
        except Exception as e:  # noqa: BLE001 - the test reports any
            errors.append(e)

    threads = [threading.Thread(target=begin) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    follower = TrialProjection(trialog)
    follower.name = name
    assert follower.position() == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_sqlite_database_is_in_wal_mode_before_its_first_transaction(trialog):
    """The library switches SQLite to WAL on its first transaction, which takes the whole
    file: threads beginning at that moment (followers starting together) found the
    database locked. bootstrap switches it first."""
    import sqlite3
    from contextlib import closing

    path = trialog.settings.database_url.removeprefix("sqlite:///")
    with closing(sqlite3.connect(path)) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.parametrize("isolated_url", ["postgresql"], indirect=True)
def test_the_feeds_follower_renders_every_event_once_under_8_concurrent_writers(isolated):
    feed = FeedProjection(isolated, batch_size=50)
    stop = threading.Event()
    follower = threading.Thread(target=feed.follow, args=(stop,))
    follower.start()
    with ThreadPoolExecutor(8) as writers:
        list(writers.map(lambda _: _write_one(isolated), range(80)))
    deadline = time.monotonic() + 60
    while feed.position() < feed.head():
        assert time.monotonic() < deadline, "the feed's follower did not catch up"
        time.sleep(0.05)
    stop.set()
    follower.join(10)
    events = isolated.service.recorder.events_record_cls.__table__
    with isolated.engine.connect() as connection:
        stored = connection.execute(select(events.c.id).order_by(events.c.id)).scalars().all()
        rendered = connection.execute(
            select(feed_events.c.position).order_by(feed_events.c.position)).scalars().all()
    assert rendered == stored  # none skipped, none twice


@pytest.mark.parametrize("isolated_url", ["postgresql", "sqlite"], indirect=True)
def test_the_feed_rendered_ahead_is_the_feed_read_from_the_store(isolated):
    """Pages served from rm_feed, from the store, and half from each are the same, for a
    reader of every site, a CASE reader and a reader allowed contact details (whose
    disclosures are the same too)."""
    workload(isolated)
    FeedProjection(isolated).catch_up()
    head = FeedProjection(isolated).head()
    readers = [Reader(EVERY_SITE), Reader(Scope.of(["CASE"])),
               Reader(EVERY_SITE, contact=True)]

    def pages(rendered_until: int) -> list[tuple[list[bytes], int, set[str]]]:
        with isolated.engine.begin() as connection:
            connection.execute(update(positions).where(positions.c.name == "feed")
                               .values(position=rendered_until))
        answers = []
        for reader in readers:
            after = 0
            while after < head:
                disclosed: set[str] = set()
                events, after = Feed(isolated).page_json(after, 7, reader, disclosed)
                answers.append((events, after, disclosed))
        return answers

    ahead, mixed, store = pages(head), pages(head // 2), pages(0)
    assert ahead == mixed == store
    assert any(disclosed for _, _, disclosed in ahead)  # the contact reader's screenings
    with isolated.engine.connect() as connection:
        bodies = connection.execute(select(feed_events.c.body)).scalars().all()
    assert len(bodies) == head and all(bodies)
    assert not any("@" in body for body in bodies)  # contact details never rendered ahead
    with isolated.engine.begin() as connection:  # rm_feed without its first rows (restored?)
        connection.execute(delete(feed_events).where(feed_events.c.position <= head // 3))
    assert pages(head) == store  # what lacks a prefix is read from the store


@pytest.mark.parametrize("isolated_url", ["postgresql", "sqlite"], indirect=True)
def test_a_history_rendered_ahead_is_the_history_read_from_the_store(isolated):
    """A participant's history from rm_feed's entries (then the store for what the feed's
    follower has not reached) is the one decoded from the store, with and without contact
    details; where rm_feed lacks a prefix of the log it says so, and the store is read."""
    from infrastructure.audit.history import event_entry, redact_contact
    from infrastructure.store.stored import plain_stream

    workload(isolated, 3)
    emailed = enrol(isolated)
    screening_event = isolated.service.get_participant(emailed).screening_event
    send(isolated, c.CorrectData(emailed, {"event_id": screening_event, "field": "email",
                                           "value": "new@example.org"}), reason="typo")
    FeedProjection(isolated).catch_up()
    head = FeedProjection(isolated).head()
    feed = Feed(isolated)
    with isolated.engine.connect() as connection:
        pids = connection.execute(select(feed_events.c.subject).where(
            feed_events.c.type == "ParticipantScreened")).scalars().all()
    assert emailed in pids and len(pids) == 4

    def from_store(pid: str, contact: bool) -> list[bytes]:
        stream = participant_uuid(pid)
        entries = [event_entry(stream, v, topic, content, isolated.veil_digest)
                   for v, topic, content in plain_stream(isolated.service, stream)]
        return [orjson.dumps(e if contact else redact_contact(e)) for e in entries]

    def rendered(pid: str, contact: bool):
        return feed.history_json(pid, contact)

    for pid in pids:
        for contact in (False, True):
            entries, position = rendered(pid, contact)
            assert entries == from_store(pid, contact)
            assert position == max(row.id for row in _rows_of(isolated, pid))
    assert any(b"new@example.org" in e for e in rendered(emailed, True)[0])
    assert not any(b"@" in e for e in rendered(emailed, False)[0])
    first = min(row.id for row in _rows_of(isolated, emailed))
    with isolated.engine.begin() as connection:  # one participant's first row lost
        connection.execute(delete(feed_events).where(feed_events.c.position == first))
    assert rendered(emailed, True) is None and rendered(emailed, False) is None
    FeedProjection(isolated).rebuild()
    with isolated.engine.begin() as connection:  # the follower half way
        connection.execute(delete(feed_events).where(feed_events.c.position > head // 2))
    for pid in pids:
        assert rendered(pid, True)[0] == from_store(pid, True)
    with isolated.engine.begin() as connection:  # rm_feed without its first rows (restored?)
        connection.execute(delete(feed_events).where(feed_events.c.position <= head // 4))
    answers = [rendered(pid, contact) for pid in pids for contact in (False, True)]
    assert None in answers  # the participants whose first events are gone: from the store
    for (pid, contact), answer in zip([(p, k) for p in pids for k in (False, True)], answers,
                                      strict=True):
        assert answer is None or answer[0] == from_store(pid, contact)


@pytest.mark.parametrize("isolated_url", ["postgresql", "sqlite"], indirect=True)
def test_after_migration_0019_the_feed_is_rendered_again_without_contact_command_ids(
        isolated_url):
    """Before 0019, rm_feed's events and entries without contact details held the id of
    the screening's command: the migration empties rm_feed and the follower renders the
    log again."""
    from infrastructure.audit.history import history
    from infrastructure.store import migrations
    from infrastructure.store.bootstrap import bootstrap
    from tests.conftest import settings_for

    t = bootstrap(settings_for(isolated_url), migrate=False)
    try:
        migrations.upgrade(t.engine, "0018")
        pid = _enrol_without_the_bus(t)  # whose records have a later schema
        _render_without_seals(t)
        screening_command = history(t.service, pid, veil=t.veil_digest)[0]["command_id"]
        with t.engine.begin() as connection:  # as rendered before: the id in plain text
            connection.execute(update(feed_events).values(
                body=feed_events.c.body + screening_command))
        migrations.upgrade(t.engine)
        with t.engine.connect() as connection:
            assert connection.execute(select(feed_events.c.position)).first() is None
            assert connection.execute(select(positions.c.position).where(
                positions.c.name == "feed")).first() is None
        FeedProjection(t).catch_up()
        with t.engine.connect() as connection:
            rendered = connection.execute(select(feed_events.c.body, feed_events.c.entry)
                                          ).all()
        assert len(rendered) == FeedProjection(t).head()
        assert not [row for row in rendered if screening_command in f"{row.body}{row.entry}"]
    finally:
        t.close()


@pytest.mark.parametrize("isolated_url", ["postgresql", "sqlite"], indirect=True)
def test_after_migration_0030_the_feed_is_rendered_again_from_the_first_address(
        isolated_url):
    """Before 0030, an address quoted in a reason was rendered whole into rm_feed's
    events and entries without contact details: the migration deletes the rows from the
    first that holds an address, and the follower renders them again, masked."""
    from infrastructure.store import migrations
    from infrastructure.store.bootstrap import bootstrap
    from tests.conftest import settings_for

    t = bootstrap(settings_for(isolated_url), migrate=False)
    try:
        migrations.upgrade(t.engine, "0029")
        pids = [_enrol_without_the_bus(t) for _ in range(3)]
        FeedProjection(t).catch_up()
        head = FeedProjection(t).head()
        with t.engine.connect() as connection:
            quoted = connection.execute(select(feed_events.c.position).where(
                feed_events.c.subject == pids[1]).order_by(feed_events.c.position)).scalar()
        with t.engine.begin() as connection:  # as rendered before: an address whole
            connection.execute(update(feed_events).where(feed_events.c.position == quoted)
                               .values(body=feed_events.c.body + "jane.doe@example.org"))
        migrations.upgrade(t.engine, "0030")
        with t.engine.connect() as connection:
            kept = connection.execute(select(feed_events.c.position)).scalars().all()
            position = connection.execute(select(positions.c.position).where(
                positions.c.name == "feed")).scalar()
        assert kept == list(range(1, quoted)) and position == quoted - 1
        FeedProjection(t).catch_up()
        with t.engine.connect() as connection:
            rendered = connection.execute(select(feed_events.c.body)).scalars().all()
        assert len(rendered) == head and not [b for b in rendered if "@" in b]
    finally:
        t.close()


@pytest.mark.parametrize("isolated_url", ["postgresql", "sqlite"], indirect=True)
def test_migration_0031_masks_the_addresses_the_read_models_kept_in_free_texts(isolated_url):
    """Query threads and resolutions are kept in plain text for every role: written
    before, an address quoted there was kept whole."""
    import uuid as uuid_module
    from datetime import UTC, datetime

    from sqlalchemy import insert

    from infrastructure.store import migrations
    from infrastructure.store.bootstrap import bootstrap
    from infrastructure.store.tables import deviations, queries
    from tests.conftest import settings_for

    t = bootstrap(settings_for(isolated_url), migrate=False)
    try:
        migrations.upgrade(t.engine, "0030")
        deviation = str(uuid_module.uuid4())
        thread = [{"action": "raise", "by": "cra-1", "at": "2026-03-05T10:00:00+00:00",
                   "text": "The source names jane.doe@example.org"}]
        with t.engine.begin() as connection:  # as written before
            connection.execute(insert(queries).values(
                query_id=str(uuid_module.uuid4()), participant_id="CASE-0001",
                site_id="CASE", status="open", target={"visit": "baseline"},
                opened_at=datetime.now(UTC), opened_by="cra-1", thread=thread))
            connection.execute(insert(deviations).values(
                deviation_id=deviation, participant_id="CASE-0001", code="wrong_dose",
                severity="minor", status="resolved", detail="", evidence=[],
                detected_at=datetime.now(UTC), resolution="confirmed by jane.doe@example.org"))
        migrations.upgrade(t.engine, "0031")
        with t.engine.connect() as connection:
            (kept,) = connection.execute(select(queries.c.thread)).scalars().all()
            resolution = connection.execute(select(deviations.c.resolution)).scalar()
        assert kept == [{**thread[0], "text": "The source names j***@example.org"}]
        assert resolution == "confirmed by j***@example.org"
    finally:
        t.close()


@pytest.mark.parametrize("isolated_url", ["postgresql", "sqlite"], indirect=True)
def test_after_migration_0032_the_read_models_and_the_feed_are_rendered_again(isolated_url):
    """0031 masked an '@' that is no address as one, for good (only the events can undo
    it); read models written before a sample on a verified visit counted say verified:
    0032 empties the read models and rm_feed, and the followers write them again by this
    release's rules."""
    from infrastructure.store import migrations
    from infrastructure.store.bootstrap import bootstrap
    from infrastructure.store.tables import participants, queries
    from tests.conftest import settings_for

    t = bootstrap(settings_for(isolated_url), migrate=False)
    try:
        migrations.upgrade(t.engine, "0031")
        pid = enrol(t)
        send(t, c.RaiseQuery(pid, {"query_id": str(uuid4()), "visit": "baseline",
                                   "text": "BP 120/80@10.30 on the source"}))
        TrialProjection(t).catch_up()
        FeedProjection(t).catch_up()
        with t.engine.begin() as connection:  # as 0031 and the rules before left them
            connection.execute(update(queries).values(thread=[
                {**m, "text": "BP 1***@10.30 on the source"} for m in connection.execute(
                    select(queries.c.thread)).scalar()]))
            connection.execute(update(participants).values(status="stale"))
            connection.execute(update(feed_events).where(
                feed_events.c.subject == pid).values(entry=feed_events.c.entry + "1***@10"))
        migrations.upgrade(t.engine)
        with t.engine.connect() as connection:
            assert connection.execute(select(participants.c.participant_id)).first() is None
            assert connection.execute(select(feed_events.c.position)).first() is None
            assert connection.execute(select(positions.c.name, positions.c.position).where(
                positions.c.name.in_(("trial", "feed"))).order_by(positions.c.name)
            ).all() == [("feed", 0), ("trial", 0)]
        TrialProjection(t).catch_up()
        FeedProjection(t).catch_up()
        with t.engine.connect() as connection:
            (thread,) = connection.execute(select(queries.c.thread).where(
                queries.c.participant_id == pid)).scalars().all()
            status = connection.execute(select(participants.c.status).where(
                participants.c.participant_id == pid)).scalar()
            entries = connection.execute(select(feed_events.c.entry).where(
                feed_events.c.subject == pid)).scalars().all()
        assert thread[0]["text"] == "BP 120/80@10.30 on the source" and status == "randomized"
        assert len(entries) == 4 and not [e for e in entries if "1***@10" in e]
    finally:
        t.close()


def test_after_migration_0033_the_read_models_show_a_moved_visit_s_verification(
        isolated_url):
    """A verified visit whose data a correction moved to another was shown not verified
    (the read models listed only visits completed or missed); 0033 empties the read models
    (not the feed) and their follower writes them again by this release's rules."""
    from infrastructure.store import migrations
    from infrastructure.store.bootstrap import bootstrap
    from infrastructure.store.tables import participants
    from tests.conftest import settings_for
    from tests.integration.helpers import REGISTERED

    t = bootstrap(settings_for(isolated_url), migrate=False)
    try:
        migrations.upgrade(t.engine, "0032")
        pid = enrol(t)
        send(t, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": REGISTERED}))
        send(t, c.VerifySource(pid, {"visit": "baseline"}))
        event = t.service.get_participant(pid).completed_visits()["baseline"]["event_id"]
        send(t, c.CorrectData(pid, {"event_id": event, "field": "visit", "value": "week6"}),
             reason="entered on the wrong visit")
        TrialProjection(t).catch_up()
        FeedProjection(t).catch_up()
        with t.engine.begin() as connection:  # as the release before wrote it
            management = connection.execute(select(participants.c.management)).scalar()
            del management["visits"]["baseline"]
            connection.execute(update(participants).values(management=management))
        migrations.upgrade(t.engine, "0033")
        with t.engine.connect() as connection:
            assert connection.execute(select(participants.c.participant_id)).first() is None
            assert dict(connection.execute(select(positions.c.name, positions.c.position)
                                           .where(positions.c.name.in_(("trial", "feed"))))
                        .all())["trial"] == 0
            assert connection.execute(select(feed_events.c.position)).first() is not None
        TrialProjection(t).catch_up()
        with t.engine.connect() as connection:
            management = connection.execute(select(participants.c.management)).scalar()
        assert management["visits"]["baseline"]["sdv"] == "changed_since_verified"
    finally:
        t.close()


def test_after_migration_0035_a_query_s_thread_keeps_a_step_s_reason_beside_its_text(
        isolated_url):
    """A reopening's text hid its required reason in the thread the query list and the
    console show; 0035 empties the read models and their follower writes them again,
    each reason masked as a text is when it quotes an address."""
    from infrastructure.store import migrations
    from infrastructure.store.bootstrap import bootstrap
    from infrastructure.store.tables import queries
    from tests.conftest import settings_for

    t = bootstrap(settings_for(isolated_url), migrate=False)
    try:
        migrations.upgrade(t.engine, "0034")
        pid, query = enrol(t), str(uuid4())
        send(t, c.RaiseQuery(pid, {"query_id": query, "text": "Pain 7?",
                                   "visit": "baseline"}), actor="cra")
        send(t, c.RespondToQuery(pid, {"query_id": query, "text": "7, as the source"}))
        send(t, c.CloseQuery(pid, {"query_id": query}), actor="cra", reason="as answered")
        send(t, c.ReopenQuery(pid, {"query_id": query, "text": "Please look again"}),
             actor="cra", reason="asked by ann.lee@example.org")
        TrialProjection(t).catch_up()
        with t.engine.begin() as connection:  # as the release before wrote it
            thread = connection.execute(select(queries.c.thread)).scalar()
            del thread[-1]["reason"]
            connection.execute(update(queries).values(thread=thread))
        migrations.upgrade(t.engine, "0035")
        with t.engine.connect() as connection:
            assert connection.execute(select(queries.c.query_id)).first() is None
            assert connection.execute(select(positions.c.position).where(
                positions.c.name == "trial")).scalar() == 0
        TrialProjection(t).catch_up()
        with t.engine.connect() as connection:
            thread = connection.execute(select(queries.c.thread)).scalar()
        assert (thread[-1]["text"], thread[-1]["reason"]) == (
            "Please look again", "asked by a***@example.org")
        assert thread[2]["text"] == "as answered" and "reason" not in thread[2]
    finally:
        t.close()


def test_read_models_a_process_of_older_rules_rendered_are_rendered_again_at_start(
        isolated):
    """A process of the release before, still following the log after migration 0035
    emptied the read models, rendered them again its way (no step's reason), and the
    follower of this release found nothing left to do: deep verify called the rows
    edited. Such a process writes no stamp of these rules."""
    from infrastructure.readside.projections import RULES, RULES_ROW
    from infrastructure.store.tables import queries

    t = isolated
    pid, query = enrol(t), str(uuid4())
    send(t, c.RaiseQuery(pid, {"query_id": query, "text": "Pain 7?", "visit": "baseline"}))
    send(t, c.CancelQuery(pid, {"query_id": query, "text": "asked twice"}), reason="a typo")
    TrialProjection(t).catch_up()
    with t.engine.begin() as connection:  # as the older release renders it, stamping none
        thread = connection.execute(select(queries.c.thread)).scalar()
        del thread[-1]["reason"]
        connection.execute(update(queries).values(thread=thread))
        connection.execute(delete(positions).where(positions.c.name == RULES_ROW))
    TrialProjection(t).catch_up()
    with t.engine.connect() as connection:
        thread = connection.execute(select(queries.c.thread)).scalar()
        stamp = connection.execute(select(positions.c.position).where(
            positions.c.name == RULES_ROW)).scalar()
    assert thread[-1]["reason"] == "a typo" and stamp == RULES
    with t.engine.begin() as connection:  # stamped: this release's rows are kept as they are
        connection.execute(update(queries).values(thread=[]))
    TrialProjection(t).catch_up()
    with t.engine.connect() as connection:
        assert connection.execute(select(queries.c.thread)).scalar() == []


def test_after_migration_0034_the_feed_is_rendered_again_and_the_read_models_kept(
        isolated_url):
    """The access register's events had the study's id as their subject, as the database
    lock's: 0034 empties rm_feed (not the read models) and its follower writes it again."""
    from infrastructure.store import migrations
    from infrastructure.store.bootstrap import bootstrap
    from infrastructure.store.tables import participants
    from tests.conftest import settings_for

    t = bootstrap(settings_for(isolated_url), migrate=False)
    try:
        migrations.upgrade(t.engine, "0033")
        pid = enrol(t)
        TrialProjection(t).catch_up()
        FeedProjection(t).catch_up()
        migrations.upgrade(t.engine, "0034")
        with t.engine.connect() as connection:
            assert connection.execute(select(feed_events.c.position)).first() is None
            assert connection.execute(select(participants.c.participant_id)).scalar() == pid
            assert dict(connection.execute(select(positions.c.name, positions.c.position)
                                           .where(positions.c.name.in_(("trial", "feed"))))
                        .all())["feed"] == 0
        FeedProjection(t).catch_up()
        with t.engine.connect() as connection:
            assert connection.execute(select(feed_events.c.position)).first() is not None
    finally:
        t.close()


def test_the_feed_s_follower_renders_again_what_a_release_before_0034_rendered(isolated):
    """A release still following the log while migration 0034 emptied rm_feed renders it
    again with the register's events under the study's subject (their seals holding): the
    follower of this release renders them again when it starts."""
    import threading

    from infrastructure.store.tokens import create_token, revoke_token

    t = isolated
    name = f"old-{uuid4().hex[:8]}"
    create_token(t.engine, name, "auditor")
    revoke_token(t.engine, name)
    FeedProjection(t).catch_up()
    study = t.protocol.study_id
    with t.engine.begin() as connection:  # as the release before rendered them
        connection.execute(update(feed_events).where(feed_events.c.type.in_(
            ("RegisterOpened", "TokenRevoked"))).values(subject=study))
    follower = FeedProjection(t)
    assert follower.rendered_before()
    stopped = threading.Event()
    stopped.set()  # renders again, then follows no further
    follower.follow(stopped)
    assert not follower.rendered_before()
    with t.engine.connect() as connection:
        subjects = set(connection.execute(select(feed_events.c.subject).where(
            feed_events.c.type == "TokenRevoked")).scalars())
    assert subjects == {f"access/{study}"}


def _enrol_without_the_bus(t) -> str:
    """A randomized participant's events, saved by the service alone."""
    from domain.commands import Audit
    from tests.integration.helpers import REGISTERED

    pid = new_participant_id()
    for command in (c.ScreenParticipant(pid, screening()), c.RecordConsent(pid, consent()),
                    c.RandomizeParticipant(pid, {"registered_on": REGISTERED})):
        t.service.execute(command, Audit(str(uuid4()), "test-service", datetime.now(UTC)))
    return pid


def _render_without_seals(t) -> None:
    """The feed's follower's work on a schema from before migration 0023 (no seals)."""
    from infrastructure.audit.feed import Feed
    from infrastructure.store.stored import events_table, select_rows

    table = events_table(t.service.recorder)
    with t.engine.begin() as connection:
        rows = connection.execute(select_rows(table).order_by(table.c.id)).all()
        rendered = Feed(t).render(connection, rows)
        for row in rendered:
            del row["seals"]
        connection.execute(insert(feed_events), rendered)
        connection.execute(insert(positions).values(name="feed", position=rows[-1].id))


@pytest.mark.parametrize("isolated_url", ["postgresql", "sqlite"], indirect=True)
def test_a_cache_of_histories_starts_from_the_entries_rendered_ahead(isolated):
    """The server's cache of histories takes a participant it doesn't hold from rm_feed's
    entries (with contact details) when it can, decodes only newer events from the store,
    and decodes everything where rm_feed can't give them: the same history each way."""
    from infrastructure.audit.history import HistoryCache, event_entry
    from infrastructure.store.stored import plain_stream

    pids = [enrol(isolated) for _ in range(3)]
    FeedProjection(isolated).catch_up()
    feed = Feed(isolated)
    seeded: list[str] = []

    def rendered(pid: str):
        found = feed.history_entries(pid)
        if found is not None:
            seeded.append(pid)
        return found

    def from_store(pid: str) -> list[dict]:
        stream = participant_uuid(pid)
        return [event_entry(stream, v, topic, content, isolated.veil_digest)
                for v, topic, content in plain_stream(isolated.service, stream)]

    cache = HistoryCache(isolated.service, isolated.veil_digest, rendered=rendered)
    assert cache.entries(pids[0]) == from_store(pids[0])
    assert seeded == [pids[0]]
    send(isolated, c.RecordDose(pids[0], dose(1)))
    assert cache.entries(pids[0]) == from_store(pids[0])  # the new event, from the store
    assert seeded == [pids[0]]  # held: rm_feed is not read again
    with isolated.engine.begin() as connection:  # rm_feed lacks the participant's first row
        connection.execute(delete(feed_events).where(
            feed_events.c.position == min(row.id for row in _rows_of(isolated, pids[1]))))
    assert cache.entries(pids[1]) == from_store(pids[1])
    assert seeded == [pids[0]]
    assert cache.entries(pids[2]) == from_store(pids[2])
    assert seeded == [pids[0], pids[2]]
    assert any("@" in str(e["data"]) for e in cache.entries(pids[2]))  # contact details kept
    assert cache.entries(pids[2], 2) == from_store(pids[2])[:2]
    assert feed.history_json(isolated.protocol.study_id, True) is None  # the trial's stream

    def marked(pid: str):  # what the cache shows is what it was given
        entries = feed.history_entries(pid)
        first = orjson.loads(entries[0])
        return [orjson.dumps({**first, "reason": "from rm_feed"}), *entries[1:]]

    assert HistoryCache(isolated.service, isolated.veil_digest, rendered=marked).entries(pids[2])[0]["reason"] == (
        "from rm_feed")

    def broken(pid: str):
        raise ValueError("rm_feed can't be read")

    assert HistoryCache(isolated.service, isolated.veil_digest, rendered=broken).entries(pids[1]) == from_store(
        pids[1])  # the store answers


@contextmanager
def _statements(engine) -> Iterator[list[str]]:
    """The statements run on ``engine`` inside the block."""
    statements: list[str] = []

    def count(connection, cursor, statement, *_):
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", count)


@pytest.mark.parametrize("isolated_url", ["postgresql", "sqlite"], indirect=True)
def test_the_caches_seed_skips_the_position_the_history_read_looks_up(isolated):
    """With events newer than rm_feed's, a history read looks up the position of the newest
    (one query more); the cache's seed, which has no use for it, doesn't."""
    pid = enrol(isolated)
    FeedProjection(isolated).catch_up()
    send(isolated, c.RecordDose(pid, dose(1)))  # not in rm_feed yet
    feed = Feed(isolated)
    with _statements(isolated.engine) as statements:
        seed = feed.history_entries(pid)
        seeding = len(statements)
        found = feed.history_json(pid, contact=True)
    assert found is not None and seed == found[0] and len(seed) == len(_rows_of(isolated, pid))
    assert found[1] == max(row.id for row in _rows_of(isolated, pid))
    assert len(statements) == 2 * seeding + 1


@pytest.mark.parametrize("isolated_url", ["postgresql", "sqlite"], indirect=True)
def test_a_history_rendered_ahead_is_read_in_one_statement(isolated):
    """rm_feed's entries and the check that the store has nothing after them: one
    statement, for readers with contact details and without."""
    pid = enrol(isolated)
    FeedProjection(isolated).catch_up()
    feed = Feed(isolated)
    with _statements(isolated.engine) as statements:
        found = [feed.history_json(pid, contact) for contact in (True, False)]
    assert [len(entries) for entries, _ in found] == [len(_rows_of(isolated, pid))] * 2
    assert len(statements) == 2
    last = max(row.id for row in _rows_of(isolated, pid))
    with isolated.engine.begin() as connection:  # an event its follower could not render
        connection.execute(update(feed_events).where(feed_events.c.position == last)
                           .values(entry=None))
    assert feed.history_json(pid, True) is None and feed.history_json(pid, False) is None


def test_what_the_cache_of_histories_answers_is_the_callers_to_change(trialog, monkeypatch):
    from infrastructure.audit import history as h

    pid = enrol(trialog)
    for held in (h._held, lambda entry: entry):  # as JSON, and as the entry itself
        monkeypatch.setattr(h, "_held", held)
        cache = h.HistoryCache(trialog.service, trialog.veil_digest)
        first = cache.entries(pid)
        first[0]["data"]["added"] = "by the caller"
        first[0]["type"] = "changed"
        again = cache.entries(pid)
        assert again[0]["type"] == "ParticipantScreened"
        assert "added" not in again[0]["data"]


def test_the_cache_of_histories_keeps_what_json_bytes_cannot_hold_exactly():
    from infrastructure.audit.history import _held

    assert _held({"value": 2**70}) == {"value": 2**70}  # orjson refuses it: kept as it is
    assert orjson.loads(_held({"value": 2**40})) == {"value": 2**40}


def _rows_of(t, pid):
    from infrastructure.store.stored import events_table

    table = events_table(t.service.recorder)
    with t.engine.connect() as connection:
        return connection.execute(select(table.c.id).where(
            table.c.originator_id == participant_uuid(pid))).all()



def _sample_rows(table: Table) -> list[dict]:
    """Two rows of ``table``: a value of each column's type (an int in a float column, text
    beyond ASCII, a JSON document), then None in every nullable column (JSON's null)."""
    full, empty = {}, {}
    for n, column in enumerate(table.columns):
        kind = column.type
        if isinstance(kind, Boolean):
            value = True
        elif isinstance(kind, BigInteger):
            value = 2**40 + n
        elif isinstance(kind, Integer):
            value = 7 + n
        elif isinstance(kind, Float):
            value = 3  # an int in a float column
        elif isinstance(kind, DateTime):
            value = datetime(2026, 3, 2, 9, 30, n, 250, tzinfo=UTC)
        elif isinstance(kind, Date):
            value = date(2026, 3, 2 + n)
        elif isinstance(kind, JSON):
            value = {"ñ": [1, 2.5, None, "día"], "n": n}
        elif isinstance(kind, LargeBinary):
            value = bytes(range(n, n + 40))
        else:
            value = f"{column.name}-é-{n}"[:kind.length or 100]
        full[column.name] = value
        unique = column.primary_key or any(column.name in i.columns for i in table.indexes
                                           if i.unique)
        if column.nullable:
            empty[column.name] = None
        elif isinstance(value, int) and not isinstance(value, bool):
            empty[column.name] = value + 1
        else:  # a key's text differs in its last letter
            empty[column.name] = value[:-1] + "2" if unique else value
    return [full, empty]


@pytest.mark.parametrize("table", [*READ_MODELS, feed_events], ids=lambda t: t.name)
def test_rows_inserted_in_one_statement_read_back_as_sqlalchemy_wrote_them(isolated, table):
    """insert_rows writes what SQLAlchemy's executemany writes, value for value read back as
    text (JSON's null is not SQL's NULL); on PostgreSQL as one statement, whatever the
    number of rows."""
    rows = _sample_rows(table)
    as_text = select(*(cast(column, Text) for column in table.columns))
    statements: list[str] = []

    def listen(connection, cursor, statement, *_) -> None:
        statements.append(statement)

    written = {}
    for how in ("sqlalchemy", "insert_rows"):
        with isolated.engine.begin() as connection:
            connection.execute(delete(table))
            statements.clear()
            event.listen(connection, "before_cursor_execute", listen)
            if how == "sqlalchemy":
                connection.execute(insert(table), rows)
            else:
                insert_rows(connection, table, rows)
            event.remove(connection, "before_cursor_execute", listen)
            written[how] = sorted(connection.execute(as_text).all(), key=repr)
    if isolated.engine.dialect.name == "postgresql":  # the last: insert_rows's
        assert len(statements) == 1 and "unnest(" in statements[0]
    assert len(written["insert_rows"]) == 2
    assert written["insert_rows"] == written["sqlalchemy"]


@pytest.mark.parametrize("isolated_url", ["postgresql"], indirect=True)
def test_a_value_too_long_for_its_column_is_refused_not_cut(isolated):
    """The arrays are sent as text, not as the columns' varchar(n) (a cast would cut): a
    value too long is refused as a plain insert refuses it, and nothing is written (on
    PostgreSQL: SQLite does not check a varchar's length)."""
    row = _sample_rows(participants)[0] | {"site_id": "S" * 33}  # varchar(32)
    with pytest.raises(DBAPIError, match="too long"), isolated.engine.begin() as connection:
        insert_rows(connection, participants, [row])
    with isolated.engine.connect() as connection:
        assert connection.execute(select(participants)).all() == []


def test_each_batch_replaces_its_participants_rows_in_every_read_model(isolated):
    """A batch deletes its participants' rows from every read model before writing them
    again (on PostgreSQL in one statement, the other tables' deletes as its WITH clauses):
    batch by batch, as participants come back with new events, the tables end as a
    rebuild's."""
    projection = TrialProjection(isolated, batch_size=3)
    workload(isolated, participants_=2)
    statements: list[str] = []

    def listen(connection, cursor, statement, *_) -> None:
        statements.append(statement)

    engines = {isolated.engine, projection.recorder.datastore.engine}
    for engine in engines:
        event.listen(engine, "before_cursor_execute", listen)
    try:
        steps = 0
        while projection.step():
            steps += 1
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", listen)
    deletes = [s for s in statements if "DELETE FROM" in s]
    postgres = isolated.engine.dialect.name == "postgresql"
    assert steps > 4
    assert len(deletes) == (steps if postgres else steps * len(READ_MODELS))
    assert {table.name for table in READ_MODELS} == {
        name for s in deletes for name in re.findall(r"DELETE FROM (\w+)", s)}
    live = snapshot(isolated)
    assert len(live["rm_visits"]) == 2 * 4 and len(live["rm_scores"]) == 2
    projection.rebuild()
    assert snapshot(isolated) == live


def test_a_follower_named_after_it_is_made_claims_and_moves_its_own_row(isolated):
    """A follower's position row is the one of its name when it runs (as position() reads
    it), not of the name its class had when it was made: two followers never share one."""
    send(isolated, c.ScreenParticipant(new_participant_id(), screening()))
    follower = TrialProjection(isolated)
    follower.name = "renamed_trial"
    assert follower.step() > 0
    assert follower.position() == follower.head()
    assert TrialProjection(isolated).position() == 0


@pytest.mark.parametrize("isolated_url", ["postgresql"], indirect=True)
def test_rows_the_arrays_cannot_carry_are_refused_before_anything_is_sent(isolated):
    """insert_rows refuses rows whose keys differ (each column is one array) and column
    types it has no array form for, rather than writing something else."""
    rows = _sample_rows(participants)
    other_keys = [rows[0], {k: v for k, v in rows[1].items() if k != "management"}]
    odd = Table("test_odd_types", MetaData(), Column("id", Integer, primary_key=True),
                Column("kind", Enum("a", "b", name="test_odd_kind")))
    with isolated.engine.begin() as connection:
        with pytest.raises(KeyError, match="other keys"):
            insert_rows(connection, participants, other_keys)
        with pytest.raises(NotImplementedError, match="no array form"):
            insert_rows(connection, odd, [{"id": 1, "kind": "a"}])
    with isolated.engine.connect() as connection:
        assert connection.execute(select(participants)).all() == []


def _feed_row(t, pid: str, event_type: str):
    with t.engine.connect() as connection:
        return connection.execute(select(feed_events).where(
            feed_events.c.subject == pid, feed_events.c.type == event_type)).one()


@pytest.mark.parametrize("isolated_url", ["postgresql", "sqlite"], indirect=True)
def test_a_history_entry_edited_in_rm_feed_is_not_shown_the_store_is(isolated):
    """rm_feed is writable by anyone with access to the database: a value changed under
    its genuine digest, or another participant's contact details put in a row, was shown
    as the record. Each row is sealed under a key derived from the cipher key."""
    from infrastructure.audit.history import HistoryCache, event_entry
    from infrastructure.store.stored import plain_stream

    first, second = enrol(isolated), enrol(isolated, "METRO")
    FeedProjection(isolated).catch_up()
    feed = Feed(isolated)
    assert feed.history_json(first, contact=True) is not None  # sealed rows are read
    randomized = _feed_row(isolated, first, "ParticipantRandomized")
    with isolated.engine.begin() as connection:
        connection.execute(update(feed_events).where(
            feed_events.c.position == randomized.position).values(
                entry=randomized.entry.replace('"actor":"test-service"',
                                               '"actor":"someone-else"')))
    assert feed.history_json(first, contact=False) is None
    stream = participant_uuid(first)
    genuine = [event_entry(stream, v, topic, content, isolated.veil_digest)
               for v, topic, content in plain_stream(isolated.service, stream)]
    shown = HistoryCache(isolated.service, isolated.veil_digest,
                         rendered=feed.history_entries).entries(first)
    assert shown == genuine and all(e["actor"] == "test-service" for e in shown)

    # METRO's screening's contact details in CASE's row: never shown as CASE's.
    screened = _feed_row(isolated, second, "ParticipantScreened")
    with isolated.engine.begin() as connection:
        connection.execute(update(feed_events).where(
            feed_events.c.subject == first, feed_events.c.type == "ParticipantScreened")
            .values(contact=screened.contact))
    assert feed.history_json(first, contact=True) is None
    assert feed.history_json(second, contact=True) is not None
    # Its copy with contact details removed: a coordinator would get the redacted entry.
    with isolated.engine.begin() as connection:
        connection.execute(update(feed_events).where(
            feed_events.c.subject == second, feed_events.c.type == "ParticipantScreened")
            .values(contact=None))
    assert feed.history_json(second, contact=True) is None
    assert feed.history_json(second, contact=False) is None


def _edit_value(t, rows, head):
    return [update(feed_events).where(feed_events.c.position == rows["randomized"].position)
            .values(body=rows["randomized"].body.replace('"arm":"', '"arm":"x'))]


def _give_metro_to_case(t, rows, head):
    return [update(feed_events).where(feed_events.c.position == rows["metro"].position)
            .values(site="CASE")]


def _swap_contact(t, rows, head):
    return [update(feed_events).where(feed_events.c.position == rows["screened"].position)
            .values(contact=rows["metro"].contact)]


def _drop_contact(t, rows, head):
    return [update(feed_events).where(feed_events.c.position == rows["screened"].position)
            .values(contact=None)]


def _make_up_beyond_the_head(t, rows, head):
    from sqlalchemy import insert as insert_row

    return [insert_row(feed_events).values({**rows["consented"]._asdict(),
                                            "position": head + 1000})]


def _sealed_elsewhere_beyond_the_head(t, rows, head):
    """Rows sealed under this key in another copy of the database (a staging copy, a
    backup's later state), at positions this log has not reached."""
    from infrastructure.audit.feed import FeedSeals

    seals = FeedSeals(t.feed_seal_key)
    made = []
    for position in range(head + 1, head + 4):
        row = {**rows["consented"]._asdict(), "position": position}
        row["seals"] = seals.seal(row)
        made.append(row)
    from sqlalchemy import insert as insert_row

    return [insert_row(feed_events).values(made)]


def _delete_and_make_up(t, rows, head):
    from sqlalchemy import insert as insert_row

    return [delete(feed_events).where(feed_events.c.position == rows["consented"].position),
            insert_row(feed_events).values({**rows["consented"]._asdict(),
                                            "position": head + 1000})]


@pytest.mark.parametrize("isolated_url", ["postgresql", "sqlite"], indirect=True)
@pytest.mark.parametrize("tamper, whole_page", [
    (_edit_value, False), (_give_metro_to_case, False), (_swap_contact, False),
    (_drop_contact, False), (_make_up_beyond_the_head, False), (_delete_and_make_up, True),
    (_sealed_elsewhere_beyond_the_head, None)])
def test_a_feed_page_never_serves_an_rm_feed_row_edited_moved_or_made_up(
        isolated, tamper, whole_page, caplog):
    """Each row that fails its seal is read from the store alone; a page whose rows are
    not the log's positions is read from the store whole; a row made up beyond the log's
    head never becomes the position a reader resumes from."""
    from domain.access import EVERY_SITE, Scope
    from infrastructure.audit.feed import Reader

    case, metro = enrol(isolated), enrol(isolated, "METRO")
    FeedProjection(isolated).catch_up()
    feed = Feed(isolated)
    every, case_only = Reader(EVERY_SITE, contact=True), Reader(Scope.of(["CASE"]))
    genuine, head = feed.page(0, 1000, every)
    genuine_case = feed.page(0, 1000, case_only)
    assert {e["subject"] for e in genuine_case[0]} == {case, "allocation/CASE"}
    rows = {"randomized": _feed_row(isolated, case, "ParticipantRandomized"),
            "metro": _feed_row(isolated, metro, "ParticipantScreened"),
            "screened": _feed_row(isolated, case, "ParticipantScreened"),
            "consented": _feed_row(isolated, case, "ConsentRecorded")}
    with isolated.engine.begin() as connection:
        for statement in tamper(isolated, rows, head):
            connection.execute(statement)
    caplog.clear()
    assert feed.page(0, 1000, every) == (genuine, head)
    assert feed.page(0, 1000, case_only) == genuine_case
    whole = [r for r in caplog.messages if "does not hold the log's positions" in r]
    if whole_page is None:  # pages after the head: nothing, and the cursor stays
        assert feed.page(head, 1000, every) == ([], head)
        return
    assert bool(whole) == whole_page
    if not whole_page:
        assert any("fails its seal" in r for r in caplog.messages)


def test_a_seal_tells_a_stream_of_no_site_from_one_of_an_empty_site():
    import os

    from infrastructure.audit.feed import FeedSeals

    seals = FeedSeals(os.urandom(32))
    row = {"position": 7, "subject": "NCT04205786", "site": None, "type": "DatabaseLocked",
           "body": "{}", "contact": None, "entry": "{}"}
    sealed = seals.seal(row)
    assert seals.body_holds(sealed, 7, "NCT04205786", None, "DatabaseLocked", "{}", False)
    assert not seals.body_holds(sealed, 7, "NCT04205786", "", "DatabaseLocked", "{}", False)
    assert not seals.body_holds(sealed, 7, "NCT04205786", None, "DatabaseLocked", "{}", True)
