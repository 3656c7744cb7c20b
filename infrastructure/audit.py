"""Audit: the timeline of one participant at any moment, and the verification of every
stored event's hash chain (edited, deleted, reordered or inserted rows are reported, never
crashed on)."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

import sqlalchemy.exc
from sqlalchemy import select

from domain.chain import GENESIS, canonical_json, compute_digest
from domain.participant import CONTACT_FIELDS, Participant, event_uuid, participant_uuid
from domain.service import TrialService
from infrastructure.settings import Settings
from infrastructure.stored import (
    StreamRange,
    Upcast,
    decode,
    plain_state,
    plain_stream,
    stored_events,
    stream_ranges,
    stream_rows,
)

if TYPE_CHECKING:
    from infrastructure.bootstrap import Trialog

AUDIT_FIELDS = ("originator_id", "originator_version", "timestamp", "originator_topic",
                "command_id", "actor", "reason", "previous_digest", "digest")


def event_entry(originator_id: UUID, version: int, topic: str,
                content: dict[str, Any]) -> dict[str, Any]:
    """One event as the history shows it, as JSON values: audit fields, then the event's
    own data."""
    return {
        "event_id": event_uuid(originator_id, version),
        "type": topic.rsplit(".", 1)[-1],
        "version": version,
        "recorded_at": content["timestamp"],
        "actor": content["actor"],
        "command_id": content["command_id"],
        "reason": content["reason"],
        "data": {k: v for k, v in content.items() if k not in AUDIT_FIELDS},
        "digest": content["digest"],
    }


REDACTED = "[redacted]"


def redact_contact(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry without contact details (screening data, and corrections of them)."""
    data = entry["data"]
    if isinstance(data.get("data"), dict) and CONTACT_FIELDS & data["data"].keys():
        captured = {k: REDACTED if k in CONTACT_FIELDS and v is not None else v
                    for k, v in data["data"].items()}
        data = {**data, "data": captured}
    if data.get("field") in CONTACT_FIELDS:
        data = {**data, "previous_value": REDACTED, "value": REDACTED}
    return {**entry, "data": data}


def history(service: TrialService, participant_id: str, as_of: datetime | None = None,
            version: int | None = None,
            cache: HistoryCache | None = None) -> list[dict[str, Any]]:
    """The participant's events, oldest first, up to the recording time ``as_of`` or up to
    and including ``version``."""
    if cache is not None:
        entries = cache.entries(participant_id)
        if version is not None:
            entries = entries[:version]
    else:
        stream = participant_uuid(participant_id)
        entries = [event_entry(stream, v, topic, content)
                   for v, topic, content in plain_stream(service, stream, lte=version)]
    if as_of is None:
        return entries
    return [e for e in entries if datetime.fromisoformat(e["recorded_at"]) <= as_of]


class HistoryCache:
    """Participants' decoded histories, kept because recorded events never change: a read
    decodes only the events recorded since the last read of that participant. Bounded by
    the number of events held; the least recently read participant goes first."""

    def __init__(self, service: TrialService, max_events: int = 25_000) -> None:
        self.service = service
        self.max_events = max_events
        self._lock = threading.Lock()
        self._streams: OrderedDict[UUID, list[dict[str, Any]]] = OrderedDict()
        self._held = 0

    def entries(self, participant_id: str) -> list[dict[str, Any]]:
        """Every event of the participant; the list is shared: don't change it."""
        stream = participant_uuid(participant_id)
        with self._lock:
            cached = self._streams.get(stream, [])
            if cached:
                self._streams.move_to_end(stream)
        # Versions run 1, 2, 3...: the cached list holds versions 1 to len(cached).
        new = plain_stream(self.service, stream, gt=len(cached))
        if not new:
            return cached
        entries = cached + [event_entry(stream, v, topic, content) for v, topic, content in new]
        with self._lock:
            held = self._streams.get(stream, [])
            if len(entries) > len(held):
                self._streams[stream] = entries
                self._held += len(entries) - len(held)
                while self._held > self.max_events and len(self._streams) > 1:
                    _, evicted = self._streams.popitem(last=False)
                    self._held -= len(evicted)
        return entries


def participant_as_of(service: TrialService, participant_id: str,
                      as_of: datetime) -> Participant | None:
    """The participant as recorded at ``as_of``; None before its first event."""
    entries = history(service, participant_id, as_of)
    if not entries:
        return None
    return service.get_participant(participant_id, version=entries[-1]["version"])


@dataclass
class Problem:
    kind: str  # edited | deleted | reordered | inserted | unreadable
    stream: str
    version: int
    notification_id: int | None
    detail: str
    participant_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class VerifyReport:
    events_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    seconds: float | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        answer: dict[str, Any] = {"ok": self.ok, "events_checked": self.events_checked,
                                  "problems": [p.as_dict() for p in self.problems]}
        if self.seconds is not None:
            answer["seconds"] = round(self.seconds, 3)
            answer["events_per_second"] = round(self.events_checked / self.seconds
                                                if self.seconds else 0.0)
        return answer


@dataclass
class Link:
    """What the chain check needs of one stored event."""

    previous_digest: str
    digest: str
    intact: bool  # the digest matches the content
    participant_id: str | None


class _FastReader:
    """Checks stored events without building domain events: decrypt, decode to plain JSON
    values, recompute the digest over the canonical text. Equal, by construction, to
    ``compute_digest`` of the decoded event (a unit test pins the digest)."""

    def __init__(self, service: TrialService) -> None:
        self.mapper = service.mapper

    def link(self, stream: str, version: int, topic: str, state: Any) -> Link:
        content = plain_state(self.mapper, state)  # Upcast: the mapper's event was digested
        digest = content.pop("digest")
        content["originator_id"] = stream
        content["originator_version"] = version
        content["topic"] = topic
        intact = hashlib.sha256(canonical_json(content).encode()).hexdigest() == digest
        return Link(content["previous_digest"], digest, intact, content.get("participant_id"))


def _link_of(event: Any) -> Link:
    return Link(event.previous_digest, event.digest, compute_digest(event) == event.digest,
                getattr(event, "participant_id", None))


class _StreamCheck:
    """Walks one stream in version order, checking versions, digests and links."""

    def __init__(self, stream: str, report: VerifyReport) -> None:
        self.stream = stream
        self.report = report
        self.last_version = 0
        self.last_digest: str | None = GENESIS
        self.participant_id: str | None = None
        self.found: list[Problem] = []
        self.seen: dict[str, int] = {}

    def problem(self, kind: str, version: int, notification_id: int | None, detail: str) -> None:
        self.found.append(Problem(kind, self.stream, version, notification_id, detail))

    def check(self, notification_id: int, version: int, link: Link | None,
              event: Callable[[], Any]) -> None:
        """``link`` is None when the row can't be read; ``event()`` decodes the row fully,
        to classify a broken digest."""
        if version > self.last_version + 1:
            missing = f"{self.last_version + 1}..{version - 1}"
            self.problem("deleted", version, notification_id, f"versions {missing} are missing")
            self.last_digest = None  # the link to the missing event can't be checked
        self.last_version = version
        if link is None:
            # Stored states are encrypted and authenticated: an altered one fails to decrypt.
            self.problem("edited", version, notification_id,
                         "the stored state was altered: it no longer decrypts or decodes")
            self.last_digest = None
            return
        if self.participant_id is None:
            self.participant_id = link.participant_id
        linked = self.last_digest is None or link.previous_digest == self.last_digest
        if not link.intact:
            kind, detail = self._classify_broken(event(), linked)
            self.problem(kind, version, notification_id, detail)
            self.last_digest = None
            return
        if not linked:
            self.problem("inserted", version, notification_id,
                         "the event does not follow the previous event of its stream")
        self.seen[link.digest] = version
        self.last_digest = link.digest

    def _classify_broken(self, event: Any, linked: bool) -> tuple[str, str]:
        """Why an event's digest fails: a copy of another event, an event moved from
        another version, foreign content, or an edit."""
        if event.digest in self.seen:
            return "inserted", f"a copy of version {self.seen[event.digest]}"
        version = event.originator_version
        for other in range(1, version + 64):
            if other != version:
                probe = object.__new__(type(event))
                object.__setattr__(probe, "__dict__", dict(vars(event), originator_version=other))
                if compute_digest(probe) == event.digest:
                    return "reordered", f"the event was recorded as version {other}"
        if not linked:
            return "inserted", "the event does not belong to this stream"
        return "edited", "the event's content does not match its digest"

    def finish(self) -> None:
        for problem in self.found:
            problem.participant_id = self.participant_id
        self.report.problems.extend(self.found)


def _name_unknown_streams(service: TrialService, problems: list[Problem]) -> None:
    """Names the participant of problems in streams whose first event can't be read, from
    the read model's participant ids (a stream's id is derived from its participant's)."""
    from infrastructure.tables import participants

    unknown = {p.stream for p in problems if p.participant_id is None}
    if not unknown:
        return
    names = {}
    try:
        with service.recorder.datastore.engine.connect() as connection:  # type: ignore[attr-defined]
            for (pid,) in connection.execute(select(participants.c.participant_id)):
                stream = str(participant_uuid(pid))
                if stream in unknown:
                    names[stream] = pid
    except sqlalchemy.exc.DatabaseError:
        return  # no read models in this database
    for problem in problems:
        problem.participant_id = problem.participant_id or names.get(problem.stream)


def verify(service: TrialService, batch: int = 5000,
           progress: Callable[[int], None] | None = None,
           streams: StreamRange = (None, None)) -> VerifyReport:
    """Recomputes every digest chain of every stream (of the range of originator ids)."""
    report = VerifyReport()
    reader = _FastReader(service)
    mapper = service.mapper
    stream: _StreamCheck | None = None
    originator_id: Any = None
    done = 0
    for row in stream_rows(service.recorder, batch, streams=streams):
        if row.originator_id != originator_id:
            if stream is not None:
                stream.finish()
            originator_id = row.originator_id
            as_uuid = originator_id if isinstance(originator_id, UUID) else UUID(
                str(originator_id))
            stream = _StreamCheck(str(as_uuid), report)
        assert stream is not None
        state = row.state if isinstance(row.state, bytes) else bytes(row.state)
        try:
            try:
                link: Link | None = reader.link(stream.stream, row.originator_version,
                                                row.topic, state)
            except Upcast:
                link = _link_of(decode(mapper, *row[1:]))
        except Exception:  # noqa: BLE001 - a corrupt row is reported, not raised
            link = None
        stream.check(row.id, row.originator_version, link,
                     lambda row=row: decode(mapper, *row[1:]))
        done += 1
        if done == batch:
            report.events_checked += done
            if progress is not None:
                progress(done)
            done = 0
    if stream is not None:
        stream.finish()
    report.events_checked += done
    if progress is not None and done:
        progress(done)
    _name_unknown_streams(service, report.problems)
    return report


def _verify_range(settings: Settings, streams: StreamRange) -> VerifyReport:
    """One worker process's share: the streams of one range of originator ids."""
    from infrastructure.bootstrap import bootstrap

    trialog = bootstrap(settings, migrate=False)
    try:
        return verify(trialog.service, streams=streams)
    finally:
        trialog.close()


def verify_parallel(settings: Settings, processes: int,
                    progress: Callable[[int], None] | None = None) -> VerifyReport:
    """``verify`` split by ranges of streams over ``processes`` processes (a stream is
    never split); progress is reported as each range finishes."""
    report = VerifyReport()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        futures = [pool.submit(_verify_range, settings, streams)
                   for streams in stream_ranges(processes * 4)]
        for future in as_completed(futures):
            part = future.result()
            report.events_checked += part.events_checked
            report.problems += part.problems
            if progress is not None:
                progress(part.events_checked)
    report.problems.sort(key=lambda p: (p.stream, p.version))
    return report


# Below this many stored events, starting worker processes costs more than it saves.
PARALLEL_FROM = 100_000


def check_store(trialog: Trialog, processes: int | None = None,
                progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Verifies the whole store, timed; in ``processes`` processes (default: one per CPU)
    when the store is big enough for that to pay."""
    processes = processes or os.cpu_count() or 1
    start = time.perf_counter()
    if processes > 1 and stored_events(trialog.service.recorder) >= PARALLEL_FROM:
        report = verify_parallel(trialog.settings, processes, progress)
    else:
        report = verify(trialog.service, progress=progress)
    report.seconds = time.perf_counter() - start
    return report
