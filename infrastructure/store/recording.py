"""The event store's persistence: the library's SQLAlchemy factory and recorders, but for
how a save's events are inserted."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import StoredEvent
from eventsourcing_sqlalchemy.factory import SQLAlchemyFactory
from eventsourcing_sqlalchemy.recorders import (
    SQLAlchemyAggregateRecorder,
    SQLAlchemyApplicationRecorder,
)
from sqlalchemy import insert
from sqlalchemy.orm import Session

from infrastructure.store.migrations import sqlite_turn


class _TablesCreatedAlone:
    """On SQLite, a recorder's missing tables are created under the database's write lock,
    taken before they are looked for again: processes starting together on a new file
    wait for each other, where the library's look-then-create had two of them find no
    table and the second fail creating it. Where every table is there, no lock is taken."""

    datastore: Any
    tables: list[Any]

    def create_table(self) -> None:
        engine = self.datastore.engine
        if engine.dialect.name != "sqlite":
            super().create_table()  # type: ignore[misc]
            return
        with engine.connect() as connection:
            if all(engine.dialect.has_table(connection, t.name, schema=t.schema)
                   for t in self.tables):
                return
        with sqlite_turn(engine) as connection:
            for table in self.tables:
                table.create(connection, checkfirst=True)


class AggregateRecorder(_TablesCreatedAlone, SQLAlchemyAggregateRecorder):
    """The library's, for the snapshots, with its tables created as above."""


class ApplicationRecorder(_TablesCreatedAlone, SQLAlchemyApplicationRecorder):
    """Inserts a save's events with one statement returning their ids, under the library's
    table lock, where the library adds ORM records to the session and flushes them (the
    unit of work was a tenth of a command's Python). On PostgreSQL the rows go as four
    arrays in binary (``unnest``): four parameters whatever the number of rows, a
    statement the driver converts once, and states sent as their bytes rather than as hex
    text; for 100 events about a sixth of the client's CPU of a multi-row
    ``INSERT ... VALUES``. The ids come back in the order given. The lock, the
    notification and the conflicts raised are the library's (the statement runs through
    SQLAlchemy's connection, which turns a unique violation into its IntegrityError); a
    database without RETURNING gets the library's own insert."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        table = self.events_record_cls.__table__
        dialect = self.datastore.engine.dialect
        self._returning = dialect.insert_returning
        self._insert = insert(table).returning(table.c.id, sort_by_parameter_order=True)
        self._arrays: str | None = None
        if dialect.name == "postgresql":
            name = self.events_table_name if self.schema_name is None else \
                f"{self.schema_name}.{self.events_table_name}"
            # Ordered by position in the arrays, the rows are inserted (and numbered by
            # the id's sequence) in the order given.
            self._arrays = (
                f"INSERT INTO {name} (originator_id, originator_version, topic, state) "
                "SELECT i, v, t, s FROM unnest(%b::uuid[], %b::bigint[], %b::text[], "
                "%b::bytea[]) WITH ORDINALITY AS rows (i, v, t, s, n) ORDER BY n "
                "RETURNING id")

    def _insert_stored_events(self, session: Session, stored_events: Sequence[StoredEvent],
                              **kwargs: Any) -> Sequence[int]:
        if not self._returning:
            return super()._insert_stored_events(session, stored_events, **kwargs)
        self._lock_table(session)
        ids: list[int] = []
        if stored_events and self._arrays is not None:
            # The sequence numbers rows as they are inserted: ascending, the ids are in
            # the arrays' order.
            ids = sorted(session.connection().exec_driver_sql(self._arrays, (
                [e.originator_id for e in stored_events],
                [e.originator_version for e in stored_events],
                [e.topic for e in stored_events],
                [e.state for e in stored_events])).scalars())
        elif stored_events:
            ids = list(session.execute(self._insert, [
                {"originator_id": e.originator_id, "originator_version": e.originator_version,
                 "topic": e.topic, "state": e.state} for e in stored_events]).scalars())
        self._notify_channel(session)
        return ids


class Factory(SQLAlchemyFactory):
    aggregate_recorder_class = AggregateRecorder
    application_recorder_class = ApplicationRecorder
