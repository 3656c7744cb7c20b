"""The application on both databases: transactions, idempotency, concurrency, PHI."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select, text

from domain import commands as c
from domain.errors import IdempotencyKeyReused, NotEligible, ParticipantNotFound, VersionConflict
from infrastructure.store.tables import command_records
from tests.factories import new_participant_id, screening
from tests.integration.helpers import dose, enrol, send


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
