"""A command's record (its idempotency key, fingerprint and first answer) can't be changed
or made up in the database without the key: a retry of it is refused, nothing is written,
and verify reports the record. Nor can a finished check's report (the checks themselves
are over HTTP: tests/e2e/test_verify_jobs.py)."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, func, insert, select, text, update

from domain import commands as c
from domain.errors import CommandRecordAltered
from infrastructure.audit.verification import check_store
from infrastructure.store.access_seals import seals_for
from infrastructure.store.bus import Intent, fingerprint
from infrastructure.store.tables import command_records
from tests.integration.helpers import dose, enrol, send

EDITS = {
    "response": lambda row: {"response": row.response.replace('"version":4', '"version":9')},
    "fingerprint": lambda row: {"fingerprint": "0" * 64},
    "participant": lambda row: {"participant_id": "CASE-SOMEONE-ELSE"},
    "recorded_at": lambda row: {"recorded_at": row.recorded_at - timedelta(days=1)},
    "seal removed": lambda row: {"seal": None},
}


def record(t, command_id):
    with t.engine.connect() as connection:
        return connection.execute(select(command_records).where(
            command_records.c.command_id == command_id)).one()


def edit(t, command_id, **values):
    with t.engine.begin() as connection:
        connection.execute(update(command_records)
                           .where(command_records.c.command_id == command_id).values(**values))


def versions(t, pid) -> int:
    return t.service.get_participant(pid).version


@pytest.mark.parametrize("change", list(EDITS))
def test_a_retry_of_a_command_whose_record_was_changed_is_refused(isolated, change, caplog):
    t = isolated
    pid = enrol(t)
    command_id = str(uuid.uuid4())
    first = send(t, c.RecordDose(pid, dose(0)), command_id=command_id)
    assert first["version"] == 4
    assert send(t, c.RecordDose(pid, dose(0)), command_id=command_id) == first
    edit(t, command_id, **EDITS[change](record(t, command_id)))
    with caplog.at_level(logging.WARNING, "trialog.bus"), \
            pytest.raises(CommandRecordAltered, match=command_id):
        send(t, c.RecordDose(pid, dose(0)), command_id=command_id)
    assert f"the record of command {command_id} fails its seal" in caplog.text
    # The same in a batch: that command refused alone, the other written.
    other = str(uuid.uuid4())
    refused, accepted = t.bus.dispatch_all([
        Intent(c.RecordDose(pid, dose(0)), command_id, "s"),
        Intent(c.RecordDose(pid, dose(1)), other, "s")])
    assert isinstance(refused, CommandRecordAltered)
    assert accepted.body["version"] == 5
    assert versions(t, pid) == 5
    [problem] = check_store(t, processes=1).problems
    assert (problem.kind, problem.participant_id) == (
        "record", "CASE-SOMEONE-ELSE" if change == "participant" else pid)
    assert problem.detail.startswith(f"the record of command {command_id} fails its seal")


def test_a_record_made_up_in_the_database_answers_no_retry(isolated):
    """A row inserted by hand, with the fingerprint a command would have, would otherwise
    answer that command with what the row says, and write nothing."""
    t = isolated
    pid = enrol(t)
    command = c.RecordDose(pid, dose(0))
    command_id = str(uuid.uuid4())
    with t.engine.begin() as connection:
        connection.execute(insert(command_records).values(
            command_id=command_id, fingerprint=fingerprint(command, None, None),
            participant_id=pid, response='{"version": 3, "events": []}',
            recorded_at=datetime.now(UTC)))
    with pytest.raises(CommandRecordAltered):
        send(t, command, command_id=command_id)
    assert versions(t, pid) == 3
    assert [p.kind for p in check_store(t, processes=1).problems] == ["record"]


def test_a_retry_of_a_lock_whose_record_was_changed_is_refused(isolated):
    t = isolated
    command_id = str(uuid.uuid4())
    first = t.bus.dispatch_trial("LockDatabase", command_id=command_id, actor="dm",
                                 reason="interim analysis")
    again = t.bus.dispatch_trial("LockDatabase", command_id=command_id, actor="dm",
                                 reason="interim analysis")
    assert again.replayed and again.body == first.body
    edit(t, command_id, response=record(t, command_id).response.replace(
        '"version": 1', '"version": 2'))
    with pytest.raises(CommandRecordAltered):
        t.bus.dispatch_trial("LockDatabase", command_id=command_id, actor="dm",
                             reason="interim analysis")
    [problem] = check_store(t, processes=1).problems
    assert (problem.kind, problem.version) == ("record", 2)


def test_an_untouched_record_verifies_and_a_changed_one_is_no_evidence(isolated):
    """A record failing its seal says nothing of its stream: a version raised in it is not
    reported as deleted events."""
    t = isolated
    pid = enrol(t)
    command_id = str(uuid.uuid4())
    send(t, c.RecordDose(pid, dose(0)), command_id=command_id)
    assert check_store(t, processes=1).ok
    edit(t, command_id, response=record(t, command_id).response.replace(
        '"version":4', '"version":9'))
    assert [(p.kind, p.version) for p in check_store(t, processes=1).problems] == [
        ("record", 9)]


def test_migration_0025_seals_the_records_already_there(isolated_url):
    """Records written before the seals (at revision 0024) are sealed by the upgrade, as
    bootstrap runs it: their retries are answered as before."""
    from infrastructure.store import migrations
    from infrastructure.store.access_seals import register

    engine = create_engine(isolated_url)
    register(engine, b"the deployment's key")  # as bootstrap does
    migrations.upgrade(engine, "0024")
    ids = [str(uuid.UUID(int=n)) for n in range(1, 2502)]  # three chunks
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO trialog_commands (command_id, fingerprint, participant_id, "
            "response, recorded_at) VALUES (:id, :fp, 'CASE-OLD', :answer, :at)"),
            [{"id": i, "fp": "f" * 64, "answer": '{"version": 1}',
              "at": datetime(2026, 3, 1, 12, 30, tzinfo=UTC)} for i in ids])
    migrations.upgrade(engine)
    seals = seals_for(engine)
    with engine.connect() as connection:
        rows = connection.execute(select(command_records)).all()
        unsealed = connection.execute(select(func.count()).select_from(command_records)
                                      .where(command_records.c.seal.is_(None))).scalar()
    assert len(rows) == len(ids) and unsealed == 0
    assert all(seals.command_holds(row) for row in rows)
    engine.dispose()


def test_a_command_decided_again_after_its_record_was_deleted_is_reported(isolated):
    """Deleting a record can't be told from a record never written, so a retry is
    decided again; its events, recorded a second time, are what verify finds."""
    from sqlalchemy import delete

    t = isolated
    pid = enrol(t)
    command_id = str(uuid.uuid4())
    medication = c.ReportMedication(pid, {"drug": "ibuprofen", "contains_b12": False})
    send(t, medication, command_id=command_id)
    send(t, c.RecordDose(pid, dose(1)))
    with t.engine.begin() as connection:
        connection.execute(delete(command_records)
                           .where(command_records.c.command_id == command_id))
    assert check_store(t, processes=1).ok
    assert send(t, medication, command_id=command_id)["version"] == 6
    for deep in (False, True):
        [problem] = check_store(t, processes=1, deep=deep).problems
        assert (problem.kind, problem.version, problem.participant_id) == (
            "repeated", 6, pid)
        assert problem.detail == (
            f"command {command_id} was decided again: its events begin at version 4 too "
            "(a retry decided anew, as when the command's record is deleted)")


def test_migration_0026_seals_the_finished_checks_already_there(isolated_url):
    from infrastructure.audit.verify_jobs import verify_jobs
    from infrastructure.store import migrations
    from infrastructure.store.access_seals import register

    engine = create_engine(isolated_url)
    register(engine, b"the deployment's key")
    migrations.upgrade(engine, "0025")
    at = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO trialog_verify_jobs (job_id, running, status, started_by, "
            "started_at, heartbeat_at, finished_at, events_checked, report) VALUES "
            "(:id, :running, :status, 'auditor', :at, :at, :done, 42, :report)"),
            [{"id": "done", "running": None, "status": "done", "at": at, "done": at,
              "report": '{"ok": true}'},
             {"id": "running", "running": True, "status": "running", "at": at,
              "done": None, "report": None}])
    migrations.upgrade(engine)
    with engine.connect() as connection:
        rows = {row.job_id: row for row in connection.execute(select(verify_jobs))}
    assert seals_for(engine).verify_job_holds(rows["done"])
    assert rows["running"].seal is None  # sealed when it ends
    engine.dispose()
