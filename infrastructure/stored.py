"""Reading stored events straight from the event table: the fast decoder shared by the
projection, the audit and the exports, and the whole store stream by stream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from uuid import UUID

from eventsourcing.persistence import Mapper, StoredEvent
from eventsourcing.utils import get_topic, resolve_topic
from sqlalchemy import func, select

from domain.chain import canonical_json
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


StreamRange = tuple[UUID | None, UUID | None]  # originator ids from (inclusive), to


def stream_ranges(parts: int) -> list[StreamRange]:
    """``parts`` contiguous ranges covering every originator id (ids are uniform: UUID 4
    and 5), for checking streams in parallel."""
    bounds: list[UUID | None] = [UUID(int=(i << 128) // parts) for i in range(1, parts)]
    return list(zip([None, *bounds], [*bounds, None], strict=True))


def stored_events(recorder: Any) -> int:
    """The newest notification id: the number of stored events, near enough."""
    with recorder.datastore.engine.connect() as connection:
        return int(connection.execute(select(func.max(events_table(recorder).c.id))).scalar()
                   or 0)


def stream_rows(recorder: Any, batch: int = 2000, topic_prefix: str | None = None,
                originator_id: UUID | None = None,
                streams: StreamRange = (None, None)) -> Iterator[Any]:
    """Stored rows (id, originator_id, originator_version, topic, state), stream by stream
    in version order, fetched ``batch`` at a time so memory stays constant."""
    table = events_table(recorder)
    query = select(table.c.id, table.c.originator_id, table.c.originator_version,
                   table.c.topic, table.c.state)
    if topic_prefix is not None:
        query = query.where(table.c.topic.startswith(topic_prefix))
    if originator_id is not None:
        query = query.where(table.c.originator_id == originator_id)
    low, high = streams
    if low is not None:
        query = query.where(table.c.originator_id >= low)
    if high is not None:
        query = query.where(table.c.originator_id < high)
    query = query.order_by(table.c.originator_id, table.c.originator_version)
    with recorder.datastore.engine.connect() as connection:
        yield from connection.execution_options(yield_per=batch).execute(query)


def plain_text(d: dict[str, Any]) -> Any:
    """JSON object hook: a transcoded value becomes its plain JSON text (UUIDs dashed, dates
    and datetimes as the ISO text they are stored as), as the digest and the API show it."""
    kind = d.get("_type_")
    if kind is None or len(d) != 2:
        return d
    data = d["_data_"]
    if kind == "uuid_hex":
        return f"{data[:8]}-{data[8:12]}-{data[12:16]}-{data[16:20]}-{data[20:]}"
    return data


PLAIN_JSON = json.JSONDecoder(object_hook=plain_text)


class Upcast(Exception):
    """The stored state has an older class version: only the mapper can decode it."""


def plain_state(mapper: Mapper[UUID], state: bytes) -> dict[str, Any]:
    """A stored state as plain JSON values, without building the domain event."""
    if mapper.cipher:
        state = mapper.cipher.decrypt(state)
    if mapper.compressor:
        state = mapper.compressor.decompress(state)
    content: dict[str, Any] = PLAIN_JSON.decode(state.decode())
    if "class_version" in content:
        raise Upcast
    return content


def plain_stream(service: Any, originator_id: UUID, lte: int | None = None,
                 gt: int | None = None) -> list[tuple[int, str, dict[str, Any]]]:
    """One stream's events after version ``gt`` up to version ``lte`` as (version, topic,
    plain JSON state), oldest first, read in one query."""
    table = events_table(service.recorder)
    query = select(table.c.originator_id, table.c.originator_version, table.c.topic,
                   table.c.state).where(table.c.originator_id == originator_id)
    if lte is not None:
        query = query.where(table.c.originator_version <= lte)
    if gt is not None:
        query = query.where(table.c.originator_version > gt)
    with service.recorder.datastore.engine.connect() as connection:
        rows = connection.execute(query.order_by(table.c.originator_version)).all()
    events = []
    for row in rows:
        state = row.state if isinstance(row.state, bytes) else bytes(row.state)
        try:
            content = plain_state(service.mapper, state)
        except Upcast:
            event = decode(service.mapper, *row)
            content = json.loads(canonical_json({k: v for k, v in vars(event).items()
                                                 if k not in ("originator_id",
                                                              "originator_version")}))
        events.append((row.originator_version, row.topic, content))
    return events


def participant_events(service: Any, batch: int = 2000) -> Iterator[Any]:
    """Every participant event, decoded, participant by participant in version order."""
    mapper = service.mapper
    for row in stream_rows(service.recorder, batch, topic_prefix=PARTICIPANT_TOPIC):
        yield decode(mapper, row.originator_id, row.originator_version, row.topic, row.state)
