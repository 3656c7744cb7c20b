"""Verification finds and locates every kind of tampering; history replays any moment."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest
from sqlalchemy import and_, delete, event, func, insert, select, update

from domain import commands as c
from domain.access import Scope
from domain.participant import Participant, participant_uuid
from domain.sealing import TopicAltered, seal, unseal
from infrastructure.audit.history import history, participant_as_of
from infrastructure.audit.verification import as_seen_by, verify
from infrastructure.store.bus import CommandBus
from infrastructure.store.stored import UnreadableRecord
from tests.integration.helpers import REGISTERED, dose, enrol, send


def events_table(t):
    return t.service.recorder.events_record_cls.__table__


def row(t, pid, version):
    table = events_table(t)
    where = and_(table.c.originator_id == participant_uuid(pid),
                 table.c.originator_version == version)
    return table, where


def tampered(t, pid, statement_for) -> list[dict]:
    with t.engine.begin() as conn:
        for statement in statement_for(events_table(t), participant_uuid(pid), conn):
            conn.execute(statement)
    report = verify(t.service)
    assert not report.ok
    deep = verify(t.service, deep=True)
    # Both checks find and classify the same tampering.
    assert [p.as_dict() for p in deep.problems] == [p.as_dict() for p in report.problems]
    return [p.as_dict() for p in report.problems]


@contextmanager
def meanwhile(t, reading: Callable[[str], bool], then: Callable[[], Any]) -> Iterator[list]:
    """Runs ``then`` once, as the first statement ``reading`` picks is sent to the
    database (what another process does while a check reads); what it gave, in the list
    yielded."""
    done: list = []

    def before(conn, cursor, statement, parameters, context, executemany) -> None:
        if not done and reading(statement):
            done.append(None)  # before ``then``, whose own statements may be picked too
            done[0] = then()

    event.listen(t.engine, "before_cursor_execute", before)
    try:
        yield done
    finally:
        event.remove(t.engine, "before_cursor_execute", before)


def setup_participant(t) -> str:
    pid = enrol(t)
    for day in range(3):
        send(t, c.RecordDose(pid, dose(day)))
    return pid  # versions 1..6


def test_an_untouched_store_verifies(isolated):
    setup_participant(isolated)
    report = verify(isolated.service)
    assert report.ok
    assert report.events_checked == 6 + 2  # the participant and its allocation sequence


def test_an_edited_event_is_detected_and_located(isolated):
    pid = setup_participant(isolated)

    def edit(table, oid, conn):
        state = conn.execute(select(table.c.state).where(
            and_(table.c.originator_id == oid, table.c.originator_version == 4))).scalar_one()
        flipped = bytes(state[:-1]) + bytes([state[-1] ^ 1])
        yield update(table).where(and_(table.c.originator_id == oid,
                                       table.c.originator_version == 4)).values(state=flipped)

    problems = tampered(isolated, pid, edit)
    assert [(p["kind"], p["version"], p["participant_id"]) for p in problems] == [
        ("edited", 4, pid)]


def test_a_deleted_event_is_detected_and_located(isolated):
    pid = setup_participant(isolated)

    def remove(table, oid, conn):
        yield delete(table).where(and_(table.c.originator_id == oid,
                                       table.c.originator_version == 3))

    problems = tampered(isolated, pid, remove)
    assert [(p["kind"], p["version"], p["participant_id"]) for p in problems] == [
        ("deleted", 4, pid)]
    assert "3..3" in problems[0]["detail"]


def test_reordered_events_are_detected_and_located(isolated):
    pid = setup_participant(isolated)

    def swap(table, oid, conn):
        at = lambda v: and_(table.c.originator_id == oid, table.c.originator_version == v)
        yield update(table).where(at(4)).values(originator_version=-4)
        yield update(table).where(at(5)).values(originator_version=4)
        yield update(table).where(at(-4)).values(originator_version=5)

    problems = tampered(isolated, pid, swap)
    assert [(p["kind"], p["version"]) for p in problems] == [("reordered", 4), ("reordered", 5)]
    assert all(p["participant_id"] == pid for p in problems)


def test_positions_swapped_between_two_events_of_a_stream_are_detected(isolated):
    # Each version links to the one before, but the log (and so the history, and the
    # feed) would show version 6 before version 5.
    pid = setup_participant(isolated)

    def swap_positions(table, oid, conn):
        at = lambda v: and_(table.c.originator_id == oid, table.c.originator_version == v)
        five, six = (conn.execute(select(table.c.id).where(at(v))).scalar_one() for v in (5, 6))
        yield update(table).where(at(5)).values(id=-five)
        yield update(table).where(at(6)).values(id=five)
        yield update(table).where(at(5)).values(id=six)

    problems = tampered(isolated, pid, swap_positions)
    assert [(p["kind"], p["version"], p["participant_id"]) for p in problems] == [
        ("reordered", 6, pid)]
    assert "comes before that of the version before it" in problems[0]["detail"]


def test_an_inserted_event_is_detected_and_located(isolated):
    pid = setup_participant(isolated)
    other = setup_participant(isolated)

    def replay_foreign_row(table, oid, conn):
        foreign = conn.execute(select(table.c.topic, table.c.state).where(and_(
            table.c.originator_id == participant_uuid(other),
            table.c.originator_version == 5))).one()
        yield insert(table).values(originator_id=oid, originator_version=7,
                                   topic=foreign.topic, state=foreign.state)

    problems = tampered(isolated, pid, replay_foreign_row)
    assert [(p["kind"], p["version"], p["participant_id"]) for p in problems] == [
        ("inserted", 7, pid)]


def test_a_copied_event_is_detected_as_inserted(isolated):
    pid = setup_participant(isolated)

    def copy_row(table, oid, conn):
        original = conn.execute(select(table.c.topic, table.c.state).where(and_(
            table.c.originator_id == oid, table.c.originator_version == 5))).one()
        yield insert(table).values(originator_id=oid, originator_version=7,
                                   topic=original.topic, state=original.state)

    problems = tampered(isolated, pid, copy_row)
    assert [(p["kind"], p["version"]) for p in problems] == [("inserted", 7)]
    assert "copy of version 5" in problems[0]["detail"]


class SteppingClock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now


def test_history_and_state_as_recorded_at_a_moment(trialog):
    clock = SteppingClock(datetime(2026, 3, 4, 9, tzinfo=UTC))
    trialog.bus = CommandBus(trialog.service, clock)
    pid = enrol(trialog)  # recorded at 09:01, 09:02, 09:03
    send(trialog, c.RecordDose(pid, dose(0)))  # 09:04 (plus the allocation sequence's events)
    full = history(trialog.service, pid, veil=trialog.veil_digest)
    assert [e["type"] for e in full] == ["ParticipantScreened", "ConsentRecorded",
                                         "ParticipantRandomized", "DoseRecorded"]
    assert all(e["actor"] == "test-service" and e["command_id"] for e in full)
    assert full[0]["recorded_at"] == "2026-03-04T09:01:00+00:00"
    moment = datetime.fromisoformat(full[1]["recorded_at"])
    assert [e["version"] for e in history(trialog.service, pid, moment, veil=str)] == [1, 2]
    assert participant_as_of(trialog.service, pid, moment).status == "consented"
    before = datetime.fromisoformat(full[0]["recorded_at"]) - timedelta(seconds=1)
    assert participant_as_of(trialog.service, pid, before) is None


def test_verify_never_crashes_on_garbage_rows(isolated):
    pid = setup_participant(isolated)
    table, where = row(isolated, pid, 2)
    with isolated.engine.begin() as conn:
        conn.execute(update(table).where(where).values(state=b"not even ciphertext"))
    report = verify(isolated.service)
    assert [(p.kind, p.version) for p in report.problems] == [("edited", 2)]


def test_verify_reports_a_row_edited_to_hold_text_or_a_number_in_sqlite(tmp_path):
    """SQLite keeps whatever is put in a column: a state set to text or a number crashed
    both checks (TypeError: string argument without an encoding; the API answered 500)."""
    from sqlalchemy import text

    from infrastructure.store.bootstrap import bootstrap
    from tests.conftest import settings_for

    t = bootstrap(settings_for(f"sqlite:///{tmp_path / 'text.db'}"), migrate=True)
    try:
        pid = setup_participant(t)
        for version, edit in ((2, "'hello'"), (3, "-1"), (4, "1.5")):
            table, where = row(t, pid, version)
            with t.engine.begin() as conn:
                conn.execute(update(table).where(where).values(state=text(edit)))
        for deep in (False, True):
            report = verify(t.service, deep=deep)
            assert [(p.kind, p.version, p.participant_id) for p in report.problems] == [
                ("edited", 2, pid), ("edited", 3, pid), ("edited", 4, pid)]
    finally:
        t.close()


def test_verifying_in_processes_finds_what_one_process_finds(isolated):
    from infrastructure.audit.verification import check_store, fork_is_safe, verify_parallel
    from infrastructure.readside.projections import TrialProjection

    pids = [setup_participant(isolated) for _ in range(6)]
    TrialProjection(isolated).catch_up()  # the read model names a stream whose first
    before = verify(isolated.service).events_checked  # event is unreadable
    with isolated.engine.begin() as conn:
        table = events_table(isolated)
        for pid, version in ((pids[0], 2), (pids[3], 5)):
            conn.execute(delete(table).where(and_(
                table.c.originator_id == participant_uuid(pid),
                table.c.originator_version == version)))
        where = and_(table.c.originator_id == participant_uuid(pids[5]),
                     table.c.originator_version == 1)
        state = conn.execute(select(table.c.state).where(where)).scalar_one()
        # The last byte changed (set to zero, it stayed the same when it was zero already).
        edited = bytes(state[:-1]) + bytes([state[-1] ^ 1])
        conn.execute(update(table).where(where).values(state=edited))
    alone = verify(isolated.service)
    key = lambda p: (p.stream, p.version, p.kind, p.participant_id)
    # Forked workers while this process has one thread (as it has here), else spawned.
    first = "fork" if fork_is_safe() else "spawn"
    for start_method, deep in ((first, False), ("spawn", True)):
        together = verify_parallel(isolated.settings, 2, deep=deep, start_method=start_method)
        assert together.events_checked == alone.events_checked == before - 2
        assert sorted(map(key, together.problems)) == sorted(map(key, alone.problems))
        assert together.allocations == alone.allocations  # every process's draws, merged
        assert len(alone.allocations.randomized) == 6 and len(alone.allocations.drawn) == 6
        assert {(p.participant_id, p.kind) for p in together.problems} == {
            (pids[0], "deleted"), (pids[3], "deleted"), (pids[5], "edited")}
    # The parent's pooled connections still work after its children have come and gone.
    assert verify(isolated.service).events_checked == alone.events_checked
    timed = check_store(isolated, processes=1).as_dict()
    assert timed["seconds"] > 0 and timed["events_per_second"] > 0


def test_reading_histories_gives_every_connection_back_to_the_pool(trialog):
    # The store's own get_connection() never closes what it opens: reads that used it
    # held a pooled connection each until garbage collection and exhausted the pool.
    from infrastructure.audit.history import HistoryCache
    from infrastructure.store.stored import stored_events

    pid = enrol(trialog)
    pool = trialog.engine.pool
    checked_out = pool.checkedout()
    cache = HistoryCache(trialog.service, trialog.veil_digest)
    for _ in range(25):
        assert len(history(trialog.service, pid, veil=str)) == 3
        assert len(history(trialog.service, pid, cache=cache, veil=trialog.veil_digest)) == 3
        assert stored_events(trialog.service.recorder) > 0
    assert pool.checkedout() == checked_out


def test_an_altered_topic_column_is_detected_and_located(isolated):
    # The cipher authenticates a row's state, not its topic column: the topic is sealed
    # in the state too, so a row relabelled as another kind of event is found by the
    # plain check, not only by the deep one.
    pid = setup_participant(isolated)

    def relabel(table, oid, conn):
        consent = conn.execute(select(table.c.topic).where(and_(
            table.c.originator_id == oid, table.c.originator_version == 2))).scalar_one()
        yield update(table).where(and_(table.c.originator_id == oid,
                                       table.c.originator_version == 4)).values(topic=consent)

    problems = tampered(isolated, pid, relabel)
    assert [(p["kind"], p["version"], p["participant_id"]) for p in problems] == [
        ("edited", 4, pid)]
    assert problems[0]["detail"] == ("the topic column was altered: it says ConsentRecorded, "
                                     "the event was recorded as DoseRecorded")


def test_an_event_whose_topic_column_was_altered_is_never_read_as_another_kind(isolated):
    pid = setup_participant(isolated)
    table, where = row(isolated, pid, 4)
    with isolated.engine.begin() as conn:
        conn.execute(update(table).where(where).values(
            topic="domain.participant:Participant.ConsentRecorded"))
    with pytest.raises(TopicAltered, match="ConsentRecorded"):
        isolated.service.repository.get(participant_uuid(pid))
    with pytest.raises(UnreadableRecord) as refused:  # the history says which event
        history(isolated.service, pid, veil=str)
    assert refused.value.version == 4 and isinstance(refused.value.__cause__, TopicAltered)


def test_events_stored_before_topics_were_sealed_still_read_and_verify(isolated):
    # Rows written before the seal hold the library's plaintext alone: they read as they
    # did, and the plain check passes them (their topic is covered by the deep check).
    pid = setup_participant(isolated)
    table = events_table(isolated)
    cipher = isolated.service.mapper.cipher
    with isolated.engine.begin() as conn:
        for version, state in conn.execute(select(table.c.originator_version, table.c.state)
                                           .where(table.c.originator_id == participant_uuid(pid))).all():
            sealed, plain = unseal(cipher.decrypt(bytes(state)))
            assert sealed is not None
            conn.execute(update(table).where(and_(
                table.c.originator_id == participant_uuid(pid),
                table.c.originator_version == version)).values(state=cipher.encrypt(plain)))
    assert verify(isolated.service).ok
    assert verify(isolated.service, deep=True).ok
    assert isolated.service.repository.get(participant_uuid(pid)).version == 6
    assert len(history(isolated.service, pid, veil=str)) == 6


def test_the_deep_check_catches_an_edit_made_with_the_cipher_key(isolated):
    # Someone holding the key decrypts a row, changes a value and encrypts it again
    # without rewriting the digests: it decrypts and its links hold, but its content no
    # longer matches its digest.
    import json

    pid = setup_participant(isolated)
    table, where = row(isolated, pid, 4)
    cipher = isolated.service.mapper.cipher
    with isolated.engine.begin() as conn:
        state = conn.execute(select(table.c.state).where(where)).scalar_one()
        topic, plain = unseal(cipher.decrypt(bytes(state)))
        content = json.loads(plain)
        content["data"]["dose_mcg"] = 5000
        forged = cipher.encrypt(seal(topic, json.dumps(content, separators=(",", ":")).encode()))
        conn.execute(update(table).where(where).values(state=forged))
    assert verify(isolated.service).ok  # links and encryption hold
    deep = verify(isolated.service, deep=True)
    assert [(p.kind, p.version, p.participant_id) for p in deep.problems] == [
        ("edited", 4, pid)]


def test_a_whole_stream_moved_to_another_id_is_detected(isolated):
    # Every link within the moved stream still holds: only the first event's digest,
    # which covers the stream's id, shows the move.
    pid = setup_participant(isolated)
    table = events_table(isolated)
    elsewhere = participant_uuid(f"{pid}-X")
    with isolated.engine.begin() as conn:
        conn.execute(update(table).where(table.c.originator_id == participant_uuid(pid))
                     .values(originator_id=elsewhere))
    for deep in (False, True):
        problems = verify(isolated.service, deep=deep).problems
        assert [(p.kind, p.stream, p.version, p.participant_id) for p in problems] == [
            ("inserted", str(elsewhere), version, pid) for version in range(1, 7)]
        assert all(f"participant {pid}'s stream" in p.detail for p in problems)


def test_a_snapshot_that_does_not_match_its_event_is_reported(isolated):
    """Snapshots are a cache of the record: one that would make a read show something
    else than the events (another participant's, though validly encrypted) is found."""
    from infrastructure.audit.verification import check_store

    t = isolated
    first, second = enrol(t), enrol(t)
    for pid in (first, second):
        for day in range(97):  # versions 4..100: a snapshot at 100
            send(t, c.RecordDose(pid, dose(day)))
    assert check_store(t, processes=1).ok
    snapshots = t.service.snapshots.recorder.events_record_cls.__table__
    with t.engine.begin() as conn:
        other = conn.execute(select(snapshots.c.state).where(
            snapshots.c.originator_id == participant_uuid(second))).scalar_one()
        conn.execute(update(snapshots).where(
            snapshots.c.originator_id == participant_uuid(first)).values(state=other))
    [problem] = check_store(t, processes=1).problems
    assert (problem.kind, problem.participant_id, problem.version) == ("snapshot", first, 100)
    assert problem.detail == "the snapshot does not match the event at its version"
    # Its first event altered too: the check named the snapshot's participant from that
    # event, and failed ("Invalid cipher tag") when it couldn't be read. (It is named from
    # the read models then.)
    from infrastructure.readside.projections import TrialProjection

    TrialProjection(t).catch_up()
    table, where = row(t, first, 1)
    with t.engine.begin() as conn:
        state = conn.execute(select(table.c.state).where(where)).scalar_one()
        conn.execute(update(table).where(where).values(
            state=bytes(state[:-1]) + bytes([state[-1] ^ 1])))
    problems = check_store(t, processes=1).problems
    assert {(p.kind, p.participant_id) for p in problems} >= {("snapshot", first),
                                                               ("edited", first)}


def test_a_store_no_event_of_which_decrypts_is_said_to_be_another_key_s(isolated):
    """With another deployment's TRIALOG_CIPHER_KEY, verify failed on "Invalid cipher tag"
    (or would report every row altered)."""
    from infrastructure.audit.verification import WrongKey, check_store
    from infrastructure.store.bootstrap import bootstrap
    from tests.conftest import settings_for

    setup_participant(isolated)
    other = bootstrap(settings_for(isolated.settings.database_url, TRIALOG_CIPHER_KEY=
                                   "bm90IHRoZSBrZXkgb2YgdGhpcyBzdG9yZSwgMzIgYnk="),
                      migrate=False)
    try:
        with pytest.raises(WrongKey, match="none of the 8 stored events decrypts with this "
                                           "TRIALOG_CIPHER_KEY"):
            check_store(other, processes=1)
    finally:
        other.close()
    assert check_store(isolated, processes=1).ok


def test_a_snapshot_whose_topic_column_was_altered_is_reported_and_never_loaded(isolated):
    from infrastructure.audit.verification import check_store

    t = isolated
    pid = enrol(t)
    for day in range(97):  # a snapshot at 100
        send(t, c.RecordDose(pid, dose(day)))
    snapshots = t.service.snapshots.recorder.events_record_cls.__table__
    with t.engine.begin() as conn:
        conn.execute(update(snapshots).where(snapshots.c.originator_id == participant_uuid(pid))
                     .values(topic="domain.participant:Participant.DoseRecorded"))
    [problem] = check_store(t, processes=1).problems
    assert (problem.kind, problem.participant_id, problem.version) == ("snapshot", pid, 100)
    assert problem.detail.startswith("the snapshot's topic column was altered")
    assert list(t.service.snapshots.get(participant_uuid(pid))) == []
    assert t.service.repository.get(participant_uuid(pid)).version == 100  # from the events


def test_the_deep_check_catches_a_snapshot_rewritten_with_the_cipher_key(isolated):
    """Someone with the key can rewrite a snapshot's state and keep its chain head: the
    deep check replays the events and compares."""
    from infrastructure.audit.verification import check_store

    t = isolated
    pid = enrol(t)
    for day in range(97):
        send(t, c.RecordDose(pid, dose(day)))
    _rewrite_snapshot(t, pid, lambda state: {
        "arm": "control" if state["arm"] == "b12" else "b12"})
    assert check_store(t, processes=1).ok  # the chain head still matches
    [problem] = check_store(t, processes=1, deep=True).problems
    assert (problem.kind, problem.participant_id, problem.detail) == (
        "snapshot", pid, "the snapshot's state is not what the events give")


def test_the_deep_check_passes_over_a_snapshot_another_release_took(isolated):
    """A release whose code derives otherwise leaves snapshots that are never loaded again
    (see Snapshots): the deep check does not call them tampered with."""
    from domain.participant import DERIVED_BY, derivation
    from infrastructure.audit.verification import check_store

    t = isolated
    pid = enrol(t)
    for day in range(97):
        send(t, c.RecordDose(pid, dose(day)))
    for derived_by, problems, passed_over in (("another release", 0, 1),
                                              (derivation(), 1, 0)):
        _rewrite_snapshot(t, pid, lambda _: {"reminders": ["derived otherwise"],
                                             DERIVED_BY: derived_by})  # noqa: B023
        report = check_store(t, processes=1, deep=True).as_dict()
        assert (len(report["problems"]), report["snapshots_passed_over"]) == (
            problems, passed_over)
    assert "snapshots_passed_over" not in check_store(t, processes=1).as_dict()


def test_a_caller_of_some_sites_is_not_told_the_whole_stores_snapshots(isolated):
    from domain.access import EVERY_SITE, Scope
    from infrastructure.audit.verification import as_seen_by

    answer = {"ok": True, "events_checked": 9, "problems": [], "deep": True,
              "events_per_second": 90, "snapshots_passed_over": 3}
    assert as_seen_by(isolated, EVERY_SITE, answer)["snapshots_passed_over"] == 3
    assert "snapshots_passed_over" not in as_seen_by(isolated, Scope.of(["CASE"]), answer)


def test_a_caller_of_some_sites_is_told_of_their_participant_the_read_models_lack(
        isolated):
    """A caller of some sites was told the problems of the participants the read models
    hold at their sites: one whose follower was behind (or that a rebuild had emptied)
    was left out, and the answer said ok."""
    from infrastructure.audit.verification import check_store

    t = isolated
    pid = setup_participant(t)  # the read models have not followed it
    table, where = row(t, pid, 3)
    with t.engine.begin() as conn:
        conn.execute(update(table).where(where).values(state=b"edited outside trialog"))
    answer = check_store(t, processes=1).as_dict()
    mine = as_seen_by(t, Scope.of(["CASE"]), answer)
    assert not mine["ok"] and {p["participant_id"] for p in mine["problems"]} == {pid}
    assert as_seen_by(t, Scope.of(["METRO"]), answer)["ok"]


def test_the_key_check_takes_a_damaged_oldest_event_for_no_other_key(isolated):
    """The CLI and the server check the key against the store's oldest events: one row
    damaged there refused every write, token revocations included."""
    from infrastructure.store.stored import key_opens

    t = isolated
    setup_participant(t)
    table = events_table(t)
    oldest = select(table.c.id).order_by(table.c.id)
    for damaged, opens in ((1, True), (3, False)):
        with t.engine.begin() as conn:
            ids = conn.execute(oldest.limit(damaged)).scalars().all()
            conn.execute(update(table).where(table.c.id.in_(ids)).values(state=b"damaged"))
        assert key_opens(t.service) is opens


def _rewrite_snapshot(t, pid: str, change) -> None:
    """The participant's one snapshot stored again in place, its state updated with
    ``change(state)`` (as someone holding the cipher key could)."""
    snapshots = t.service.snapshots
    [stored] = snapshots.recorder.select_events(participant_uuid(pid))  # whoever took it
    snapshot = snapshots.mapper.to_domain_event(stored)
    rewritten = type(snapshot)(originator_id=snapshot.originator_id,
                               originator_version=snapshot.originator_version,
                               timestamp=snapshot.timestamp, topic=snapshot.topic,
                               state={**snapshot.state, **change(snapshot.state)})
    table = snapshots.recorder.events_record_cls.__table__
    with t.engine.begin() as conn:
        conn.execute(update(table).where(table.c.originator_id == participant_uuid(pid))
                     .values(state=t.service.mapper.to_stored_event(rewritten).state))


def test_a_digest_shown_outside_the_store_cannot_confirm_a_guess_of_contact_details(
        isolated):
    """The stored digests are plain SHA-256 over each event, contact details included (and,
    through the chain, over every event before): anyone holding one could confirm a guess
    of an email or a birth date. The history and the feed show keyed ones, still chained,
    to every reader."""
    from domain.access import EVERY_SITE
    from infrastructure.audit.feed import Feed, Reader
    from infrastructure.store.stored import plain_stream

    pid = enrol(isolated)
    contents = [content for _, _, content in
                plain_stream(isolated.service, participant_uuid(pid))]
    stored = [content["digest"] for content in contents]
    assert len(stored) == 3 and contents[0]["previous_digest"] == ""
    assert all(len(d) == 64 for d in stored)
    shown = [e["digest"] for e in history(isolated.service, pid, veil=isolated.veil_digest)]
    assert shown == [isolated.veil_digest(d) for d in stored]
    assert not set(shown) & set(stored)
    for contact in (False, True):
        events, _ = Feed(isolated).page(0, 1000, Reader(EVERY_SITE, contact=contact))
        mine = [e for e in events if e["subject"] == pid]
        assert [e["digest"] for e in mine] == shown
        assert mine[0]["previousdigest"] == ""
        assert [e["previousdigest"] for e in mine[1:]] == shown[:-1]  # still chained


def test_a_signatures_hash_of_the_signed_data_is_shown_keyed(isolated):
    """A casebook's signature hashes the participant's data, the screening's contact
    details included: shown plain, it would confirm a guess of them as a digest would."""
    from domain.access import EVERY_SITE
    from infrastructure.audit.feed import Feed, Reader
    from infrastructure.store.stored import plain_stream

    pid = enrol(isolated)
    send(isolated, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": REGISTERED,
                                         "bpi_sf": {"worst": 6, "least": 2, "average": 4,
                                                    "now": 3}}))
    send(isolated, c.WithdrawParticipant(pid, {"withdrawn_on": REGISTERED + timedelta(days=3),
                                               "scope": "study", "reason_code": "moved"}))
    send(isolated, c.SignCasebook(pid, {"meaning": "I approve this casebook",
                                        "signer": "dr-okafor", "printed_name": "A. Okafor"}),
         actor="dr-okafor")
    stored = [content["data_sha256"] for _, topic, content in
              plain_stream(isolated.service, participant_uuid(pid))
              if topic.endswith("RecordSigned")]
    assert len(stored) == 1 and len(stored[0]) == 64
    signed = [e for e in history(isolated.service, pid, veil=isolated.veil_digest)
              if e["type"] == "RecordSigned"]
    assert [e["data"]["data_sha256"] for e in signed] == [isolated.veil_digest(stored[0])]
    assert signed[0]["data"]["data_sha256"] != stored[0]
    for contact in (False, True):
        events, _ = Feed(isolated).page(0, 1000, Reader(EVERY_SITE, contact=contact))
        hashes = [e["data"]["data"].get("data_sha256") for e in events
                  if e["subject"] == pid and e["type"].endswith("RecordSigned")]
        assert hashes == [isolated.veil_digest(stored[0])]


def test_the_last_events_of_a_stream_deleted_are_found_from_what_was_recorded_beside_them(
        isolated):
    """A stream's last events deleted leave a valid shorter chain: the answers recorded
    for its commands, and the read models' version, show what is missing."""
    from infrastructure.audit.verification import check_store
    from infrastructure.readside.projections import TrialProjection

    t = isolated
    first, second = setup_participant(t), setup_participant(t)
    TrialProjection(t).catch_up()  # the read models hold both at version 6
    send(t, c.RecordDose(first, dose(3)))  # version 7: answered, not followed yet
    assert check_store(t, processes=1).ok
    table = events_table(t)
    with t.engine.begin() as conn:
        for pid, last in ((first, 5), (second, 4)):
            conn.execute(delete(table).where(table.c.originator_id == participant_uuid(pid),
                                             table.c.originator_version >= last))
    for deep in (False, True):
        problems = sorted(check_store(t, processes=1, deep=deep).problems,
                          key=lambda p: p.version)
        assert [(p.kind, p.version, p.participant_id) for p in problems] == [
            ("deleted", 4, second), ("deleted", 5, first)]
        assert problems[0].detail.startswith("versions 4..6 are missing: command ")
        assert problems[1].detail.startswith("versions 5..7 are missing: command ")


def test_a_whole_stream_deleted_is_found_from_the_read_models(isolated):
    from infrastructure.audit.verification import check_store
    from infrastructure.readside.projections import TrialProjection
    from infrastructure.store.tables import command_records

    t = isolated
    pid = setup_participant(t)
    TrialProjection(t).catch_up()
    with t.engine.begin() as conn:
        conn.execute(delete(events_table(t)).where(
            events_table(t).c.originator_id == participant_uuid(pid)))
        conn.execute(delete(command_records).where(command_records.c.participant_id == pid))
    [problem] = check_store(t, processes=1).problems
    assert (problem.kind, problem.version, problem.participant_id) == ("deleted", 1, pid)
    assert problem.detail == ("versions 1..6 are missing: the read models hold the "
                              "participant at version 6")


def test_a_database_lock_lifted_by_an_edit_of_its_table_is_reported(isolated):
    from infrastructure.audit.verification import check_store
    from infrastructure.store.tables import database_lock

    t = isolated
    setup_participant(t)
    t.bus.dispatch_trial("LockDatabase", command_id=str(uuid4()), actor="dm",
                         reason="final analysis")
    assert check_store(t, processes=1).ok
    with t.engine.begin() as conn:
        conn.execute(update(database_lock).values(locked_at=None, locked_by=None))
    [problem] = check_store(t, processes=1).problems
    assert problem.kind == "lock"
    assert problem.detail.startswith("the database lock's copy says unlocked; the trial's "
                                     "record says locked by dm at ")


def test_the_deep_check_finds_a_read_model_edited_to_say_what_the_record_does_not(isolated):
    """The lists, the summary and the CSV and FHIR exports read the read models: an arm,
    a score or a deviation's status changed there was served as the record."""
    from infrastructure.audit.verification import check_store
    from infrastructure.readside.projections import TrialProjection
    from infrastructure.store.tables import participants, visits

    t = isolated
    pid, other = setup_participant(t), setup_participant(t)
    send(t, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": REGISTERED}))
    TrialProjection(t).catch_up()
    assert check_store(t, processes=1, deep=True).ok
    arm = t.service.get_participant(pid).arm
    forged = "control" if arm == "b12" else "b12"
    with t.engine.begin() as conn:
        conn.execute(update(participants).where(participants.c.participant_id == pid)
                     .values(arm=forged))
        conn.execute(delete(visits).where(visits.c.participant_id == other,
                                          visits.c.code == "week6"))
    assert check_store(t, processes=1).ok  # the plain check reads the store alone
    problems = sorted(check_store(t, processes=1, deep=True).problems,
                      key=lambda p: p.participant_id == other)
    assert [(p.kind, p.participant_id, p.detail) for p in problems] == [
        ("read_model", pid, (f"rm_participants.arm of {pid} says '{forged}'; the record "
                             f"says '{arm}'")),
        ("read_model", other, (f"rm_visits lacks the row {other}/week6 that the record "
                               "gives"))]
    TrialProjection(t).rebuild()
    assert check_store(t, processes=1, deep=True).ok


def test_a_read_model_row_set_back_a_version_is_no_way_past_the_deep_check(isolated):
    """The check passed over a row whose version was not the record's, as a follower's
    that was behind: lowering the version hid an arm and a status edited beside it, which
    the lists and the exports then served. A row at an older version (its follower behind,
    or its participant set aside) is compared with the record at that version; every
    column altered is named."""
    from infrastructure.audit.verification import check_store
    from infrastructure.readside.projections import TrialProjection
    from infrastructure.readside.quarantine import set_aside
    from infrastructure.store.tables import participants

    t = isolated
    pid = setup_participant(t)
    TrialProjection(t).catch_up()
    p = t.service.get_participant(pid)
    forged = "control" if p.arm == "b12" else "b12"
    with t.engine.begin() as conn:
        conn.execute(update(participants).where(participants.c.participant_id == pid)
                     .values(version=p.version - 1, arm=forged, status="completed"))
    problems = check_store(t, processes=1, deep=True).problems
    assert [(p.kind, p.participant_id) for p in problems] == [("read_model", pid)] * 2
    assert problems[0].detail == (f"rm_participants.version of {pid} says {p.version - 1}; "
                                  f"the record is at version {p.version}")
    assert problems[1].detail == (
        f"rm_participants.status of {pid} says 'completed'; the record says '{p.status}'; "
        f"rm_participants.arm of {pid} says '{forged}'; the record says '{p.arm}'")
    # A follower behind (an event it has not read yet), or a participant it set aside
    # (listed as such), has rows at an older version: compared with the record there.
    TrialProjection(t).rebuild()
    send(t, c.RecordDose(pid, dose(3)))
    assert check_store(t, processes=1, deep=True).ok
    TrialProjection(t).catch_up()
    with t.engine.begin() as conn:
        conn.execute(update(participants).where(participants.c.participant_id == pid)
                     .values(version=p.version))
        set_aside(conn, TrialProjection.name, participant_uuid(pid), pid, None, None,
                  ValueError("can't be applied"))
    assert check_store(t, processes=1, deep=True).ok
    # A version below 1 edited into a set-aside participant's row is reported (the check
    # stopped on an AttributeError, replaying no event).
    with t.engine.begin() as conn:
        conn.execute(update(participants).where(participants.c.participant_id == pid)
                     .values(version=0))
    [problem] = check_store(t, processes=1, deep=True).problems
    assert (problem.kind, problem.participant_id, problem.detail) == (
        "read_model", pid, (f"rm_participants.version of {pid} says 0; a record's "
                            "versions start at 1"))
    with t.engine.begin() as conn:
        conn.execute(update(participants).where(participants.c.participant_id == pid)
                     .values(version=p.version))
    # A quarantine row is no cover (the table is not sealed): an arm edited beside it is
    # found at the version the row says.
    with t.engine.begin() as conn:
        conn.execute(update(participants).where(participants.c.participant_id == pid)
                     .values(arm=forged))
    [problem] = check_store(t, processes=1, deep=True).problems
    assert (problem.version, problem.detail) == (p.version, (
        f"rm_participants.arm of {pid} says '{forged}'; the record says '{p.arm}'"))


def test_the_deep_check_compares_every_participant_past_one_it_cannot_replay(isolated):
    """The participants are replayed in one read of every stream, stream by stream: one
    whose events can't all be applied (an event deleted from its middle) is passed over,
    and each other participant's rows, before and after it in the read, are still
    compared."""
    from infrastructure.audit.verification import check_store
    from infrastructure.readside.projections import TrialProjection
    from infrastructure.store.tables import participants

    t = isolated
    pids = [setup_participant(t) for _ in range(6)]
    TrialProjection(t).catch_up()
    ordered = sorted(pids, key=lambda pid: str(participant_uuid(pid)))
    broken, edited = ordered[2], [ordered[0], ordered[3], ordered[5]]
    table, where = row(t, broken, 3)
    arms = {pid: t.service.get_participant(pid).arm for pid in edited}
    with t.engine.begin() as conn:
        conn.execute(delete(table).where(where))
        for pid in edited:
            conn.execute(update(participants).where(participants.c.participant_id == pid)
                         .values(arm="forged"))
    problems = check_store(t, processes=1, deep=True).problems
    assert {(p.kind, p.participant_id) for p in problems} == {
        ("deleted", broken), *(("read_model", pid) for pid in edited)}, problems
    assert sorted(p.detail for p in problems if p.kind == "read_model") == sorted(
        f"rm_participants.arm of {pid} says 'forged'; the record says '{arms[pid]}'"
        for pid in edited)


def test_the_deep_check_compares_a_long_record_loaded_from_its_snapshot(isolated):
    """A record past a snapshot's interval is loaded from its latest snapshot and the
    events after it (the read of the short records' rows stops at the interval): its read
    models are compared all the same, at its version."""
    from infrastructure.audit.verification import check_store
    from infrastructure.readside.projections import TrialProjection
    from infrastructure.store.tables import participants

    t = isolated
    pid, short = enrol(t), setup_participant(t)
    for day in range(t.service.snapshotting_intervals[Participant]):
        send(t, c.RecordDose(pid, dose(day)))
    TrialProjection(t).catch_up()
    assert check_store(t, processes=1, deep=True).ok
    arms = {p: t.service.get_participant(p).arm for p in (pid, short)}
    with t.engine.begin() as conn:
        conn.execute(update(participants).values(arm="forged")
                     .where(participants.c.participant_id.in_(arms)))
    problems = check_store(t, processes=1, deep=True).problems
    version = t.service.get_participant(pid).version
    assert version > t.service.snapshotting_intervals[Participant]
    assert sorted((p.participant_id, p.version, p.detail) for p in problems) == sorted(
        (p, t.service.get_participant(p).version,
         f"rm_participants.arm of {p} says 'forged'; the record says '{arm}'")
        for p, arm in arms.items())


def test_the_database_failing_while_the_deep_check_replays_is_raised_not_passed(
        isolated, monkeypatch):
    """A database error while the deep check read the participants' events ended its
    comparison with the read models unsaid: the participants after it were not
    compared, and the check passed."""
    import sqlalchemy.exc

    from infrastructure.audit import verification
    from infrastructure.readside.projections import TrialProjection
    from infrastructure.store import stored

    t = isolated
    for _ in range(3):
        setup_participant(t)
    TrialProjection(t).catch_up()
    read = stored.stream_rows

    def lost_midway(*args, **kwargs):
        for n, found in enumerate(read(*args, **kwargs)):
            if n == 4:
                raise sqlalchemy.exc.OperationalError("FETCH", {}, OSError("connection lost"))
            yield found

    monkeypatch.setattr(stored, "stream_rows", lost_midway)
    monkeypatch.setattr(verification, "stream_rows", lost_midway, raising=False)
    with pytest.raises(sqlalchemy.exc.OperationalError):
        verification.check_read_models(t)


def _sequence(t, site="CASE"):
    from domain.randomization import sequence_id

    table = events_table(t)
    return table, sequence_id(t.protocol.study_id, site)


def test_a_stratum_s_last_draws_deleted_and_their_slot_given_again_are_found(isolated):
    """Deleting a stratum's newest allocation draw left a valid shorter chain that both
    checks passed; the next participant randomized there was given the deleted slot (its
    arm known, in an open-label trial), unreported."""
    from infrastructure.audit.verification import check_store

    t = isolated
    first, second = enrol(t), enrol(t)
    metro = enrol(t, "METRO")
    assert check_store(t, processes=1).ok
    table, sequence = _sequence(t)
    with t.engine.begin() as conn:
        conn.execute(delete(table).where(table.c.originator_id == sequence,
                                         table.c.originator_version == 3))  # draw 1
    arm = t.service.get_participant(second).arm
    for deep in (False, True):
        [problem] = check_store(t, processes=1, deep=deep).problems
        assert (problem.kind, problem.stream, problem.version, problem.participant_id) == (
            "deleted", str(sequence), 3, second)
        assert problem.detail.startswith(
            f"the draw 1 of stratum CASE's allocation sequence is missing: participant "
            f"{second} was randomized to {arm} with it (version 3, position ")
    third = enrol(t)  # given draw 1 again
    assert t.service.get_participant(third).allocation_index == 1
    report = check_store(t, processes=1)
    [problem] = report.problems
    assert problem.participant_id == second and problem.detail.endswith(
        f"; the sequence gives that draw to {third}, whose slot it was given again")
    assert first and metro
    # A caller of CASE is told of CASE's sequence, one of METRO's alone is not.
    from infrastructure.readside.projections import TrialProjection

    TrialProjection(t).catch_up()
    seen = {site: as_seen_by(t, Scope.of([site]), report.as_dict())["problems"]
            for site in ("CASE", "METRO")}
    assert [p["stream"] for p in seen["CASE"]] == [str(sequence)] and seen["METRO"] == []


def test_a_draw_the_walk_read_before_it_was_committed_is_not_reported_missing(isolated):
    """The walk reads its ranges at different moments (in processes, or batch by batch):
    a randomization committed between the read of its stratum's sequence and the read of
    its participant's stream has a draw the walk did not see, and is there all the same."""
    from infrastructure.audit.verification import check_allocations

    t = isolated
    enrol(t)
    seen = verify(t.service).allocations
    seen.drawn.clear()  # as a sequence read before the randomization committed
    assert check_allocations(seen, t.service, t.protocol.study_id) == []


def test_a_problem_in_an_allocation_sequence_is_not_named_after_a_participant(isolated):
    """A draw names the participant drawn for: a draw edited was reported as an edit of
    that participant's record, and two draws swapped as events of a participant's
    stream inserted into the sequence."""
    from infrastructure.audit.verification import check_store

    t = isolated
    enrol(t), enrol(t), enrol(t)
    table, sequence = _sequence(t)
    in_sequence = table.c.originator_id == sequence
    with t.engine.begin() as conn:
        conn.execute(update(table).where(in_sequence, table.c.originator_version == 3)
                     .values(originator_version=-3))
        conn.execute(update(table).where(in_sequence, table.c.originator_version == 4)
                     .values(originator_version=3))
        conn.execute(update(table).where(in_sequence, table.c.originator_version == -3)
                     .values(originator_version=4))
    for deep in (False, True):
        problems = check_store(t, processes=1, deep=deep).problems
        assert {(p.kind, p.participant_id) for p in problems} == {("reordered", None)}
        shown = as_seen_by(t, Scope.of(["CASE"]), check_store(t, processes=1,
                                                               deep=deep).as_dict())
        assert len(shown["problems"]) == len(problems) and not shown["ok"]
        assert all(p.stream == str(sequence) and p.detail.startswith(
            "allocation sequence of stratum CASE: the event was recorded as version ")
            for p in problems), problems


def test_the_deep_check_finds_a_feed_row_changed_outside_trialog(isolated):
    """rm_feed is a copy of the store beside it, each row sealed: a changed row was read
    from the store instead, and only a log line said so; verify passed."""
    from infrastructure.audit.verification import check_store
    from infrastructure.readside.projections import FeedProjection
    from infrastructure.store.tables import feed_events

    t = isolated
    pid = setup_participant(t)
    FeedProjection(t).catch_up()
    assert check_store(t, processes=1, deep=True).ok
    with t.engine.begin() as conn:
        position = conn.execute(select(feed_events.c.position).where(
            feed_events.c.subject == pid).order_by(feed_events.c.position.desc())).first()[0]
        conn.execute(update(feed_events).where(feed_events.c.position == position)
                     .values(entry=feed_events.c.entry + " "))
    assert check_store(t, processes=1).ok  # the plain check reads the store alone
    [problem] = check_store(t, processes=1, deep=True).problems
    assert (problem.kind, problem.stream, problem.notification_id) == (
        "read_model", "rm_feed", position)
    assert problem.detail.startswith(f"rm_feed's row at position {position} (subject {pid}) "
                                     "fails its seal")


def test_the_deep_check_finds_positions_changed_between_two_streams_or_to_a_free_one(
        isolated):
    """A position is the one thing of an event no chain covers: two participants' events
    given each other's positions, or a stream's last event moved past the log's end,
    passed both checks (the log, the feed's order and a follower rebuilt from it would
    have them elsewhere). rm_feed rendered each event at its position before."""
    from infrastructure.audit.verification import check_store
    from infrastructure.readside.projections import FeedProjection, TrialProjection

    t = isolated
    first, second = setup_participant(t), setup_participant(t)
    FeedProjection(t).catch_up(), TrialProjection(t).catch_up()
    table = events_table(t)

    def position(pid, version):
        with t.engine.connect() as conn:
            return conn.execute(select(table.c.id).where(row(t, pid, version)[1])).scalar_one()

    one, other = position(first, 6), position(second, 1)  # each stream's order kept
    with t.engine.begin() as conn:
        conn.execute(update(table).where(table.c.id == one).values(id=-one))
        conn.execute(update(table).where(table.c.id == other).values(id=one))
        conn.execute(update(table).where(table.c.id == -one).values(id=other))
    assert check_store(t, processes=1).ok  # the chains are whole: the plain check can't
    problems = check_store(t, processes=1, deep=True).problems
    assert sorted((p.kind, p.participant_id, p.version, p.notification_id)
                  for p in problems) == sorted([("reordered", first, 6, one),
                                                ("reordered", second, 1, other)])
    assert all(p.stream == str(participant_uuid(p.participant_id)) for p in problems)
    mine = as_seen_by(t, Scope.of(["CASE"]), check_store(t, processes=1,
                                                          deep=True).as_dict())
    assert len(mine["problems"]) == 2 and not mine["ok"]  # both are CASE's participants
    with t.engine.begin() as conn:  # put back, then the last event moved past the end
        conn.execute(update(table).where(table.c.id == one).values(id=-one))
        conn.execute(update(table).where(table.c.id == other).values(id=one))
        conn.execute(update(table).where(table.c.id == -one).values(id=other))
    assert check_store(t, processes=1, deep=True).ok
    with t.engine.begin() as conn:
        end = conn.execute(select(func.max(table.c.id))).scalar_one()
        conn.execute(update(table).where(table.c.id == one).values(id=end + 100))
    [moved] = check_store(t, processes=1, deep=True).problems
    assert (moved.kind, moved.participant_id, moved.version, moved.notification_id) == (
        "reordered", first, 6, one)
    assert moved.detail == (f"the feed's follower rendered DoseRecorded version 6 of {first} "
                            f"at position {one}; the store holds no event there: it was "
                            "moved to another position or deleted")


@pytest.mark.parametrize("tamper", ["swap", "delete"])
def test_a_stream_the_chain_check_faults_is_not_reported_again_from_the_feed(isolated,
                                                                            tamper):
    """Two versions of a stream swapped (or one deleted) after rm_feed rendered them: the
    chain check reported it once, and the feed's check again for each row, naming the
    versions otherwise."""
    from infrastructure.audit.verification import check_store
    from infrastructure.readside.projections import FeedProjection

    t = isolated
    pid = setup_participant(t)
    FeedProjection(t).catch_up()
    table = events_table(t)
    at = lambda v: row(t, pid, v)[1]
    with t.engine.begin() as conn:
        if tamper == "delete":
            conn.execute(delete(table).where(at(5)))
        else:
            five, six = (conn.execute(select(table.c.id).where(at(v))).scalar_one()
                         for v in (5, 6))
            conn.execute(update(table).where(at(5)).values(id=-five))
            conn.execute(update(table).where(at(6)).values(id=five))
            conn.execute(update(table).where(at(5)).values(id=six))
    plain = check_store(t, processes=1).problems
    assert plain and check_store(t, processes=1, deep=True).problems == plain


def test_a_problem_of_another_kind_hides_no_position_changed(isolated):
    """The feed's check passed over every stream any problem named: a command's record
    altered hid two events swapped between its stream and another."""
    from infrastructure.audit.verification import check_store
    from infrastructure.readside.projections import FeedProjection
    from infrastructure.store.tables import command_records as commands

    t = isolated
    first, second = setup_participant(t), setup_participant(t)
    FeedProjection(t).catch_up()
    table = events_table(t)
    with t.engine.begin() as conn:
        a, b = (conn.execute(select(table.c.id).where(row(t, pid, v)[1])).scalar_one()
                for pid, v in ((first, 6), (second, 1)))
        conn.execute(update(table).where(table.c.id == a).values(id=-a))
        conn.execute(update(table).where(table.c.id == b).values(id=a))
        conn.execute(update(table).where(table.c.id == -a).values(id=b))
        conn.execute(update(commands).where(commands.c.participant_id == first)
                     .values(response=commands.c.response + " "))
    problems = check_store(t, processes=1, deep=True).problems
    assert {(p.kind, p.participant_id) for p in problems} == {
        ("record", first), ("reordered", first), ("reordered", second)}


def test_an_event_recorded_while_the_deep_check_reads_is_no_read_model_problem(
        isolated, monkeypatch):
    """The record was replayed after the streams' ends were read: an event recorded
    between the two made the row (rightly at the version before) look set back."""
    from infrastructure.audit import verification
    from infrastructure.readside.projections import TrialProjection

    t = isolated
    pid = setup_participant(t)
    TrialProjection(t).catch_up()
    ends = verification._participant_streams

    def meanwhile(trialog):
        read = ends(trialog)
        send(t, c.RecordDose(pid, dose(3)))
        return read

    monkeypatch.setattr(verification, "_participant_streams", meanwhile)
    assert verification.check_read_models(t) == []


def test_a_participant_screened_while_the_deep_check_reads_the_streams_is_not_reported(
        isolated):
    """The streams' ends and their first events are two reads: a participant screened
    between them had no end (taken as position 0, passed by any follower), and was
    reported without its row."""
    from infrastructure.audit.verification import check_read_models
    from infrastructure.readside.projections import TrialProjection

    t = isolated
    setup_participant(t)
    TrialProjection(t).catch_up()
    with meanwhile(t, lambda statement: "originator_version =" in statement
                   and "topic LIKE" in statement, lambda: enrol(t)) as screened:
        problems = check_read_models(t)
    assert screened and problems == []


def test_a_batch_the_follower_commits_while_the_deep_check_reads_is_no_problem(isolated):
    """The read models' tables are read one statement each: a batch committed between
    the participants' and the visits' left a participant's rows at two versions, which
    were reported as edited."""
    from infrastructure.audit.verification import check_read_models
    from infrastructure.readside.projections import TrialProjection

    t = isolated
    pid = setup_participant(t)
    TrialProjection(t).catch_up()

    def complete_and_follow() -> dict:
        answer = send(t, c.CompleteVisit(pid, {"visit": "baseline",
                                               "completed_on": REGISTERED}))
        TrialProjection(t).catch_up()
        return answer

    with meanwhile(t, lambda statement: "FROM rm_visits" in statement,
                   complete_and_follow) as committed:
        problems = check_read_models(t)
    assert committed and problems == []


def test_a_row_stored_below_version_1_is_reported_not_the_genuine_first_event(isolated):
    # A copy of another participant's first event put before this stream's first event
    # (version 0): the genuine version 1 was blamed, as not following it.
    pid, other = setup_participant(isolated), setup_participant(isolated)

    def copy_below(table, oid, conn):
        foreign = conn.execute(select(table.c.topic, table.c.state).where(and_(
            table.c.originator_id == participant_uuid(other),
            table.c.originator_version == 1))).one()
        yield insert(table).values(originator_id=oid, originator_version=0,
                                   topic=foreign.topic, state=foreign.state)

    problems = tampered(isolated, pid, copy_below)
    assert [(p["kind"], p["version"], p["participant_id"]) for p in problems] == [
        ("inserted", 0, pid)]


def test_a_command_answered_while_verify_reads_is_not_reported_missing(isolated):
    """verify reads what was recorded beside the streams, then their ends: a command
    answered between the two reads had been reported as deleted events."""
    from infrastructure.audit.verification import check_store

    t = isolated
    pid = setup_participant(t)
    # Between the ends' read and the records' (as it was).
    with meanwhile(t, lambda statement: "trialog_commands" in statement
                   and "trialog_events" not in statement,
                   lambda: send(t, c.RecordDose(pid, dose(3)))) as sent:
        report = check_store(t, processes=1)
    assert sent and report.ok, report.problems


def test_verify_reports_a_trial_record_it_can_not_read_instead_of_failing(isolated):
    from infrastructure.audit.verification import check_store
    from infrastructure.store.tables import database_lock

    t = isolated
    t.bus.dispatch_trial("LockDatabase", command_id=str(uuid4()), actor="dm", reason="final")
    table = events_table(t)
    with t.engine.begin() as conn:
        conn.execute(update(table).where(table.c.topic.endswith(".DatabaseLocked"))
                     .values(topic="domain.trial:TrialDatabase.DatabaseUnlocked"))
        conn.execute(update(database_lock).values(locked_at=None, locked_by=None))
    problems = check_store(t, processes=1).problems
    unreadable = ("the trial's record can't be read (TopicAltered): whether the database "
                  "is locked is not known")
    assert ("lock", unreadable) in [(p.kind, p.detail) for p in problems]
    assert "edited" in [p.kind for p in problems]  # the topic column, by the chain's check


def test_the_deep_check_finds_a_participant_s_row_deleted_and_passes_over_rows_from_before_0022(
        isolated):
    from infrastructure.audit.verification import check_store
    from infrastructure.readside.projections import TrialProjection
    from infrastructure.store.tables import participants

    t = isolated
    gone, left = setup_participant(t), setup_participant(t)
    send(t, c.WithdrawParticipant(left, {"withdrawn_on": REGISTERED + timedelta(days=5),
                                         "scope": "study", "reason_code": "moved"}))
    TrialProjection(t).catch_up()
    with t.engine.begin() as conn:
        conn.execute(delete(participants).where(participants.c.participant_id == gone))
        # As written before migration 0022: no withdrawal day kept.
        conn.execute(update(participants).where(participants.c.participant_id == left)
                     .values(left_on=None))
    problems = check_store(t, processes=1, deep=True).problems
    assert [(p.kind, p.participant_id, p.detail) for p in problems] == [
        ("read_model", gone, f"rm_participants lacks the row {gone} that the record gives")]
