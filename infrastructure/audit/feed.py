"""The event feed: the notification log after a position, as CloudEvents 1.0 for one
reader, with each event's digest and its predecessor's (keyed: see Trialog.veil_digest) so
that the reader can check the chain it received.

The log's positions only grow, and on PostgreSQL the event store inserts under a table
lock, so a position becomes visible only after every smaller one: a reader that resumes
with ``after=`` the last position it stored never misses or repeats an event. Each page
says the position to resume from (``next``), also when the reader may see none of the
events it covered.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import orjson
from eventsourcing.utils import get_topic
from sqlalchemy import bindparam, func, null, select
from sqlalchemy.engine import Connection

from domain.access import Scope
from domain.chain import canonical_json
from domain.participant import event_uuid, participant_uuid
from domain.randomization import AllocationSequence
from domain.revocations import AccessRegister
from infrastructure.audit.history import event_entry, quotes_address, redact_contact
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.macs import SEAL, KeyedMacs, same_seal
from infrastructure.store.stored import (
    PARTICIPANT_TOPIC,
    Upcast,
    as_bytes,
    as_uuid,
    decode,
    decrypt,
    encrypt,
    events_table,
    plain_state,
    plain_stream,
    position_of,
    select_rows,
)
from infrastructure.store.tables import feed_events

TYPE_PREFIX = "org.trialog."
SEQUENCE_TOPIC = get_topic(AllocationSequence) + "."
REGISTER_TOPIC = get_topic(AccessRegister) + "."
MAX_LIMIT = 1000
UNKNOWN_SITE = "?"  # no site's: seen only by readers of every site
FEED_FOLLOWER = "feed"  # the follower of the log that writes rm_feed
UNREADABLE = "EventUnreadable"  # the type given in place of an event the store can't give
log = logging.getLogger("trialog.feed")


class FeedSeals:
    """Keyed BLAKE2b MACs (under a key derived from the cipher key) binding each rm_feed
    row's rendered texts to its position and stream: the body with the site and type that
    decide who sees it, the encrypted CloudEvent with contact details, and the history
    entry. rm_feed is a copy of the store kept beside it, readable and writable by anyone
    with access to the database but not the key: a row edited, moved or swapped with
    another (a value changed under its genuine digest, one participant's contact details
    shown under another's) fails its seal, and is read from the store instead."""

    def __init__(self, key: bytes) -> None:
        self._macs = KeyedMacs(key, b"trialog:feed:", (b"b", b"c", b"e"))

    def _mac(self, part: bytes, position: int, subject: str, value: str | bytes | None,
             site: str | None = None, event_type: str = "", contact: bool = False) -> bytes:
        # Positions are digits and the names hold no NUL: the fields can't run together. A
        # row's stream of no site ("-") is not one of a site ("=CASE"), and a row with a
        # copy with contact details ("c") not one without: removing the copy breaks the
        # seals of the row's body and entry.
        head = (f"{position}\0{subject}\0{'-' if site is None else '=' + site}\0"
                f"{event_type}\0{'c' if contact else '-'}\0")
        if value is None:  # not rendered: differs from any text
            return self._macs.mac(part, head.encode())
        if isinstance(value, str):
            return self._macs.mac(part, f"{head}\1{value}".encode())
        return self._macs.mac(part, f"{head}\1".encode() + value)

    def seal(self, row: dict[str, Any]) -> bytes:
        """The three seals of a row as the feed's follower writes it."""
        position, subject = row["position"], row["subject"]
        held = row["contact"] is not None
        return (self._mac(b"b", position, subject, row["body"], row["site"], row["type"], held)
                + self._mac(b"c", position, subject, row["contact"])
                + self._mac(b"e", position, subject, row["entry"], contact=held))

    def body_holds(self, seals: bytes | None, position: int, subject: str,
                   site: str | None, event_type: str, body: str | None,
                   contact: bool) -> bool:
        """The body's seal, over the site and type too, and whether the row holds a copy
        with contact details."""
        return same_seal(seals and seals[:SEAL],
                         self._mac(b"b", position, subject, body, site, event_type, contact))

    def contact_holds(self, seals: bytes | None, position: int, subject: str,
                      value: bytes) -> bool:
        return same_seal(seals and seals[SEAL:2 * SEAL],
                         self._mac(b"c", position, subject, value))

    def entry_holds(self, seals: bytes | None, position: int, subject: str, value: str,
                    contact: bool) -> bool:
        return same_seal(seals and seals[2 * SEAL:],
                         self._mac(b"e", position, subject, value, contact=contact))


@dataclass(frozen=True)
class Stream:
    """Who a stream is about: its subject (the participant id, or the trial's), and its
    site (None: every reader may see it)."""

    subject: str
    site: str | None


@dataclass(frozen=True)
class Reader:
    """What a reader may see: sites, contact details, event types (None: all)."""

    scope: Scope
    contact: bool = False
    types: frozenset[str] | None = None

    def admits(self, stream: Stream) -> bool:
        return stream.site is None or self.scope.admits(stream.site)

    def sees(self, stream: Stream, event_type: str) -> bool:
        return self.sees_at(stream.site, event_type)

    def sees_at(self, site: str | None, event_type: str) -> bool:
        """Whether the reader sees an event of this type in a stream of this site."""
        return ((site is None or self.scope.admits(site))
                and (self.types is None or event_type in self.types))


class Feed:
    def __init__(self, trialog: Trialog, max_streams: int = 200_000) -> None:
        self.trialog = trialog
        self.source = f"/trials/{trialog.protocol.study_id}"
        self.max_streams = max_streams
        self._streams: OrderedDict[UUID, Stream] = OrderedDict()
        self._lock = threading.Lock()
        self.seals = FeedSeals(trialog.feed_seal_key)
        f, table = feed_events.c, events_table(trialog.service.recorder)
        # A stream's first event in the store; in the history's statement, its first after
        # the n entries rm_feed holds for it (versions 1..n when its follower rendered them
        # in order), read in the same statement as those entries.
        self._after_rendered = (
            select(table.c.id).where(table.c.originator_id == bindparam("stream"))
            .order_by(table.c.originator_version).limit(1))
        rendered = select(func.count()).where(f.subject == bindparam("subject"))
        newer = self._after_rendered.where(
            table.c.originator_version > rendered.scalar_subquery())
        self._history = {
            contact: select(f.position, f.entry,
                            f.contact if contact else null().label("contact"),
                            newer.scalar_subquery().label("newer"), f.seals,
                            f.contact.is_not(None).label("held"))
            .where(f.subject == bindparam("subject")).order_by(f.position)
            for contact in (True, False)}

    def page(self, after: int, limit: int, reader: Reader,
             disclosed: set[str] | None = None) -> tuple[list[dict[str, Any]], int]:
        """The events after position ``after`` the reader may see, among the next
        ``limit`` positions of the log, and the position to resume from. ``disclosed``
        collects the participants whose contact details the page shows."""
        events, next_position = self.page_json(after, limit, reader, disclosed)
        return [orjson.loads(event) for event in events], next_position

    def page_json(self, after: int, limit: int, reader: Reader,
                  disclosed: set[str] | None = None,
                  connection: Connection | None = None) -> tuple[list[bytes], int]:
        """As ``page``, each event as its JSON: from rm_feed as far as the feed's follower
        has rendered, then from the store. Read on ``connection`` when given."""
        t = self.trialog
        mapper = t.service.mapper
        opened = t.engine.connect() if connection is None else nullcontext(connection)
        with opened as db:
            # rm_feed always holds a prefix of the log (its follower writes positions in
            # order, each batch with its rows): the rows after ``after`` are every position
            # up to the last of them, and the log after that is read from the store.
            f = feed_events.c
            contact_column = f.contact if reader.contact else null().label("contact")
            pre = db.execute(
                select(f.position, f.subject, f.site, f.type, f.body, contact_column, f.seals,
                       f.contact.is_not(None).label("held"))
                .where(f.position > after).order_by(f.position).limit(limit)).all()
            table = events_table(t.service.recorder)
            # How many of the log's positions pre's rows stand for. Where they are every
            # position after ``after`` (most pages), the log can hold no other: no query.
            # (The last of them must be one: rows sealed under this key in another copy
            # of the database, beyond this log's head, would have a reader skip on.)
            if not pre:
                logged = 0
            elif pre[-1].position - after == len(pre) and db.execute(
                    select(table.c.id).where(table.c.id == pre[-1].position)).first():
                logged = len(pre)
            else:
                logged = db.execute(select(func.count()).select_from(table).where(
                    table.c.id > after, table.c.id <= pre[-1].position)).scalar()
            slots: list[bytes | int] = []
            wanted: list[int] = []  # not rendered ahead: read from the store
            unsealed: set[int] = set()  # a row whose seal fails: its visibility unknown
            everything = reader.scope.every_site and reader.types is None
            seals = self.seals
            shown: set[str] = set()  # whose contact details the rows read give
            proven = after  # the newest position of pre's rows known to be in the log
            for position, subject, site, event_type, body, contact, sealed, held in pre:
                if not seals.body_holds(sealed, position, subject, site, event_type, body,
                                        bool(held)):
                    log.warning("feed: rm_feed's row %s fails its seal; read from the store",
                                position)
                    unsealed.add(position)
                    slots.append(position)
                    wanted.append(position)
                    continue
                logged -= 1  # a sealed row: a position of the log
                proven = position
                if not (everything or reader.sees_at(site, event_type)):
                    continue
                if body is None:
                    slots.append(position)
                    wanted.append(position)
                elif contact is not None:  # only a reader allowed contact details gets it
                    if not seals.contact_holds(sealed, position, subject, contact):
                        log.warning("feed: rm_feed's row %s fails its seal; read from the "
                                    "store", position)
                        slots.append(position)
                        wanted.append(position)
                        continue
                    slots.append(decrypt(mapper, contact))
                    shown.add(subject)
                else:
                    slots.append(body.encode())
            rows = []
            if wanted:
                rows = db.execute(
                    select_rows(table).where(table.c.id.in_(wanted))
                    .order_by(table.c.id)).all()
            if logged != sum(1 for row in rows if row.id in unsealed):
                # rm_feed lacks some of the log's positions there (restored? or deleted):
                # the page from the store.
                log.warning("feed: rm_feed does not hold the log's positions %s..%s; they "
                            "are read from the store", after + 1, pre[-1].position)
                pre, slots, wanted, unsealed, rows, shown = [], [], [], set(), [], set()
                proven = after
            if disclosed is not None:
                disclosed |= shown
            # Resumed from a position of the log only (a row made up beyond its head would
            # have a reader skip every event up to it).
            covered = max([proven, *(row.id for row in rows)])
            limit -= sum(1 for row in pre if row.position <= covered)
            tail = []
            if limit > 0:
                tail = db.execute(
                    select_rows(table)
                    .where(table.c.id > covered).order_by(table.c.id).limit(limit)).all()
            streams = self._learn(db, table, [*rows, *tail])
        live = {}
        for row in rows:
            stream = streams[as_uuid(row.originator_id)]
            if row.id not in unsealed or reader.sees(stream, row.topic.rsplit(".", 1)[-1]):
                live[row.id] = orjson.dumps(self.cloud_event(row, stream, reader, disclosed))
        events = ([slot for slot in slots if not isinstance(slot, int)] if not wanted else
                  [live[slot] if isinstance(slot, int) else slot for slot in slots
                   if not isinstance(slot, int) or slot in live])
        for row in tail:
            stream = streams[as_uuid(row.originator_id)]
            if reader.sees(stream, row.topic.rsplit(".", 1)[-1]):
                events.append(orjson.dumps(self.cloud_event(row, stream, reader, disclosed)))
        return events, (tail[-1].id if tail else covered)

    def render(self, connection: Any, rows: list[Any],
               failed: dict[UUID, tuple[Any, str, BaseException]] | None = None
               ) -> list[dict[str, Any]]:
        """rm_feed's rows for events of the store (the feed's follower writes them): each
        CloudEvent without contact details, and with them (encrypted) when they differ; no
        body when it can't be rendered now (read from the store when asked). ``failed``
        collects, by stream, the last row that could not be rendered, its subject and the
        error."""
        streams = self._learn(connection, events_table(self.trialog.service.recorder), rows)
        mapper = self.trialog.service.mapper
        rendered = []
        for row in rows:
            stream = streams[as_uuid(row.originator_id)]
            body, contact, entry = None, None, None
            try:
                content, redacted, full = self._entries(row)
                event = self._wrapped(row, stream, content, redacted)
                if full is not None:  # both renderings, or neither (then from the store)
                    contact = encrypt(mapper, orjson.dumps(
                        self._wrapped(row, stream, content, full)))
                body = orjson.dumps(event).decode()
                entry = orjson.dumps(history_entry(event)).decode()
            except Exception as error:
                log.warning("feed: position %s is not rendered ahead; it is read from the "
                            "store when asked", row.id, exc_info=True)
                if failed is not None:
                    failed[as_uuid(row.originator_id)] = (row, stream.subject, error)
            rendered.append({"position": row.id, "subject": stream.subject,
                             "site": stream.site, "type": row.topic.rsplit(".", 1)[-1],
                             "body": body, "contact": contact, "entry": entry})
            rendered[-1]["seals"] = self.seals.seal(rendered[-1])
        return rendered

    def history_json(self, participant_id: str, contact: bool, positioned: bool = True
                     ) -> tuple[list[bytes], int | None] | None:
        """The participant's history as its entries' JSON, oldest first, and the position
        of its newest event shown: rm_feed's entries as far as the feed's follower has
        rendered, then the newer events from the store. None when rm_feed can't give them
        (an event it could not render, or a prefix it lacks, as after a restore): read the
        store. One connection at a time (the store's events are read after rm_feed's).
        Unless ``positioned``, no position is looked up (None: one query less when the
        store has newer events)."""
        t = self.trialog
        if participant_id == t.protocol.study_id:
            return None  # rm_feed's rows of the trial's own stream have this subject too
        stream = participant_uuid(participant_id)
        # rm_feed's entries and the stream's first event after them: one statement.
        with t.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            pre = connection.execute(self._history[contact],
                                     {"subject": participant_id, "stream": stream}
                                     ).tuples().all()
            newer = pre[0][3] if pre else connection.execute(
                self._after_rendered, {"stream": stream}).scalar()
        position = pre[-1][0] if pre else 0
        if newer is not None and newer <= position:
            return None  # rm_feed lacks some of this stream's events: not versions 1..n
        mapper = t.service.mapper
        entries = []
        seals = self.seals
        for at, entry, sealed, _, seal, held in pre:  # (contact: sealed; newer: _)
            if entry is None:
                return None  # an event its follower could not render
            if not (seals.entry_holds(seal, at, participant_id, entry, bool(held)) and (
                    sealed is None
                    or seals.contact_holds(seal, at, participant_id, sealed))):
                log.warning("feed: rm_feed's row %s fails its seal; %s's history is read "
                            "from the store", at, participant_id)
                return None
            entries.append(entry.encode() if sealed is None else orjson.dumps(
                history_entry(orjson.loads(decrypt(mapper, sealed)))))
        if newer is not None:
            shown = len(pre)
            for version, topic, content in plain_stream(t.service, stream, gt=len(pre)):
                entry = event_entry(stream, version, topic, content, t.veil_digest)
                entries.append(orjson.dumps(entry if contact else redact_contact(entry)))
                shown = version
            if positioned:
                with t.engine.connect() as connection:
                    position = connection.execute(position_of(
                        t.service.recorder, participant_id, shown)).scalar() or position
        return entries, (position if positioned else None)

    def history_entries(self, participant_id: str) -> list[bytes] | None:
        """The participant's whole history with contact details, as its entries' JSON (see
        history_json); None when it must be decoded from the store."""
        found = self.history_json(participant_id, contact=True, positioned=False)
        return found[0] if found else None

    def cloud_event(self, row: Any, stream: Stream, reader: Reader,
                    disclosed: set[str] | None = None) -> dict[str, Any]:
        try:
            event, has_contact = self._cloud_event(row, stream, reader.contact)
        except Exception:
            log.warning("feed: position %s can't be read from the store; given as %s",
                        row.id, UNREADABLE, exc_info=True)
            return self.unreadable(row, stream)
        if has_contact and reader.contact and disclosed is not None:
            disclosed.add(stream.subject)
        return event

    def readable(self, row: Any) -> bool:
        """Whether the store gives the event of ``row`` now."""
        try:
            self._entries(row)
        except Exception:  # noqa: BLE001 - whatever a damaged row raises
            return False
        return True

    def unreadable(self, row: Any, stream: Stream) -> dict[str, Any]:
        """An event the store holds but can't give (a damaged or altered row; `trialog
        audit verify` names it): a CloudEvent that says so in its place, so that a page,
        and every reader and webhook after it, goes on past it. It carries no data of the
        event, no time and no digests; the feed's follower sets its participant aside."""
        return {
            "specversion": "1.0", "id": str(row.id), "source": self.source,
            "type": TYPE_PREFIX + UNREADABLE, "subject": stream.subject,
            "datacontenttype": "application/json",
            "data": {"event_id": event_uuid(as_uuid(row.originator_id),
                                            row.originator_version),
                     "version": row.originator_version,
                     "message": "the stored event can't be read; trialog audit verify "
                                "names the fault"},
            "position": row.id,
        }

    def _cloud_event(self, row: Any, stream: Stream,
                     contact: bool) -> tuple[dict[str, Any], bool]:
        """The event as a CloudEvent, with its contact details or without, and whether it
        holds any."""
        content, redacted, full = self._entries(row)
        shown = full if contact and full is not None else redacted
        return self._wrapped(row, stream, content, shown), full is not None

    def _entries(self, row: Any) -> tuple[dict[str, Any], dict[str, Any],
                                          dict[str, Any] | None]:
        """The stored event decoded once: its content, its history entry without contact
        details, and with them when it holds any (else None)."""
        content = self._content(row)
        entry = event_entry(as_uuid(row.originator_id), row.originator_version, row.topic,
                            content, self.trialog.veil_digest)
        if CONTACT_MARKERS & content.keys() or quotes_address(content):
            redacted = redact_contact(entry)
            if redacted != entry:
                return content, redacted, entry
        return content, entry, None

    def _wrapped(self, row: Any, stream: Stream, content: dict[str, Any],
                 entry: dict[str, Any]) -> dict[str, Any]:
        entry = dict(entry)
        digest = entry.pop("digest")
        return {
            "specversion": "1.0", "id": str(row.id), "source": self.source,
            "type": TYPE_PREFIX + entry["type"], "subject": stream.subject,
            "time": entry["recorded_at"], "datacontenttype": "application/json",
            "data": entry, "position": row.id, "digest": digest,
            "previousdigest": self.trialog.veil_digest(content.get("previous_digest", "")),
        }

    def checkpoint(self, reader: Reader) -> dict[str, Any]:
        """The newest position of the log, how many events up to it the reader may see,
        and the digest of the newest of those."""
        t = self.trialog
        table = events_table(t.service.recorder)
        with t.engine.connect() as connection:
            newest = int(connection.execute(select(func.max(table.c.id))).scalar() or 0)
            counts = connection.execute(
                select(table.c.originator_id, func.count())
                .where(table.c.id <= newest).group_by(table.c.originator_id)).all()
            firsts = connection.execute(
                select_rows(table)
                .where(table.c.originator_version == 1, table.c.id <= newest)).all()
            streams = self._learn(connection, table, firsts)
            visible = {as_uuid(o) for o, _ in counts
                       if as_uuid(o) in streams and reader.admits(streams[as_uuid(o)])}
            count = sum(n for o, n in counts if as_uuid(o) in visible)
            digest = None
            position = newest
            while count and digest is None and position > 0:
                rows = connection.execute(
                    select_rows(table)
                    .where(table.c.id <= position).order_by(table.c.id.desc())
                    .limit(500)).all()
                for row in rows:
                    stream = streams.get(as_uuid(row.originator_id))
                    if stream is not None and reader.sees(stream,
                                                          row.topic.rsplit(".", 1)[-1]):
                        try:
                            content = self._content(row)
                        except Exception:  # noqa: BLE001 - given as EventUnreadable
                            log.warning("feed: position %s can't be read from the store; "
                                        "the checkpoint has no digest", row.id)
                            return {"position": newest, "events": count, "digest": None}
                        digest = self.trialog.veil_digest(content["digest"])
                        break
                position = rows[-1].id - 1 if rows else 0
        return {"position": newest, "events": count, "digest": digest}

    # --- which stream is whose ------------------------------------------------------------

    def _learn(self, connection: Any, table: Any, rows: list[Any]) -> dict[UUID, Stream]:
        """The streams of ``rows``, classified from their first events (a stream's site
        never changes): those known already, and the others read now. The answer holds
        every stream of the rows, whatever the bounded memory of them forgets meanwhile."""
        wanted = {as_uuid(r.originator_id) for r in rows}
        with self._lock:
            known = {o: self._streams[o] for o in wanted if o in self._streams}
        firsts = {as_uuid(r.originator_id): r for r in rows
                  if r.originator_version == 1 and as_uuid(r.originator_id) not in known}
        unknown = wanted - set(known) - set(firsts)
        if unknown:
            more = connection.execute(
                select_rows(table)
                .where(table.c.originator_id.in_(sorted(unknown)),
                       table.c.originator_version == 1)).all()
            firsts.update({as_uuid(r.originator_id): r for r in more})
        classified = {o: self._classify(r) for o, r in firsts.items()}
        # One whose first event can't be read is not kept: classified again next time, so
        # that once its row is repaired its site's readers see it.
        learned = {o: stream for o, stream in classified.items() if stream is not None}
        with self._lock:
            self._streams.update(learned)
            for originator_id in known:
                self._streams.move_to_end(originator_id)
            while len(self._streams) > self.max_streams:
                self._streams.popitem(last=False)
        # A stream whose first event is gone or unreadable (audit verify reports it): only
        # readers of every site may see it.
        lost = {o: Stream(str(o), UNKNOWN_SITE) for o in wanted - set(known) - set(learned)}
        return {**known, **learned, **lost}

    def _classify(self, first: Any) -> Stream | None:
        """Who a stream is about, from its first event; None when that can't be read."""
        try:
            content = self._content(first)
        except Exception:  # noqa: BLE001 - an unreadable first event: see _learn
            return None
        if first.topic.startswith(PARTICIPANT_TOPIC):
            return Stream(content["participant_id"], content["data"]["site_id"])
        if first.topic.startswith(SEQUENCE_TOPIC):
            return Stream(f"allocation/{content['stratum']}", content["stratum"])
        if first.topic.startswith(REGISTER_TOPIC):  # who may call: readers of every site
            # A subject of its own: the trial's stream (the database lock) is the study's,
            # and a consumer checks each subject's chain of digests and versions.
            return Stream(f"access/{self.trialog.protocol.study_id}", UNKNOWN_SITE)
        return Stream(self.trialog.protocol.study_id, None)

    def _content(self, row: Any) -> dict[str, Any]:
        state = as_bytes(row.state)
        mapper = self.trialog.service.mapper
        try:
            return plain_state(mapper, state, row.topic)
        except Upcast:
            event = decode(mapper, row.originator_id, row.originator_version, row.topic, state)
            content: dict[str, Any] = json.loads(canonical_json(
                {k: v for k, v in vars(event).items()
                 if k not in ("originator_id", "originator_version")}))
            return content


# The keys of the events whose data may hold contact details (screening data, corrections,
# reminder recipients): only these are looked at for redaction.
CONTACT_MARKERS = frozenset({"data", "field", "recipients"})


def history_entry(cloud_event: dict[str, Any]) -> dict[str, Any]:
    """The event as the participant's history shows it: the CloudEvent's data, with its
    digest last."""
    return {**cloud_event["data"], "digest": cloud_event["digest"]}

