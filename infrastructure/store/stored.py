"""Reading stored events straight from the event table: the fast decoder shared by the
projection, the audit and the exports, and the whole store stream by stream."""

from __future__ import annotations

import json
import logging
import re
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from eventsourcing.cryptography import AESCipher
from eventsourcing.persistence import Mapper, StoredEvent
from eventsourcing.utils import get_topic, resolve_topic
from sqlalchemy import Uuid, func, literal, select, tuple_, union_all

from domain.chain import canonical_json
from domain.errors import ParticipantNotFound
from domain.participant import Participant, participant_uuid
from domain.sealing import check_topic, unseal
from domain.service import project
from infrastructure.store.outages import is_unavailable, the_databases
from infrastructure.store.tables import any_of

log = logging.getLogger("trialog.store")

PARTICIPANT_TOPIC = get_topic(Participant) + "."


def decode(mapper: Mapper[UUID], originator_id: Any, version: int, topic: str,
           state: bytes | memoryview) -> Any:
    """The domain event of a stored row: the library mapper's steps for events without
    upcasting, minus its per-event generic lookups (this runs for every event read)."""
    state = as_bytes(state)
    originator_id = as_uuid(originator_id)
    cls = resolve_topic(topic)
    if getattr(cls, "class_version", 1) != 1:
        return mapper.to_domain_event(StoredEvent(originator_id, version, topic, state))
    event_state = mapper.transcoder.decode(decrypt(mapper, state, topic))
    event_state["originator_id"] = originator_id
    event_state["originator_version"] = version
    event = object.__new__(cls)
    object.__setattr__(event, "__dict__", event_state)
    return event


class Decrypter:
    """The library's AES-GCM cipher's decryption with the key set up once, not per call
    (its ``decrypt`` builds a new AESGCM every time). A state this can't decrypt is handed
    to the library's own cipher, so a change of its framing costs speed, never a false
    report."""

    def __init__(self, cipher: Any) -> None:
        self.cipher = cipher
        key = getattr(cipher, "key", None)
        self.aesgcm = AESGCM(key) if isinstance(cipher, AESCipher) and key else None

    def __call__(self, state: bytes) -> bytes:
        if self.aesgcm is not None:  # nonce (12 bytes), tag (16), then the ciphertext
            try:
                return self.aesgcm.decrypt(state[:12], state[28:] + state[12:28], None)
            except (InvalidTag, ValueError):
                pass
        plain: bytes = self.cipher.decrypt(state)
        return plain


_DECRYPTERS: weakref.WeakKeyDictionary[Any, Decrypter] = weakref.WeakKeyDictionary()


def decrypter(cipher: Any) -> Decrypter:
    """The one decrypter of a cipher."""
    found = _DECRYPTERS.get(cipher)
    if found is None:
        found = _DECRYPTERS[cipher] = Decrypter(cipher)
    return found


def decrypt(mapper: Mapper[UUID], state: bytes, topic: str | None = None) -> bytes:
    """A stored state decrypted (when the store encrypts) and decompressed (when it
    compresses), as the mapper would: an event's sealed topic taken off, and refused
    (``TopicAltered``) when it is not ``topic``, its row's."""
    if mapper.cipher:
        sealed, state = unseal(decrypter(mapper.cipher)(state))
        if topic is not None:
            check_topic(topic, sealed)
    if mapper.compressor:
        state = mapper.compressor.decompress(state)
    return state


def sealed_topic(mapper: Mapper[UUID], state: bytes) -> str | None:
    """The topic sealed in a stored event's state (None when it holds none, written before
    topics were sealed); raises when the state does not decrypt."""
    if not mapper.cipher:
        return None
    return unseal(decrypter(mapper.cipher)(state))[0]


def encrypt(mapper: Mapper[UUID], plain: bytes) -> bytes:
    """Bytes kept beside the store as the store keeps its events' states (compressed when
    it compresses, encrypted when it encrypts): what ``decrypt`` reads back."""
    if mapper.compressor:
        plain = mapper.compressor.compress(plain)
    if mapper.cipher:
        plain = mapper.cipher.encrypt(plain)
    return plain


def events_table(recorder: Any) -> Any:
    return recorder.events_record_cls.__table__


def select_rows(table: Any) -> Any:
    """The query for whole stored rows: (id, originator_id, originator_version, topic,
    state)."""
    return select(table.c.id, table.c.originator_id, table.c.originator_version,
                  table.c.topic, table.c.state)


def load_participants(service: Any, session: Any, participant_ids: set[str]
                      ) -> tuple[list[Participant], set[UUID]]:
    """The newest state of each of these participants, as the repository would load it
    (the latest snapshot this code derived, then the events after it; all the events when
    the latest is another code's, see Snapshots), in one query for all of them; and the
    ids of those that have no event yet. ``session``: the caller's transaction. A stored
    event that can't be read raises UnreadableRecord naming it."""
    named = {participant_uuid(pid): pid for pid in participant_ids}
    wanted = set(named)
    if not wanted:
        return [], set()
    streams: dict[UUID, list[Any]] = {}
    passed_over: dict[UUID, int] = {}  # another code's snapshot: its version
    for row in session.execute(_newest_query(service), {"ids": list(wanted)}):
        key = as_uuid(row.originator_id)
        stored = StoredEvent(key, row.originator_version, row.topic, as_bytes(row.state))
        if row.kind == 0:
            snapshot = service.snapshots.derived_here(stored)
            if snapshot is None:
                passed_over[key] = row.originator_version
                continue
            streams.setdefault(key, []).append(snapshot)
        else:
            streams.setdefault(key, []).append(_event(service, stored, named))
    for key, before in _events_up_to(service, session, passed_over, named).items():
        streams[key] = before + streams.get(key, [])
    loaded = [project(None, stream) for stream in streams.values()]
    return loaded, wanted - set(streams)


def load_apart(service: Any, session: Any, participant_ids: set[str]
               ) -> tuple[list[Participant], set[UUID], dict[str, Exception]]:
    """``load_participants``, with those whose record can't be loaded (an event the store
    can't give, or the rules can't apply) set apart, so that one participant fails only
    what is its own: the others, the ids with no event, and why each apart failed. A
    failure naming its participant (UnreadableRecord) sets that one apart and the rest are
    read together again; one naming none, each is read on its own."""
    wanted, apart = set(participant_ids), {}
    while True:
        try:
            loaded, new = load_participants(service, session, wanted)
            return loaded, new, apart
        except Exception as error:
            if the_databases(error):
                raise
            named = getattr(error, "participant_id", None)
            if named not in wanted:
                break
            apart[named] = error
            wanted.discard(named)
    loaded, new = [], set()
    for participant_id in sorted(wanted):
        try:
            one, none = load_participants(service, session, {participant_id})
        except Exception as error:
            if the_databases(error):
                raise
            apart[participant_id] = error
            continue
        loaded += one
        new |= none
    return loaded, new, apart


def _event(service: Any, stored: StoredEvent, named: dict[UUID, str]) -> Any:
    """A stored event decoded; one that can't be is UnreadableRecord, naming it."""
    try:
        return service.mapper.to_domain_event(stored)
    except Exception as error:
        raise UnreadableRecord(stored.originator_id, stored.originator_version,
                               named.get(stored.originator_id)) from error


def _events_up_to(service: Any, session: Any, versions: dict[UUID, int],
                  named: dict[UUID, str]) -> dict[UUID, list[Any]]:
    """Each participant's events up to its version in ``versions`` (those of a snapshot
    passed over), in one query in the caller's transaction."""
    if not versions:
        return {}
    events = events_table(service.recorder)
    postgres = service.recorder.datastore.engine.dialect.name == "postgresql"
    # Each stream's bound is applied here, not in SQL: an OR of a thousand of them is past
    # what SQLite parses.
    rows = session.execute(
        select(events.c.originator_id, events.c.originator_version, events.c.topic,
               events.c.state)
        .where(any_of(events.c.originator_id, postgres, Uuid()),
               events.c.originator_version <= max(versions.values()))
        .order_by(events.c.originator_version), {"ids": list(versions)})
    found: dict[UUID, list[Any]] = {key: [] for key in versions}
    for r in rows:
        key = as_uuid(r.originator_id)
        if r.originator_version <= versions[key]:
            found[key].append(_event(service, StoredEvent(
                key, r.originator_version, r.topic, as_bytes(r.state)), named))
    return found


_NEWEST: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _newest_query(service: Any) -> Any:
    """``load_participants``' query, built once per service (the ids bound when run): the
    latest snapshot of each stream (kind 0), then its events after it (kind 1)."""
    query = _NEWEST.get(service)
    if query is not None:
        return query
    events = events_table(service.recorder)
    postgres = service.recorder.datastore.engine.dialect.name == "postgresql"

    def among(column: Any) -> Any:
        return any_of(column, postgres, Uuid())

    columns = ("originator_id", "originator_version", "topic", "state")
    after: Any = 0
    parts = []
    if service.snapshots is not None:
        snapshots = events_table(service.snapshots.recorder)
        other = snapshots.alias("other")
        latest = (select(func.max(other.c.originator_version))
                  .where(other.c.originator_id == snapshots.c.originator_id)
                  .scalar_subquery())
        parts.append(select(literal(0).label("kind"), *(snapshots.c[c] for c in columns))
                     .where(among(snapshots.c.originator_id),
                            snapshots.c.originator_version == latest))
        after = func.coalesce(select(func.max(snapshots.c.originator_version))
                              .where(snapshots.c.originator_id == events.c.originator_id)
                              .scalar_subquery(), 0)
    parts.append(select(literal(1).label("kind"), *(events.c[c] for c in columns))
                 .where(among(events.c.originator_id), events.c.originator_version > after))
    both = union_all(*parts).subquery() if len(parts) > 1 else parts[0].subquery()
    query = _NEWEST[service] = select(both).order_by(both.c.kind, both.c.originator_version)
    return query


def as_uuid(value: Any) -> UUID:
    """An originator id as a UUID (SQLite gives its text)."""
    return value if isinstance(value, UUID) else UUID(str(value))


def as_bytes(value: Any) -> bytes:
    """A stored state as bytes. The store writes bytes; SQLite keeps whatever is put in a
    column, so a row edited to hold text or a number is read as its text's UTF-8, which
    fails to decrypt and is reported as edited, never crashed on."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (memoryview, bytearray)):
        return bytes(value)
    return str(value).encode("utf-8", "surrogateescape")  # text, a number, ...


def position_of(recorder: Any, participant_id: str, version: int) -> Any:
    """The query for the log position (notification id) of one event of a participant."""
    t = events_table(recorder)
    return select(t.c.id).where(t.c.originator_id == participant_uuid(participant_id),
                                t.c.originator_version == version)


def positions_of(recorder: Any, events: list[tuple[str, int]]) -> Any:
    """The query for the log positions of several events (participant id, version): rows
    of the position, the participant's UUID and the version."""
    t = events_table(recorder)
    return select(t.c.id, t.c.originator_id, t.c.originator_version).where(
        tuple_(t.c.originator_id, t.c.originator_version).in_(
            [(participant_uuid(pid), version) for pid, version in events]))


StreamRange = tuple[UUID | None, UUID | None]  # originator ids from (inclusive), to


def stream_ranges(parts: int) -> list[StreamRange]:
    """``parts`` contiguous ranges covering every originator id (ids are uniform: UUID 4
    and 5), for checking streams in parallel."""
    bounds: list[UUID | None] = [UUID(int=(i << 128) // parts) for i in range(1, parts)]
    return list(zip([None, *bounds], [*bounds, None], strict=True))


def stored_events(recorder: Any) -> int:
    """The newest notification id (0 when empty): the number of stored events, near
    enough."""
    with recorder.datastore.engine.connect() as connection:
        return int(connection.execute(select(func.max(events_table(recorder).c.id))).scalar()
                   or 0)


KEY_SAMPLE = 3  # the oldest events a key is tried on


def key_opens(service: Any) -> bool:
    """Whether the cipher key opens the store: true for a store that holds no event or
    does not encrypt, else whether it decrypts one of the store's oldest KEY_SAMPLE
    events, written with the key the store has been written with since (events written
    later with another key, however many, don't make that key the store's; one damaged
    row is no other key). A process writing with another key would store events that the
    store's own key never opens, for good."""
    cipher = service.mapper.cipher
    if not cipher:
        return True
    table = events_table(service.recorder)
    with service.recorder.datastore.engine.connect() as connection:
        oldest = connection.execute(select(table.c.state).order_by(table.c.id)
                                    .limit(KEY_SAMPLE)).scalars().all()
    opens = decrypter(cipher)
    for state in oldest:
        try:
            opens(as_bytes(state))
        except Exception:  # noqa: BLE001, S112 - another key's, or a damaged row
            continue
        return True
    return not oldest


def _in_range(query: Any, table: Any, streams: StreamRange) -> Any:
    """The query limited to the streams whose ids fall in the range."""
    low, high = streams
    if low is not None:
        query = query.where(table.c.originator_id >= low)
    if high is not None:
        query = query.where(table.c.originator_id < high)
    return query


def stream_rows(recorder: Any, batch: int = 2000, topic_prefix: str | None = None,
                originator_id: UUID | None = None,
                streams: StreamRange = (None, None),
                lte: int | None = None) -> Iterator[Any]:
    """Stored rows (id, originator_id, originator_version, topic, state), stream by stream
    in version order (up to version ``lte`` of each), fetched ``batch`` at a time so
    memory stays constant."""
    table = events_table(recorder)
    query = select_rows(table)
    if topic_prefix is not None:
        query = query.where(table.c.topic.startswith(topic_prefix))
    if lte is not None:
        query = query.where(table.c.originator_version <= lte)
    if originator_id is not None:
        query = query.where(table.c.originator_id == originator_id)
    query = _in_range(query, table, streams).order_by(table.c.originator_id,
                                                      table.c.originator_version)
    with recorder.datastore.engine.connect() as connection:
        yield from connection.execution_options(yield_per=batch).execute(query)


LinkRow = tuple[int, Any, int, str, bytes]


def link_rows(recorder: Any, batch: int = 5000,
              streams: StreamRange = (None, None)) -> Iterator[LinkRow]:
    """(notification id, stream key, version, topic, state) of every stored event, stream
    by stream in version order: the least a chain check needs. On PostgreSQL a binary
    server-side cursor, the key being the id's 16 bytes (decoding a UUID for every row
    costs more than the rest of the read); elsewhere through SQLAlchemy."""
    engine = recorder.datastore.engine
    if engine.dialect.name != "postgresql":
        for row in stream_rows(recorder, batch, streams=streams):
            yield (row.id, row.originator_id, row.originator_version, row.topic,
                   as_bytes(row.state))
        return
    table = events_table(recorder)
    query = select(table.c.id, func.uuid_send(table.c.originator_id),
                   table.c.originator_version, table.c.topic, table.c.state)
    query = _in_range(query, table, streams).order_by(table.c.originator_id,
                                                      table.c.originator_version)
    with _binary_cursor(engine, query, name="trialog_link_rows") as cursor:
        while rows := cursor.fetchmany(batch):
            yield from rows


@contextmanager
def _binary_cursor(engine: Any, query: Any, name: str = "") -> Iterator[Any]:
    """A psycopg cursor in binary mode that has executed ``query`` (server-side when
    named), on a connection of the engine's pool, given back (rolled back) afterwards."""
    compiled = query.compile(dialect=engine.dialect)
    raw = engine.raw_connection()
    try:
        with raw.driver_connection.cursor(name=name, binary=True) as cursor:
            cursor.execute(str(compiled), compiled.params)
            yield cursor
    finally:
        raw.close()


def stream_key_id(key: Any) -> UUID:
    """The originator id of a ``link_rows`` stream key."""
    if isinstance(key, UUID):
        return key
    if isinstance(key, bytes):
        return UUID(bytes=key)
    return UUID(str(key))


def load_event(service: Any, originator_id: UUID, version: int) -> Any | None:
    """One stored event, decoded; None when there is no such row."""
    table = events_table(service.recorder)
    query = select(table.c.originator_id, table.c.originator_version, table.c.topic,
                   table.c.state).where(table.c.originator_id == originator_id,
                                        table.c.originator_version == version)
    with service.recorder.datastore.engine.connect() as connection:
        row = connection.execute(query).first()
    return None if row is None else decode(service.mapper, *row)


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


def plain_values(value: Any) -> Any:
    """Parsed stored JSON made plain JSON values in place: what ``plain_text`` does as a
    hook, without a call per object or a copy."""
    if type(value) is dict:
        if len(value) == 2 and "_type_" in value:
            return plain_text(value)
        for key, item in value.items():
            if type(item) is dict or type(item) is list:
                value[key] = plain_values(item)
    elif type(value) is list:
        for i, item in enumerate(value):
            if type(item) is dict or type(item) is list:
                value[i] = plain_values(item)
    return value


# A transcoded value whose data is a plain string (dates, times): in the transcoder's compact
# text it can be replaced by that string before parsing. Inside a JSON string a quote is
# escaped, so the pattern can't match text a participant typed.
_FLAT_TRANSCODED = re.compile(rb'\{"_type_":"[a-z_]+","_data_":("[^"\\]*")\}')


def plain_state(mapper: Mapper[UUID], state: bytes, topic: str | None = None
                ) -> dict[str, Any]:
    """A stored state as plain JSON values, without building the domain event (its sealed
    topic checked against ``topic`` when given)."""
    return plain_content(decrypt(mapper, state, topic))


def plain_content(text: bytes) -> dict[str, Any]:
    """A decrypted (and decompressed) state's JSON as plain JSON values."""
    content: dict[str, Any]
    try:
        # split() keeps each match's group between the pieces: joined, the replacement,
        # without a template expanded in Python for every match as sub() would.
        flat = None if b'"uuid_hex"' in text else b"".join(_FLAT_TRANSCODED.split(text))
        if flat is not None and b'"_type_"' not in flat:
            content = orjson.loads(flat)  # every transcoded value was a string: no walk
        else:
            content = plain_values(orjson.loads(text))
    except orjson.JSONDecodeError:  # what orjson refuses (an integer past 64 bits)
        content = PLAIN_JSON.decode(text.decode())
    if "class_version" in content:
        raise Upcast
    return content


def plain_stream(service: Any, originator_id: UUID, lte: int | None = None,
                 gt: int | None = None) -> list[tuple[int, str, dict[str, Any]]]:
    """One stream's events after version ``gt`` up to version ``lte`` as (version, topic,
    plain JSON state), oldest first, read in one query."""
    table = events_table(service.recorder)
    query = select(table.c.originator_version, table.c.topic,
                   table.c.state).where(table.c.originator_id == originator_id)
    if lte is not None:
        query = query.where(table.c.originator_version <= lte)
    if gt is not None:
        query = query.where(table.c.originator_version > gt)
    rows = _read_rows(service.recorder.datastore.engine,
                      query.order_by(table.c.originator_version))
    events = []
    for version, topic, state in rows:
        state = as_bytes(state)
        try:
            try:
                content = plain_state(service.mapper, state, topic)
            except Upcast:
                event = decode(service.mapper, originator_id, version, topic, state)
                content = json.loads(canonical_json({k: v for k, v in vars(event).items()
                                                     if k not in ("originator_id",
                                                                  "originator_version")}))
        except Exception as error:
            raise UnreadableRecord(originator_id, version) from error
        events.append((version, topic, content))
    return events


def replayed(service: Any, participant_id: str, version: int | None = None) -> Participant:
    """The participant as the store replays it (up to ``version``); when that fails on a
    stored event that can't be read (a damaged or altered row), UnreadableRecord naming
    it, found by reading the stream's rows one by one; any other failure as it was."""
    try:
        participant: Participant = service.get_participant(participant_id, version=version)
    except Exception as error:
        if isinstance(error, ParticipantNotFound) or is_unavailable(error):
            raise
        plain_stream(service, participant_uuid(participant_id), lte=version)
        raise
    return participant


def _read_rows(engine: Any, query: Any) -> list[Any]:
    """The rows of ``query``; on PostgreSQL through a binary cursor (the states arrive as
    their bytes, not as hex text to decode: a third of the time of a long stream's read)."""
    if engine.dialect.name != "postgresql":
        with engine.connect() as connection:
            return list(connection.execute(query).all())
    with _binary_cursor(engine, query) as cursor:
        rows: list[Any] = cursor.fetchall()
    return rows


class UnreadableRecord(ValueError):
    """A stream's stored event can't be read (a damaged or altered row, which `trialog
    audit verify` names): its reader answers so, not as a fault of its own."""

    def __init__(self, originator_id: UUID, version: int,
                 participant_id: str | None = None) -> None:
        super().__init__(f"event {version} of stream {originator_id} can't be read from "
                         "the store")
        self.originator_id, self.version = originator_id, version
        self.participant_id = participant_id  # when the reader knew it

    def of(self, participant_id: str) -> str:
        """What a reader of ``participant_id`` is told."""
        return (f"event {self.version} of {participant_id}'s record can't be read from the "
                "store (a damaged or altered row: trialog audit verify names it)")


@dataclass(frozen=True)
class UnreadableEvent:
    """In place of an event the store holds but can't give (a damaged or altered row,
    which `trialog audit verify` names)."""

    originator_id: UUID
    originator_version: int


def participant_events(service: Any, batch: int = 2000) -> Iterator[Any]:
    """Every participant event, decoded, participant by participant in version order; an
    UnreadableEvent in place of one that can't be decoded (one damaged row stops no reader
    of the others)."""
    mapper = service.mapper
    for row in stream_rows(service.recorder, batch, topic_prefix=PARTICIPANT_TOPIC):
        try:
            yield decode(mapper, row.originator_id, row.originator_version, row.topic,
                         row.state)
        except Exception:  # noqa: BLE001 - whatever a damaged row raises
            log.warning("event %s of stream %s can't be read from the store",
                        row.originator_version, row.originator_id)
            yield UnreadableEvent(as_uuid(row.originator_id), row.originator_version)
