"""Audit: the timeline of one participant at any moment, and the verification of every
stored event's hash chain (edited, deleted, reordered or inserted rows are reported, never
crashed on)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from eventsourcing.persistence import StoredEvent
from sqlalchemy import select

from domain.chain import GENESIS, compute_digest
from domain.participant import CONTACT_FIELDS, Participant, participant_uuid
from domain.service import TrialService

AUDIT_FIELDS = ("originator_id", "originator_version", "timestamp", "originator_topic",
                "command_id", "actor", "reason", "previous_digest", "digest")


def event_entry(event: Any) -> dict[str, Any]:
    """One event as the history shows it: audit fields, then the event's own data."""
    return {
        "event_id": event.event_id,
        "type": type(event).__name__,
        "version": event.originator_version,
        "recorded_at": event.timestamp,
        "actor": event.actor,
        "command_id": event.command_id,
        "reason": event.reason,
        "data": {k: v for k, v in vars(event).items() if k not in AUDIT_FIELDS},
        "digest": event.digest,
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
            version: int | None = None) -> list[dict[str, Any]]:
    """The participant's events, oldest first, up to the recording time ``as_of`` or up to
    and including ``version``."""
    events = service.events.get(participant_uuid(participant_id), lte=version)
    return [event_entry(e) for e in events if as_of is None or e.timestamp <= as_of]


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

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "events_checked": self.events_checked,
                "problems": [p.as_dict() for p in self.problems]}


def _rows(service: TrialService, batch: int) -> Iterator[tuple[int, StoredEvent]]:
    """Every stored event, stream by stream, in version order."""
    recorder: Any = service.recorder
    table = recorder.events_record_cls.__table__
    query = select(table.c.id, table.c.originator_id, table.c.originator_version,
                   table.c.topic, table.c.state).order_by(table.c.originator_id,
                                                          table.c.originator_version)
    with recorder.datastore.get_connection() as connection:
        result = connection.execution_options(yield_per=batch).execute(query)
        for row in result:
            state = bytes(row.state) if isinstance(row.state, memoryview) else row.state
            yield row.id, StoredEvent(row.originator_id, row.originator_version, row.topic, state)


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

    def check(self, notification_id: int, stored: StoredEvent, event: Any | None) -> None:
        version = stored.originator_version
        if version > self.last_version + 1:
            missing = f"{self.last_version + 1}..{version - 1}"
            self.problem("deleted", version, notification_id, f"versions {missing} are missing")
            self.last_digest = None  # the link to the missing event can't be checked
        self.last_version = version
        if event is None:
            # Stored states are encrypted and authenticated: an altered one fails to decrypt.
            self.problem("edited", version, notification_id,
                         "the stored state was altered: it no longer decrypts or decodes")
            self.last_digest = None
            return
        self.participant_id = self.participant_id or getattr(event, "participant_id", None)
        linked = self.last_digest is None or event.previous_digest == self.last_digest
        if compute_digest(event) != event.digest:
            kind, detail = self._classify_broken(event, linked)
            self.problem(kind, version, notification_id, detail)
            self.last_digest = None
            return
        if not linked:
            self.problem("inserted", version, notification_id,
                         "the event does not follow the previous event of its stream")
        self.seen[event.digest] = version
        self.last_digest = event.digest

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


def verify(service: TrialService, batch: int = 2000,
           progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Recomputes every digest chain of every stream."""
    report = VerifyReport()
    stream: _StreamCheck | None = None
    for notification_id, stored in _rows(service, batch):
        key = str(stored.originator_id)
        if stream is None or stream.stream != key:
            if stream is not None:
                stream.finish()
            stream = _StreamCheck(key, report)
        try:
            event: Any | None = service.mapper.to_domain_event(stored)
        except Exception:  # noqa: BLE001 - a corrupt row is reported, not raised
            event = None
        stream.check(notification_id, stored, event)
        report.events_checked += 1
        if progress is not None:
            progress(1)
    if stream is not None:
        stream.finish()
    return report
