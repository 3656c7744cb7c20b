"""The application on both databases: transactions, idempotency, concurrency, PHI."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import event, func, select, text

from domain import commands as c
from domain.errors import (
    DatabaseLocked,
    DomainError,
    IdempotencyKeyReused,
    NotEligible,
    ParticipantNotFound,
    VersionConflict,
)
from domain.participant import participant_uuid
from infrastructure.store.bus import Accepted, Intent
from infrastructure.store.stored import position_of
from infrastructure.store.tables import any_of, as_utc, command_records
from tests.factories import consent, new_participant_id, screening
from tests.integration.helpers import REGISTERED, dose, enrol, send


def stored_versions(t, pid) -> int:
    return t.service.get_participant(pid).version


def test_a_participant_goes_through_screening_consent_and_randomization(trialog):
    pid = enrol(trialog)
    p = trialog.service.get_participant(pid)
    assert (p.status, p.version) == ("randomized", 3)
    assert p.arm in ("b12", "control")


def test_the_answer_carries_version_position_and_events(trialog):
    pid = new_participant_id()
    body = send(trialog, c.ScreenParticipant(pid, screening()), command_id=str(uuid.uuid4()))
    assert body["version"] == 1 and body["participant_id"] == pid
    assert body["position"] >= 1
    assert [e["type"] for e in body["events"]] == ["ParticipantScreened"]


def test_a_retried_command_returns_the_first_answer_and_writes_nothing(trialog):
    pid = enrol(trialog)
    command_id = str(uuid.uuid4())
    first = trialog.bus.dispatch(c.RecordDose(pid, dose(0)), command_id=command_id, actor="s")
    again = trialog.bus.dispatch(c.RecordDose(pid, dose(0)), command_id=command_id, actor="s")
    assert (first.replayed, again.replayed) == (False, True)
    assert again.body == first.body
    assert stored_versions(trialog, pid) == 4


def test_a_reused_command_id_with_another_body_is_refused(trialog):
    pid = enrol(trialog)
    command_id = str(uuid.uuid4())
    send(trialog, c.RecordDose(pid, dose(0)), command_id=command_id)
    with pytest.raises(IdempotencyKeyReused):
        send(trialog, c.RecordDose(pid, dose(1)), command_id=command_id)
    assert stored_versions(trialog, pid) == 4


def test_a_refused_command_stores_nothing(trialog):
    pid = new_participant_id()
    send(trialog, c.ScreenParticipant(pid, screening(zubrod=3)))
    command_id = str(uuid.uuid4())
    with pytest.raises(NotEligible):
        send(trialog, c.RecordConsent(pid, {"consent_version": "1"}), command_id=command_id)
    assert stored_versions(trialog, pid) == 1
    with trialog.engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(command_records)
                            .where(command_records.c.command_id == command_id)).scalar()
    assert rows == 0


def test_an_unknown_participant_is_not_found(trialog):
    with pytest.raises(ParticipantNotFound):
        send(trialog, c.RecordDose(new_participant_id(), dose(0)))


def test_a_stale_expected_version_is_a_conflict(trialog):
    pid = enrol(trialog)
    send(trialog, c.RecordDose(pid, dose(0)), expected_version=3)
    with pytest.raises(VersionConflict):
        send(trialog, c.RecordDose(pid, dose(1)), expected_version=3)
    assert stored_versions(trialog, pid) == 4


def test_concurrent_commands_to_one_participant_all_succeed(trialog):
    pid = enrol(trialog)
    with ThreadPoolExecutor(max_workers=8) as pool:
        bodies = list(pool.map(lambda d: send(trialog, c.RecordDose(pid, dose(d))), range(40)))
    assert sorted(b["version"] for b in bodies) == list(range(4, 44))
    assert stored_versions(trialog, pid) == 43


def test_concurrent_commands_with_the_same_expected_version_let_exactly_one_through(trialog):
    pid = enrol(trialog)

    def attempt(day: int) -> str:
        try:
            send(trialog, c.RecordDose(pid, dose(day)), expected_version=3)
        except VersionConflict:
            return "conflict"
        return "ok"

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(attempt, range(8)))
    assert outcomes.count("ok") == 1 and outcomes.count("conflict") == 7
    assert stored_versions(trialog, pid) == 4


def test_concurrent_randomizations_in_one_stratum_never_share_a_position(trialog):
    with ThreadPoolExecutor(max_workers=4) as pool:
        pids = list(pool.map(lambda _: enrol(trialog, "METRO"), range(8)))
    indexes = [trialog.service.get_participant(p).allocation_index for p in pids]
    assert len(set(indexes)) == 8


def test_contact_details_are_encrypted_at_rest(trialog):
    pid = new_participant_id()
    send(trialog, c.ScreenParticipant(pid, {**screening(), "email": f"{pid}@secret.example"}))
    with trialog.engine.connect() as conn:
        states = conn.execute(text("SELECT state FROM trialog_events")).scalars().all()
    assert states
    assert not any(f"{pid}@secret.example".encode() in bytes(s) for s in states)
    assert trialog.service.get_participant(pid).screening["email"] == f"{pid}@secret.example"


def test_a_write_conflict_inside_a_callers_transaction_is_retried(trialog):
    """A follower of the log dispatches commands inside its own transaction: a write
    conflict there rolls back to the attempt's savepoint and the retry succeeds."""
    import threading

    if trialog.settings.is_sqlite:
        pytest.skip("SQLite serialises writers: no conflict can happen between them")
    pid = enrol(trialog)
    record, injected = trialog.service.record, []

    def record_after_another_writer(decision):
        if not injected:  # once: another process writes to the participant first
            injected.append(True)
            other = threading.Thread(target=send, args=(trialog, c.RecordDose(pid, dose(1))))
            other.start()
            other.join()
        return record(decision)

    trialog.service.record = record_after_another_writer
    try:
        with trialog.service.recorder.transaction(commit=True):
            answer = send(trialog, c.RecordDose(pid, dose(2)))
    finally:
        trialog.service.record = record
    assert injected and answer["version"] == 5
    assert stored_versions(trialog, pid) == 5


def _queued_behind_a_commit(t, calls):
    """Runs ``calls`` in threads while the bus is held as if another thread were
    committing, releases it once all of them wait, and returns each call's outcome (its
    answer, or the exception it raised) with what the store held when it returned."""
    import threading
    import time

    outcomes: list = [None] * len(calls)

    def run(i: int) -> None:
        try:
            body = calls[i]()
            with t.engine.connect() as connection:  # committed before it was answered?
                stored = connection.execute(select(func.count()).select_from(
                    command_records).where(command_records.c.command_id == body["command_id"]
                                           )).scalar()
            outcomes[i] = (body, stored)
        except Exception as error:  # noqa: BLE001 - the test looks at it
            outcomes[i] = (error, None)

    with t.bus._turn:
        t.bus._committing = True
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while len(t.bus._waiting) < len(calls):
        assert time.monotonic() < deadline, "the calls did not queue"
        time.sleep(0.01)
    with t.bus._turn:
        t.bus._committing = False
        t.bus._turn.notify_all()
    for thread in threads:
        thread.join(30)
    return outcomes


def test_commands_queued_behind_a_commit_go_in_one_transaction_each_answered_alone(trialog):
    """Group commit: seven commands that arrive while another is committing are written in
    the next transaction together; the refused ones (an unknown participant, a stale
    expected version, a reused command id) are answered alone and write nothing, and each
    accepted one is answered only once it is committed."""
    if trialog.settings.is_sqlite:
        pytest.skip("SQLite serialises writers: the bus groups nothing there")
    pid = enrol(trialog)
    reused = str(uuid.uuid4())
    send(trialog, c.RecordDose(pid, dose(30)), command_id=reused)
    before = trialog.bus.groups
    calls = [
        lambda: send(trialog, c.RecordDose(pid, dose(1))),
        lambda: send(trialog, c.RecordDose(pid, dose(2))),
        lambda: send(trialog, c.RecordConsent(new_participant_id(), {})),
        lambda: send(trialog, c.RecordDose(pid, dose(3)), expected_version=1),
        lambda: send(trialog, c.RecordDose(pid, dose(4)), command_id=reused),
        lambda: send(trialog, c.ScreenParticipant(new_participant_id(), screening())),
        lambda: send(trialog, c.RecordDose(pid, dose(5))),
    ]
    outcomes = _queued_behind_a_commit(trialog, calls)
    assert trialog.bus.groups == before + 1  # one transaction for all seven
    refused = [type(outcomes[i][0]) for i in (2, 3, 4)]
    assert refused == [ParticipantNotFound, VersionConflict, IdempotencyKeyReused]
    accepted = [outcomes[i] for i in (0, 1, 5, 6)]
    assert all(isinstance(body, dict) and stored == 1 for body, stored in accepted)
    assert sorted(outcomes[i][0]["version"] for i in (0, 1, 6)) == [5, 6, 7]
    assert stored_versions(trialog, pid) == 7


def test_a_command_whose_events_cannot_be_written_fails_alone_not_its_group(trialog):
    """A fault of one command's own (here an event holding text no encoder takes, which
    the API's validation keeps out but the bus must not trust) fails that command only:
    the group it was queued in is decided again one command at a time."""
    if trialog.settings.is_sqlite:
        pytest.skip("SQLite serialises writers: the bus groups nothing there")
    pid, other = enrol(trialog), enrol(trialog)
    unwritable = {"drug": "a\ud800b", "started_on": REGISTERED, "stopped_on": None,
                  "contains_b12": False}
    calls = [
        lambda: send(trialog, c.RecordDose(pid, dose(1))),
        lambda: send(trialog, c.ReportMedication(other, unwritable)),
        lambda: send(trialog, c.RecordDose(pid, dose(2))),
        lambda: send(trialog, c.RecordDose(other, dose(3))),
    ]
    outcomes = _queued_behind_a_commit(trialog, calls)
    assert isinstance(outcomes[1][0], Exception)
    assert not isinstance(outcomes[1][0], DomainError)
    for i in (0, 2, 3):
        body, stored = outcomes[i]
        assert isinstance(body, dict) and stored == 1, outcomes[i]
    assert stored_versions(trialog, pid) == 5 and stored_versions(trialog, other) == 4


def test_a_value_the_database_refuses_is_a_command_s_own_fault_not_its_group_s():
    import psycopg
    import sqlalchemy

    from infrastructure.store.bus import _a_command_s_fault

    refused = sqlalchemy.exc.DataError("INSERT", {}, psycopg.errors.NumericValueOutOfRange())
    assert _a_command_s_fault(refused)
    assert _a_command_s_fault(RuntimeError("a fault in the program"))
    for whole in (sqlalchemy.exc.OperationalError("SELECT", {}, Exception("gone")),
                  DatabaseLocked("locked meanwhile")):
        assert not _a_command_s_fault(whole)


def test_a_command_alone_is_not_grouped(trialog):
    before = trialog.bus.groups
    pid = enrol(trialog)
    send(trialog, c.RecordDose(pid, dose(1)))
    assert trialog.bus.groups == before


def test_commands_dispatched_together_are_decided_in_order_and_written_in_one_go(trialog):
    """A bulk import's path: each command is decided on what those before it decided
    (two randomizations in one stratum draw two positions of one sequence), refusals are
    answered alone and write nothing, a command id twice is a retry, and every answer's
    position is its event's in the log."""
    first, second = new_participant_id("METRO"), new_participant_id("METRO")
    registered = {"registered_on": REGISTERED}
    retried = str(uuid.uuid4())

    def intent(command, command_id=None, **kwargs):
        return Intent(command, command_id or str(uuid.uuid4()), "test-import", **kwargs)

    intents = [
        intent(c.ScreenParticipant(first, screening("METRO"))),
        intent(c.RecordConsent(first, consent()), retried),
        intent(c.RandomizeParticipant(first, registered)),
        intent(c.ScreenParticipant(second, screening("METRO"))),
        intent(c.RandomizeParticipant(second, registered)),  # not consented: refused
        intent(c.RecordConsent(second, consent()), expected_version=2),  # it is at 1
        intent(c.RecordConsent(second, consent())),
        intent(c.RandomizeParticipant(second, registered)),
        intent(c.RecordConsent(first, consent()), retried),  # the same again: a retry
        intent(c.RecordDose(first, dose(1)), retried),  # another command, same id
        intent(c.RecordConsent(new_participant_id("METRO"), consent())),
    ]
    outcomes = trialog.bus.dispatch_all(intents)
    kinds = [type(o).__name__ if not isinstance(o, Accepted) else o.replayed
             for o in outcomes]
    assert kinds == [False, False, False, False, "InvalidTransition", "VersionConflict",
                     False, False, True, "IdempotencyKeyReused", "ParticipantNotFound"]
    assert outcomes[8].body == outcomes[1].body
    assert [outcomes[i].body["version"] for i in (0, 1, 2, 3, 6, 7)] == [1, 2, 3, 1, 2, 3]
    positions = [outcomes[i].body["position"] for i in (0, 1, 2, 3, 6, 7)]
    assert positions == sorted(positions)
    with trialog.engine.connect() as connection:
        for i in (0, 1, 2, 3, 6, 7):
            body = outcomes[i].body
            assert body["position"] == connection.execute(position_of(
                trialog.service.recorder, body["participant_id"], body["version"])).scalar()
    one, two = (trialog.service.get_participant(pid) for pid in (first, second))
    assert (one.version, two.version) == (3, 3)
    assert one.allocation_index != two.allocation_index
    again = trialog.bus.dispatch(c.RecordConsent(first, consent()), command_id=retried,
                                 actor="test-import")
    assert again.replayed and again.body == outcomes[1].body


def test_a_command_that_wrote_nothing_answers_no_position_when_sent_again(trialog):
    """A deviation flagged a second time writes no event: its answer has no position, and
    sent again (alone or in a batch) it answers the same, not the position of the event
    its version names (the first flag's)."""
    pid = enrol(trialog)
    flag = c.FlagDeviation(pid, {
        "deviation_id": str(uuid.uuid4()), "code": "wrong_dose", "severity": "minor",
        "evidence": [trialog.service.get_participant(pid).screening_event],
        "detail": "dose on 2026-03-02 was 2000 mcg"})
    first = send(trialog, flag, actor="deviation-monitor")
    again = str(uuid.uuid4())
    nothing = send(trialog, flag, command_id=again, actor="deviation-monitor")
    assert first["position"] is not None and first["version"] == nothing["version"]
    assert (nothing["events"], nothing["position"]) == ([], None)
    alone = trialog.bus.dispatch(flag, command_id=again, actor="deviation-monitor")
    [together] = trialog.bus.dispatch_all([Intent(flag, again, "deviation-monitor")])
    assert isinstance(together, Accepted)
    assert alone.replayed and together.replayed
    assert alone.body == together.body == nothing


def test_commands_dispatched_together_take_the_snapshots_of_a_long_record(trialog):
    """A participant whose record passes 100 events in one go gets its snapshot, and
    loads from it to the same state as from its events."""
    pid = enrol(trialog)
    outcomes = trialog.bus.dispatch_all([
        Intent(c.RecordDose(pid, dose(day)), str(uuid.uuid4()), "test-import")
        for day in range(1, 101)])
    assert all(isinstance(o, Accepted) for o in outcomes)
    snapshots = list(trialog.service.snapshots.get(participant_uuid(pid)))
    assert [s.originator_version for s in snapshots] == [100]
    from_events = trialog.service.repository.get(participant_uuid(pid), version=103)
    assert trialog.service.get_participant(pid).__dict__ == from_events.__dict__


def test_a_locked_database_refuses_the_data_commands_dispatched_together(isolated):
    pid = enrol(isolated)
    isolated.bus.dispatch_trial("LockDatabase", command_id=str(uuid.uuid4()), actor="dm",
                                reason="interim analysis")
    outcomes = isolated.bus.dispatch_all([
        Intent(c.RecordDose(pid, dose(1)), str(uuid.uuid4()), "test-import"),
        Intent(c.RecordReminderSent(pid, {"visit": "week6", "kind": "window_open",
                                          "recipients": ["coordinator"]}),
               str(uuid.uuid4()), "reminders")])
    assert isinstance(outcomes[0], DatabaseLocked)  # not a data command: accepted
    assert isinstance(outcomes[1], Accepted) and outcomes[1].body["version"] == 4
    assert stored_versions(isolated, pid) == 4


def test_a_database_lock_lifted_by_an_edit_of_its_table_still_holds(isolated):
    """The commands read the bus's copy of the lock; the trial's record, which no one can
    write without the key, holds too: the copy set to unlocked lifts nothing."""
    from sqlalchemy import update

    from infrastructure.store.tables import database_lock

    pid = enrol(isolated)
    isolated.bus.dispatch_trial("LockDatabase", command_id=str(uuid.uuid4()), actor="dm",
                                reason="final analysis")
    events = isolated.service.recorder.events_record_cls.__table__
    with isolated.engine.begin() as connection:
        connection.execute(update(database_lock).values(locked_at=None, locked_by=None))
        # The record's lock relabelled an unlock in its topic column: its sealed state says.
        connection.execute(update(events).where(events.c.topic.endswith(".DatabaseLocked"))
                           .values(topic="domain.trial:TrialDatabase.DatabaseUnlocked"))
    for dispatch in (lambda: send(isolated, c.RecordDose(pid, dose(1))),
                     lambda: isolated.bus.dispatch_all([
                         Intent(c.RecordDose(pid, dose(2)), str(uuid.uuid4()), "import")])):
        with pytest.raises(DatabaseLocked, match="the database is locked"):
            outcome = dispatch()
            if isinstance(outcome, list):
                raise outcome[0]
    assert stored_versions(isolated, pid) == 3
    with isolated.engine.begin() as connection:  # the column put back: the unlock can load it
        connection.execute(update(events).where(events.c.topic.endswith(".DatabaseUnlocked"))
                           .values(topic="domain.trial:TrialDatabase.DatabaseLocked"))
    isolated.bus.dispatch_trial("UnlockDatabase", command_id=str(uuid.uuid4()), actor="dm",
                                reason="query found")
    send(isolated, c.RecordDose(pid, dose(1)))
    assert stored_versions(isolated, pid) == 4


def test_the_clock_scan_writes_nothing_while_the_database_is_locked(isolated):
    """A visit's window that closes during a database lock is not marked missed (nor any
    deviation flagged) into the frozen record; the scan after the unlock finds it."""
    from datetime import timedelta

    from infrastructure.jobs.monitor import scan_clock
    from infrastructure.readside.projections import TrialProjection

    pid = enrol(isolated)
    TrialProjection(isolated).catch_up()
    isolated.bus.dispatch_trial("LockDatabase", command_id=str(uuid.uuid4()), actor="dm",
                                reason="interim analysis")
    later = REGISTERED + timedelta(days=400)

    assert scan_clock(isolated, later)["database_locked"] is True
    assert stored_versions(isolated, pid) == 3

    isolated.bus.dispatch_trial("UnlockDatabase", command_id=str(uuid.uuid4()), actor="dm",
                                reason="analysis done")
    counts = scan_clock(isolated, later)
    assert "database_locked" not in counts and counts["missed"] >= 4
    assert isolated.service.get_participant(pid).missed_visits


def test_a_lock_committed_while_commands_are_written_together_refuses_them(isolated):
    """On PostgreSQL a LockDatabase can commit between the first look at the lock and the
    insert of the events; the second look, under the event table's lock, sees it, and the
    commands are decided again: refused, nothing of them written."""
    pid = enrol(isolated)
    isolated.bus.dispatch_trial("LockDatabase", command_id=str(uuid.uuid4()), actor="dm",
                                reason="interim analysis")
    looks = []
    real = isolated.bus._database_locked

    def not_yet_then_locked(session):
        looks.append(real(session))
        return None if len(looks) == 1 else looks[-1]  # the first look came too early

    isolated.bus._database_locked = not_yet_then_locked
    outcomes = isolated.bus.dispatch_all(
        [Intent(c.RecordDose(pid, dose(1)), str(uuid.uuid4()), "test-import")])
    assert len(looks) == 3  # before, after the insert (rolled back), before again
    assert isinstance(outcomes[0], DatabaseLocked)
    assert stored_versions(isolated, pid) == 3


def test_a_failure_that_is_no_refusal_writes_nothing_of_a_batch_or_only_itself_of_a_group(
        trialog):
    """A batch or an import (alone=False) is written whole or not at all when a command
    fails otherwise than by a rule; a group's commands (alone=True) are each other's
    strangers, and only the failing one is answered with its error."""
    pid = enrol(trialog)

    def broken(participant, command, audit):
        raise RuntimeError("a defect in a handler")

    def batch():
        return [Intent(c.ScreenParticipant(new_participant_id(), screening()),
                       str(uuid.uuid4()), "test-import"),
                Intent(c.RecordDose(pid, dose(1)), str(uuid.uuid4()), "test-import")]

    trialog.service._handlers[c.RecordDose] = broken
    try:
        first = batch()
        with pytest.raises(RuntimeError):
            trialog.bus.dispatch_all(first, alone=False)
        with pytest.raises(ParticipantNotFound):
            trialog.service.get_participant(first[0].command.participant_id)
        second = batch()
        outcomes = trialog.bus.dispatch_all(second)
    finally:
        trialog.service._handlers[c.RecordDose] = trialog.service.record_dose
    assert isinstance(outcomes[0], Accepted) and isinstance(outcomes[1], RuntimeError)
    assert trialog.service.get_participant(second[0].command.participant_id).version == 1
    assert stored_versions(trialog, pid) == 3


def test_a_batch_is_written_with_the_same_statements_whatever_its_size(trialog):
    """On PostgreSQL a batch's look-ups and inserts send its values as arrays: the
    statements are the same for 3 commands as for 40 (the driver converts each once),
    and the idempotency records written that way hold each command's first answer."""
    def batch(n: int) -> tuple[list[Intent], list[str]]:
        executed: list[str] = []

        def seen(connection, cursor, statement, parameters, context, executemany):
            executed.append(statement)

        intents = [Intent(c.ScreenParticipant(new_participant_id(), screening()),
                          str(uuid.uuid4()), "test-import") for _ in range(n)]
        event.listen(trialog.engine, "before_cursor_execute", seen)
        try:
            outcomes = trialog.bus.dispatch_all(intents)
        finally:
            event.remove(trialog.engine, "before_cursor_execute", seen)
        assert all(isinstance(o, Accepted) and not o.replayed for o in outcomes)
        return intents, executed

    _, few = batch(3)
    large, many = batch(40)
    if trialog.engine.dialect.name == "postgresql":
        assert many == few
        assert len(many) < 15
    with trialog.engine.connect() as connection:
        rows = {row.command_id: row for row in connection.execute(
            select(command_records).where(command_records.c.command_id.in_(
                [i.command_id for i in large])))}
    assert set(rows) == {i.command_id for i in large}
    for intent in large:
        again = trialog.bus.dispatch(intent.command, command_id=intent.command_id,
                                     actor="test-import")
        row = rows[intent.command_id]
        assert again.replayed and again.body["participant_id"] == row.participant_id
        assert as_utc(row.recorded_at) == datetime.fromisoformat(
            again.body["events"][0]["recorded_at"])


def test_a_batch_sent_again_answers_each_first_answer_finding_positions_in_one_query(
        trialog):
    """A batch sent again (an import run again, a client's retry) answers each command's
    first answer with the position of the event it ended with, the positions found in
    one query whatever the batch's size; a command id reused for another command among
    them is refused alone."""
    pid = enrol(trialog)
    intents = [Intent(c.ScreenParticipant(new_participant_id(), screening()),
                      str(uuid.uuid4()), "test-import") for _ in range(6)]
    intents.append(Intent(c.RecordDose(pid, dose(1)), str(uuid.uuid4()), "test-import"))
    first = trialog.bus.dispatch_all(intents)
    assert all(isinstance(o, Accepted) and not o.replayed for o in first)
    reused = Intent(c.RecordDose(pid, dose(2)), intents[-1].command_id, "test-import")
    executed: list[str] = []

    def seen(connection, cursor, statement, parameters, context, executemany):
        executed.append(statement)

    event.listen(trialog.engine, "before_cursor_execute", seen)
    try:
        again = trialog.bus.dispatch_all([*intents, reused])
    finally:
        event.remove(trialog.engine, "before_cursor_execute", seen)
    assert [o.body for o in again[:-1]] == [o.body for o in first]
    assert all(o.replayed for o in again[:-1])
    assert all(o.body["position"] for o in again[:-1])
    assert isinstance(again[-1], IdempotencyKeyReused)
    events = trialog.service.recorder.events_table_name
    # (The lock's statement reads the trial's newest event, not positions.)
    assert len([s for s in executed
                if f"FROM {events}" in s and "trialog_database_lock" not in s]) == 1


def test_two_batches_that_deadlock_on_command_ids_are_decided_again_not_failed(
        trialog, monkeypatch):
    """Two batches reusing each other's command ids in opposite orders (two processes of
    an import given such a file) deadlock in PostgreSQL on the records' unique key; the
    one rolled back is decided again: its commands are then refused as reused ids, and
    nothing fails."""
    if trialog.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: nothing to deadlock")
    from infrastructure.store import bus as bus_module

    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    batches = [[Intent(c.ScreenParticipant(new_participant_id(), screening()), command_id,
                       "test-import") for command_id in ids]
               for ids in ((first, second), (second, first))]
    together = threading.Barrier(2, timeout=30)
    real_insert = bus_module.insert_rows
    inserts: list[str] = []

    def both_at_once(session, table, rows):
        if table is command_records:
            inserts.append(rows[0]["command_id"])
            if len(inserts) <= 2:  # the first two; a retry goes alone
                together.wait()  # each inserts its first record, then waits on the other
        return real_insert(session, table, rows)

    monkeypatch.setattr(bus_module, "insert_rows", both_at_once)
    decided: list[int] = []
    real_decide = trialog.bus._decide_all

    def counted(*args, **kwargs):
        decided.append(1)
        return real_decide(*args, **kwargs)

    monkeypatch.setattr(trialog.bus, "_decide_all", counted)
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(trialog.bus.dispatch_all, batches))
    kinds = sorted([type(o).__name__ for o in found] for found in outcomes)
    assert kinds == [["Accepted", "Accepted"],
                     ["IdempotencyKeyReused", "IdempotencyKeyReused"]]
    assert len(decided) >= 3  # the batch rolled back was decided again


def test_a_batch_look_up_matches_whole_ids_only(trialog):
    """``any_of`` compares the whole value: an id longer than the column (which a cast to
    the column's varchar(n) would cut) finds nothing, as an IN list finds nothing."""
    command_id = str(uuid.uuid4())
    send(trialog, c.ScreenParticipant(new_participant_id(), screening()), command_id=command_id)
    postgres = trialog.engine.dialect.name == "postgresql"
    query = select(command_records.c.command_id).where(
        any_of(command_records.c.command_id, postgres))
    with trialog.engine.connect() as connection:
        assert connection.execute(query, {"ids": [command_id]}).scalars().all() == [
            command_id]
        assert connection.execute(query, {"ids": [command_id + "-longer"]}).all() == []


@pytest.fixture
def two_processes() -> Iterator[tuple[Any, Any]]:
    """Two applications on the shared PostgreSQL database, as two API processes."""
    from infrastructure.store.bootstrap import bootstrap
    from tests.conftest import settings_for
    from tests.databases import SHARED_URL

    first = bootstrap(settings_for(SHARED_URL), migrate=True)
    second = bootstrap(settings_for(SHARED_URL))
    try:
        yield first, second
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("grouped", [False, True])
def test_a_retry_racing_its_first_copy_answers_the_first_answer_not_a_refusal(
        two_processes, monkeypatch, grouped):
    """A retry looks for its command's record, finds none, and reads the participant after
    the first copy committed (in another process): the rule then refuses it (a stale
    expected version, a dose already recorded). It answered that refusal (409), where the
    first answer is owed. Alone and in a group (a batch, an import)."""
    import infrastructure.store.bus as bus_module
    import infrastructure.store.stored as stored_module

    first, retry = two_processes
    pid = enrol(first)
    command = c.RecordDose(pid, dose(1))
    command_id = str(uuid.uuid4())
    looked_up, committed = threading.Event(), threading.Event()
    real_load = bus_module.load_participants

    def load_once_the_first_copy_committed(*args, **kwargs):
        if threading.current_thread().name == "retry":
            looked_up.set()
            assert committed.wait(30)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(bus_module, "load_participants", load_once_the_first_copy_committed)
    monkeypatch.setattr(stored_module, "load_participants",  # a group's, through load_apart
                        load_once_the_first_copy_committed)
    answers: dict[str, Any] = {}

    def send_retry() -> None:
        try:
            if grouped:
                intent = Intent(command, command_id, "test-service", expected_version=3)
                answers["retry"] = retry.bus.dispatch_all([intent])[0]
            else:
                answers["retry"] = retry.bus.dispatch(command, command_id=command_id,
                                                      actor="test-service",
                                                      expected_version=3)
        except Exception as error:  # noqa: BLE001 - the answer under test
            answers["retry"] = error

    racing = threading.Thread(target=send_retry, name="retry")
    racing.start()
    assert looked_up.wait(30)
    answers["first"] = first.bus.dispatch(command, command_id=command_id,
                                          actor="test-service", expected_version=3)
    committed.set()
    racing.join(30)

    assert isinstance(answers["retry"], Accepted), answers["retry"]
    assert answers["retry"].replayed and not answers["first"].replayed
    assert answers["retry"].body == answers["first"].body
    assert stored_versions(first, pid) == 4
