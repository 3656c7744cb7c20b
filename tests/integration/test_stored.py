"""Stored states read as plain JSON values: the fast path (transcoded strings replaced in
the text before parsing) gives what walking the parsed state gives, also for text that
looks like a transcoded value."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from uuid import uuid4

import orjson
import psycopg
import pytest
from eventsourcing.persistence import IntegrityError, StoredEvent
from sqlalchemy import event, select

from domain import commands as c
from domain.participant import participant_uuid
from infrastructure.store.recording import ApplicationRecorder
from infrastructure.store.stored import (
    decrypt,
    events_table,
    load_participants,
    plain_state,
    plain_stream,
    plain_values,
)
from tests.factories import new_participant_id
from tests.integration.helpers import dose, enrol, send

LOOKALIKE = '{"_type_":"date_iso","_data_":"2024-01-01"}'


def test_text_that_looks_transcoded_stays_text_and_both_paths_agree(trialog):
    pid = enrol(trialog)
    send(trialog, c.RecordDose(pid, dose(1)), reason=LOOKALIKE)
    stream = plain_stream(trialog.service, participant_uuid(pid))
    assert stream[-1][2]["reason"] == LOOKALIKE
    assert stream[-1][2]["data"]["taken_on"] == dose(1)["taken_on"].isoformat()
    table = events_table(trialog.service.recorder)
    with trialog.engine.connect() as connection:
        states = connection.execute(select(table.c.state).where(
            table.c.originator_id == participant_uuid(pid))).scalars().all()
    mapper = trialog.service.mapper
    for state in map(bytes, states):
        walked = plain_values(orjson.loads(decrypt(mapper, state)))
        assert plain_state(mapper, state) == walked


def test_participants_loaded_together_are_what_the_repository_loads(trialog):
    """Two queries for many participants: one with snapshots (a record past 200 events:
    the newest snapshot, then the events after it), one without, and an unknown id."""
    long, short, unknown = enrol(trialog), enrol(trialog), new_participant_id()
    for day in range(1, 215):
        send(trialog, c.RecordDose(long, dose(day)))
    service = trialog.service
    assert [s.originator_version for s in service.snapshots.get(participant_uuid(long))
            ] == [100, 200]
    with service.recorder.transaction(commit=False) as session:
        loaded, absent = load_participants(service, session, {long, short, unknown})
    assert absent == {participant_uuid(unknown)}
    by_id = {p.participant_id: p for p in loaded}
    assert set(by_id) == {long, short}
    for pid in (long, short):
        from_repository = service.repository.get(participant_uuid(pid))
        assert by_id[pid].__dict__ == from_repository.__dict__
    assert by_id[long].version == 217


@pytest.mark.parametrize("isolated_url", ["postgresql", "sqlite"], indirect=True)
def test_participants_loaded_together_pass_over_another_releases_snapshot(isolated):
    """As the repository (see the unit test of Snapshots): a snapshot another release's
    code took, here one saying the other arm, is passed over for the events before it."""
    from domain.participant import DERIVED_BY, derivation

    service = isolated.service
    pid = enrol(isolated)
    for day in range(1, 99):  # versions 4..101: a snapshot at 100
        send(isolated, c.RecordDose(pid, dose(day)))
    key = participant_uuid(pid)
    [taken] = list(service.snapshots.get(key))
    true_arm = service.get_participant(pid).arm
    other_arm = "control" if true_arm == "b12" else "b12"

    def loaded() -> Any:
        with service.recorder.transaction(commit=False) as session:
            [participant], _ = load_participants(service, session, {pid})
        return participant

    def forge(version: int, derived_by: str) -> None:
        forged = type(taken).take(service.repository.get(key, version=version))
        forged.state.update({"arm": other_arm, DERIVED_BY: derived_by})
        service.snapshots.recorder.insert_events(
            [service.snapshots.mapper.to_stored_event(forged)])

    forge(101, "another release")
    assert (loaded().arm, service.get_participant(pid).arm) == (true_arm, true_arm)
    send(isolated, c.RecordDose(pid, dose(101)))  # an event after it
    assert (loaded().arm, loaded().version) == (true_arm, 102)
    assert vars(loaded()) == vars(service.get_participant(pid))
    forge(102, derivation())  # this code's: used (what makes the above pass over)
    assert (loaded().arm, service.get_participant(pid).arm) == (other_arm, other_arm)


@pytest.mark.parametrize("isolated_url", ["postgresql", "sqlite"], indirect=True)
def test_a_saves_events_are_inserted_together_in_the_order_given(isolated):
    """The recorder inserts a save's events in one statement under the table lock, and
    notifies, on PostgreSQL (SQLite returns the ids in order only row by row): the
    positions it returns ascend in the order of the events and are theirs in the log; a
    version taken already fails the whole save with the library's conflict, and nothing
    of it is written."""
    recorder = isolated.service.recorder
    assert type(recorder) is ApplicationRecorder
    streams = [uuid4() for _ in range(5)]
    events = [StoredEvent(originator_id=stream, originator_version=version,
                          topic="tests:Event", state=f"{stream}/{version}".encode())
              for version in (1, 2**31) for stream in streams]  # the column is a bigint
    statements: list[str] = []

    def count(connection, cursor, statement, *_):
        if statement.startswith(("INSERT", "LOCK")):
            statements.append(statement.split(" ")[0])

    postgres = isolated.engine.dialect.name == "postgresql"
    with _listening(isolated, recorder.channel_name) as heard:
        event.listen(isolated.engine, "before_cursor_execute", count)
        try:
            positions = recorder.insert_events(events)
        finally:
            event.remove(isolated.engine, "before_cursor_execute", count)
        assert heard() == postgres  # followers are woken
    assert statements == (["LOCK", "INSERT"] if postgres else ["INSERT"] * len(events))
    assert positions == sorted(positions)
    logged = recorder.select_notifications(positions[0], len(events))
    assert [n.id for n in logged] == positions
    assert [(n.originator_id, n.originator_version, n.state) for n in logged] == [
        (e.originator_id, e.originator_version, e.state) for e in events]
    again = [StoredEvent(originator_id=uuid4(), originator_version=1, topic="tests:Event",
                         state=b"new"), events[3]]
    with pytest.raises(IntegrityError):
        recorder.insert_events(again)
    assert recorder.max_notification_id() == positions[-1]


@contextmanager
def _listening(t, channel: str) -> Iterator[Callable[[], bool]]:
    """On PostgreSQL, a connection listening on ``channel``: whether a notification came
    (within a second of asking). Never on SQLite."""
    if t.engine.dialect.name != "postgresql":
        yield lambda: False
        return
    url = t.settings.database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f"LISTEN {channel}")
        yield lambda: any(True for _ in connection.notifies(timeout=1, stop_after=1))
