"""Reading stored events straight from the event table: the fast decoder shared by the
projection, the audit and the exports, and the whole store stream by stream."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from uuid import UUID

from eventsourcing.persistence import Mapper, StoredEvent
from eventsourcing.utils import get_topic, resolve_topic
from sqlalchemy import select

from domain.participant import Participant

PARTICIPANT_TOPIC = get_topic(Participant) + "."


def decode(mapper: Mapper[UUID], originator_id: Any, version: int, topic: str,
           state: bytes | memoryview) -> Any:
    """The domain event of a stored row: the library mapper's steps for events without
    upcasting, minus its per-event generic lookups (this runs for every event read)."""
    state = bytes(state) if isinstance(state, memoryview) else state
    if not isinstance(originator_id, UUID):
        originator_id = UUID(str(originator_id))
    cls = resolve_topic(topic)
    if getattr(cls, "class_version", 1) != 1:
        return mapper.to_domain_event(StoredEvent(originator_id, version, topic, state))
    if mapper.cipher:
        state = mapper.cipher.decrypt(state)
    if mapper.compressor:
        state = mapper.compressor.decompress(state)
    event_state = mapper.transcoder.decode(state)
    event_state["originator_id"] = originator_id
    event_state["originator_version"] = version
    event = object.__new__(cls)
    object.__setattr__(event, "__dict__", event_state)
    return event


def events_table(recorder: Any) -> Any:
    return recorder.events_record_cls.__table__


def stream_rows(recorder: Any, batch: int = 2000, topic_prefix: str | None = None,
                originator_id: UUID | None = None) -> Iterator[Any]:
    """Stored rows (id, originator_id, originator_version, topic, state), stream by stream
    in version order, fetched ``batch`` at a time so memory stays constant."""
    table = events_table(recorder)
    query = select(table.c.id, table.c.originator_id, table.c.originator_version,
                   table.c.topic, table.c.state)
    if topic_prefix is not None:
        query = query.where(table.c.topic.startswith(topic_prefix))
    if originator_id is not None:
        query = query.where(table.c.originator_id == originator_id)
    query = query.order_by(table.c.originator_id, table.c.originator_version)
    with recorder.datastore.get_connection() as connection:
        yield from connection.execution_options(yield_per=batch).execute(query)


def participant_events(service: Any, batch: int = 2000) -> Iterator[Any]:
    """Every participant event, decoded, participant by participant in version order."""
    mapper = service.mapper
    for row in stream_rows(service.recorder, batch, topic_prefix=PARTICIPANT_TOPIC):
        yield decode(mapper, row.originator_id, row.originator_version, row.topic, row.state)
