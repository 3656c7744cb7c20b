"""Queries answered from the read models (no aggregate replay), plus the contact details,
which are read from the encrypted event store only for the roles allowed to see them."""

from __future__ import annotations

import logging
from collections import defaultdict
from contextlib import nullcontext
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Date, Row, case, func, literal, select, true, type_coerce
from sqlalchemy.engine import Connection

from domain.access import Scope
from domain.errors import ParticipantNotFound
from domain.participant import Participant, participant_uuid
from domain.protocol import Protocol
from domain.schedule import ScheduledVisit, visit_status
from domain.views import participant_state as state_of
from domain.views import with_management
from infrastructure.audit.history import with_signatures_masked
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.outages import is_unavailable
from infrastructure.store.stored import (
    UnreadableRecord,
    events_table,
    plain_stream,
    position_of,
    replayed,
)
from infrastructure.store.tables import (
    as_utc,
    database_lock,
    deviations,
    participants,
    queries,
    scores,
    visits,
)

log = logging.getLogger("trialog.queries")


def _visit(row: Row[Any], today: date) -> dict[str, Any]:
    scheduled = ScheduledVisit(row.code, row.target, row.window_start, row.window_end)
    return {
        "code": row.code, "target": row.target.isoformat(),
        "window": {"start": row.window_start.isoformat(), "end": row.window_end.isoformat()},
        "status": visit_status(scheduled, row.completed_on, row.missed, today),
        "completed_on": row.completed_on.isoformat() if row.completed_on else None,
    }


def _deviation(row: Row[Any]) -> dict[str, Any]:
    return {
        "deviation_id": row.deviation_id, "participant_id": row.participant_id,
        "code": row.code, "severity": row.severity, "status": row.status,
        "detail": row.detail, "evidence": list(row.evidence),
        "detected_at": as_utc(row.detected_at).isoformat(), "resolution": row.resolution,
    }


def _summary_row(row: Row[Any]) -> dict[str, Any]:
    return {
        "participant_id": row.participant_id, "status": row.status, "arm": row.arm,
        "version": row.version, "site_id": row.site_id, "language": row.language,
        "registered_on": row.registered_on.isoformat() if row.registered_on else None,
    }


def stream_head(t: Trialog, participant_id: str) -> tuple[int, int] | None:
    """The version and the log position of a participant's newest stored event (None if it
    has none): what every command answered so far has written."""
    events = events_table(t.service.recorder)
    with t.engine.connect() as c:
        head = c.execute(
            select(events.c.originator_version, events.c.id)
            .where(events.c.originator_id == participant_uuid(participant_id))
            .order_by(events.c.originator_version.desc()).limit(1)).first()
    return (int(head[0]), int(head[1])) if head is not None else None


def event_position(t: Trialog, participant_id: str, version: int,
                   connection: Connection | None = None) -> int | None:
    """The log position of one event of a participant (read on ``connection`` if given)."""
    with t.engine.connect() if connection is None else nullcontext(connection) as c:
        position = c.execute(position_of(t.service.recorder, participant_id, version)).scalar()
    return int(position) if position is not None else None


def participant_state(t: Trialog, participant_id: str, *, contact: bool = False
                      ) -> dict[str, Any]:
    """The current state: from the read models when they have the participant's newest
    event, else replayed from the event store, so a read never misses a write that was
    answered before it began."""
    head = stream_head(t, participant_id)
    if head is None:
        raise ParticipantNotFound(f"participant {participant_id} not found")
    now = t.bus.clock()
    fell_back = False
    with t.engine.connect() as c:
        row = c.execute(select(participants)
                        .where(participants.c.participant_id == participant_id)).first()
        # A participant who left the study is replayed: which visits it cancelled depends
        # on the day it left, which the read models don't keep.
        if row is None or row.version < head[0] or row.status == "withdrawn":
            try:
                return _replayed_state(t, participant_id, now, contact, head[1])
            except Exception as error:
                # A stored event that can't be read is said so (as the history is); an
                # event that can't be applied leaves the read models' state before it.
                if row is None or is_unavailable(error) or isinstance(error, UnreadableRecord):
                    raise
                log.warning("participant %s can't be replayed; answering its read models",
                            participant_id)
                fell_back = True
        visit_rows = c.execute(select(visits).where(visits.c.participant_id == participant_id)
                               .order_by(visits.c.sequence)).all()
        open_rows = c.execute(select(deviations).where(
            deviations.c.participant_id == participant_id, deviations.c.status == "open"
        ).order_by(deviations.c.detected_at)).all()
    today = t.protocol.day_at(row.site_id, now)
    state = {
        **_summary_row(row),
        "eligible": row.eligible, "failed_criteria": list(row.failed_criteria),
        "visits": [_visit(v, today) for v in visit_rows],
        "open_deviations": [_deviation(d) for d in open_rows],
        "scores": row.scores,
        "position": row.position,
    }
    with_management(state, row.management)
    if contact:  # as at the read models' version when the newest can't be replayed
        state["contact"] = _contact(replayed(
            t.service, participant_id, row.version if fell_back else None).screening)
    return state


def _replayed_state(t: Trialog, participant_id: str, now: datetime, contact: bool,
                    position: int) -> dict[str, Any]:
    participant = replayed(t.service, participant_id)
    state = shown_state(participant, t.protocol, now, contact=contact)
    state.update(language=participant.screening["language"], position=position)
    return state


def shown_state(participant: Participant, protocol: Protocol, now: datetime,
                contact: bool = False) -> dict[str, Any]:
    """A participant's state at ``now`` as a reader is shown it: its visits judged by its
    site's day then, and an address quoted in a signature's meaning masked for every role,
    as the read models keep it (see ``with_signatures_masked``)."""
    state = state_of(participant, protocol, protocol.day_at(participant.site_id, now),
                     contact=contact)
    with_signatures_masked([*state["visits"], state["casebook"]])
    return state


def _contact(screening: dict[str, Any]) -> dict[str, Any]:
    birth_date = screening.get("birth_date")
    return {"email": screening.get("email"),
            "birth_date": birth_date.isoformat() if birth_date else None}


def in_scope(scope: Scope, participant_id: Any) -> Any:
    """A condition on a participant id column: the participant is at one of the scope's
    sites. Every read model query of a list or a count goes through it."""
    if scope.sites is None:
        return true()
    return participant_id.in_(select(participants.c.participant_id)
                              .where(participants.c.site_id.in_(sorted(scope.sites))))


def list_participants(t: Trialog, *, scope: Scope, status: str | None = None,
                      arm: str | None = None, site_id: str | None = None, limit: int = 1000,
                      offset: int = 0) -> list[dict[str, Any]]:
    query = select(participants).order_by(participants.c.participant_id)
    if scope.sites is not None:
        query = query.where(participants.c.site_id.in_(sorted(scope.sites)))
    for column, value in (("status", status), ("arm", arm), ("site_id", site_id)):
        if value is not None:
            query = query.where(participants.c[column] == value)
    with t.engine.connect() as c:
        rows = c.execute(query.limit(limit).offset(offset)).all()
    return [_summary_row(r) for r in rows]


def holds_site(t: Trialog, site_id: str) -> bool:
    """Whether a participant of the read models is at ``site_id`` (a site taken out of the
    protocol may still hold participants)."""
    with t.engine.connect() as c:
        return c.execute(select(participants.c.participant_id)
                         .where(participants.c.site_id == site_id).limit(1)).first() is not None


def list_deviations(t: Trialog, *, scope: Scope, status: str | None = None,
                    code: str | None = None, participant_id: str | None = None,
                    limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
    query = (select(deviations).where(in_scope(scope, deviations.c.participant_id))
             .order_by(deviations.c.detected_at, deviations.c.deviation_id))
    for column, value in (("status", status), ("code", code),
                          ("participant_id", participant_id)):
        if value is not None:
            query = query.where(deviations.c[column] == value)
    with t.engine.connect() as c:
        return [_deviation(r) for r in c.execute(query.limit(limit).offset(offset))]


def visits_due(t: Trialog, within_days: int, *, scope: Scope, limit: int | None = None,
               offset: int = 0) -> list[dict[str, Any]]:
    """Visits not completed or missed whose window opens within ``within_days`` (or is open
    now), for participants still in follow-up: each judged by its site's day, as its
    state and its reminders are."""
    now = t.bus.clock()
    # Each site's day (None: UTC's, for a site the protocol no longer lists), found once.
    days = {site_id: t.protocol.day_at(site_id, now)
            for site_id in (None, *t.protocol.site_ids)}
    later = timedelta(days=within_days)
    query = (
        select(visits, participants.c.site_id, participants.c.status)
        .join(participants, participants.c.participant_id == visits.c.participant_id)
        .where(visits.c.completed_on.is_(None), visits.c.missed.is_(False),
               visits.c.window_start <= _by_site(days, later),
               visits.c.window_end >= _by_site(days),
               # The same bounds over every site's day: conditions the index serves.
               visits.c.window_start <= max(days.values()) + later,
               visits.c.window_end >= min(days.values()),
               participants.c.status.in_(("randomized", "off_treatment")),
               in_scope(scope, participants.c.participant_id))
        .order_by(visits.c.window_start, visits.c.participant_id, visits.c.code)
    )
    with t.engine.connect() as c:
        rows = c.execute(query.limit(limit).offset(offset)).all()
    return [{"participant_id": r.participant_id, "site_id": r.site_id,
             **_visit(r, days.get(r.site_id, days[None]))}
            for r in rows]


def _by_site(days: dict[str | None, date], later: timedelta = timedelta()) -> Any:
    """The day ``later`` after each participant's site's day in ``days`` (UTC's, under
    None, at a site not among them), as an expression on its site id."""
    def day(site_id: str | None) -> Any:
        return literal(days[site_id] + later, Date)

    whens = {site_id: day(site_id) for site_id in days if site_id is not None}
    if not whens:
        return day(None)
    return type_coerce(case(whens, value=participants.c.site_id, else_=day(None)), Date)


def trial_summary(t: Trialog, *, scope: Scope) -> dict[str, Any]:
    """Counts by status, arm and site, deviations by code, and the mean BPI average pain
    by arm and visit, over the participants of the scope's sites."""
    with t.engine.connect() as c:
        def counts(column: Any, *where: Any) -> dict[str, int]:
            query = select(column, func.count()).where(
                column.is_not(None), in_scope(scope, column.table.c.participant_id), *where)
            return {k: n for k, n in sorted(c.execute(query.group_by(column)).all())}

        by_status = counts(participants.c.status)
        pain_rows = c.execute(
            select(scores.c.arm, scores.c.visit, func.count(scores.c.bpi_average),
                   func.avg(scores.c.bpi_average))
            .where(scores.c.arm.is_not(None), scores.c.bpi_average.is_not(None),
                   in_scope(scope, scores.c.participant_id))
            .group_by(scores.c.arm, scores.c.visit).order_by(scores.c.arm, scores.c.visit)
        ).all()
        summary = {
            "participants": sum(by_status.values()),
            "by_status": by_status,
            "by_arm": counts(participants.c.arm),
            "by_site": counts(participants.c.site_id),
            "deviations_by_code": counts(deviations.c.code),
            "open_deviations_by_code": counts(deviations.c.code, deviations.c.status == "open"),
        }
    order = {code: i for i, code in enumerate(t.protocol.visit_codes)}
    pain: dict[str, dict[str, Any]] = defaultdict(dict)
    for arm, visit, n, mean in sorted(pain_rows, key=lambda r: (r[0], order.get(r[1], 99))):
        pain[arm][visit] = {"n": n, "mean": float(mean)}  # in the protocol's visit order
    summary["mean_pain_by_arm_and_visit"] = dict(pain)
    summary["database_lock"] = database_lock_state(t)
    return summary


def site_of(t: Trialog, participant_id: str) -> str | None:
    """The participant's site, from its first event (a site is never corrected), so that
    it holds for a participant screened a moment ago; None if it has no events."""
    first = plain_stream(t.service, participant_uuid(participant_id), lte=1)
    if not first:
        return None
    site: str = first[0][2]["data"]["site_id"]
    return site


def visible(t: Trialog, scope: Scope, participant_id: str) -> bool:
    """Whether the participant exists for a caller with ``scope``."""
    if scope.sites is None:
        return True
    try:
        site = site_of(t, participant_id)
    except UnreadableRecord:  # whose site, no one can say: only every site's callers see it
        return False
    return site is not None and scope.admits(site)


def _query(row: Row[Any], now: datetime) -> dict[str, Any]:
    opened = as_utc(row.opened_at)
    until = now if row.status in ("open", "answered") else datetime.fromisoformat(
        row.thread[-1]["at"])
    return {
        "query_id": row.query_id, "participant_id": row.participant_id,
        "site_id": row.site_id, "status": row.status, "target": row.target,
        "opened_at": opened.isoformat(), "opened_by": row.opened_by,
        "days_open": max(0, (until - opened).days), "thread": row.thread,
    }


def list_queries(t: Trialog, *, scope: Scope, status: str | None = None,
                 site_id: str | None = None, participant_id: str | None = None,
                 limit: int = 1000, offset: int = 0) -> list[dict[str, Any]]:
    """Queries of the scope's sites, oldest first, filtered by status, site and
    participant (an address quoted in a thread is masked in the read models)."""
    query = select(queries).order_by(queries.c.opened_at, queries.c.query_id)
    if scope.sites is not None:
        query = query.where(queries.c.site_id.in_(sorted(scope.sites)))
    for column, value in (("status", status), ("site_id", site_id),
                          ("participant_id", participant_id)):
        if value is not None:
            query = query.where(queries.c[column] == value)
    now = datetime.now(UTC)
    with t.engine.connect() as c:
        return [_query(r, now) for r in c.execute(query.limit(limit).offset(offset))]


def database_lock_state(t: Trialog) -> dict[str, Any] | None:
    """The database lock: when, by whom, at which log position; None when unlocked."""
    with t.engine.connect() as c:
        row = c.execute(select(database_lock).where(
            database_lock.c.study_id == t.protocol.study_id)).first()
    if row is None or row.locked_at is None:
        return None
    return {"locked_at": as_utc(row.locked_at).isoformat(), "locked_by": row.locked_by,
            "position": row.position}
