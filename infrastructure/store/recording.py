"""The event store's persistence: the library's SQLAlchemy factory and recorders, but for
how a save's events are inserted."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import StoredEvent
from eventsourcing_sqlalchemy.factory import SQLAlchemyFactory
from eventsourcing_sqlalchemy.recorders import SQLAlchemyApplicationRecorder
from sqlalchemy import insert
from sqlalchemy.orm import Session


class ApplicationRecorder(SQLAlchemyApplicationRecorder):
    """Inserts a save's events with a Core ``INSERT ... RETURNING id`` (on PostgreSQL the
    rows in one statement, the ids in the order given) under the library's table lock,
    where the library adds ORM records to the session and flushes them: the unit of work
    was a tenth of a command's Python. The lock, the notification and the conflicts raised
    are the library's; a database without RETURNING gets the library's own insert."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        table = self.events_record_cls.__table__
        self._insert = insert(table).returning(table.c.id, sort_by_parameter_order=True)
        self._returning = self.datastore.engine.dialect.insert_returning

    def _insert_stored_events(self, session: Session, stored_events: Sequence[StoredEvent],
                              **kwargs: Any) -> Sequence[int]:
        if not self._returning:
            return super()._insert_stored_events(session, stored_events, **kwargs)
        self._lock_table(session)
        ids: Sequence[int] = []
        if stored_events:
            ids = session.execute(self._insert, [
                {"originator_id": e.originator_id, "originator_version": e.originator_version,
                 "topic": e.topic, "state": e.state} for e in stored_events]).scalars().all()
        self._notify_channel(session)
        return list(ids)


class Factory(SQLAlchemyFactory):
    application_recorder_class = ApplicationRecorder
