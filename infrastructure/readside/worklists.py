"""Work lists of the data-management steps still to take, from the read models: completed
visits to verify, visits and casebooks to sign, participants set aside by a follower of the
log. Each is limited to the caller's sites."""

from __future__ import annotations

import logging
from datetime import date
from typing import Any

from sqlalchemy import select

from domain.access import Scope
from infrastructure.readside import quarantine
from infrastructure.readside.queries import visible
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.outages import is_unavailable
from infrastructure.store.tables import participants, visits

log = logging.getLogger("trialog.worklists")

# Visits whose data is in: each may be verified and signed.
_COMPLETED = (select(visits.c.participant_id, visits.c.code, visits.c.completed_on,
                     visits.c.sequence, participants.c.site_id, participants.c.management)
              .join(participants, participants.c.participant_id == visits.c.participant_id)
              .where(visits.c.completed_on.is_not(None))
              .order_by(visits.c.completed_on, visits.c.participant_id, visits.c.sequence))


def _scoped(query: Any, scope: Scope) -> Any:
    if scope.sites is None:
        return query
    return query.where(participants.c.site_id.in_(sorted(scope.sites)))


def _management(row: Any, code: str) -> dict[str, Any]:
    management = row.management or {}
    found: dict[str, Any] = management.get("visits", {}).get(code) or {}
    return found


def visits_to_verify(t: Trialog, scope: Scope) -> list[dict[str, Any]]:
    """Completed visits not verified, or changed since they were verified."""
    with t.engine.connect() as c:
        rows = c.execute(_scoped(_COMPLETED, scope)).all()
    found = []
    for row in rows:
        sdv = _management(row, row.code).get("sdv", "not_verified")
        if sdv != "verified":
            found.append({"participant_id": row.participant_id, "site_id": row.site_id,
                          "visit": row.code, "completed_on": row.completed_on.isoformat(),
                          "sdv": sdv})
    return found


def _unsigned(signature: dict[str, Any] | None) -> bool:
    return signature is None or not signature.get("valid")


def visits_to_sign(t: Trialog, scope: Scope) -> list[dict[str, Any]]:
    """Completed visits without a valid signature."""
    with t.engine.connect() as c:
        rows = c.execute(_scoped(_COMPLETED, scope)).all()
    found = []
    for row in rows:
        management = _management(row, row.code)
        if _unsigned(management.get("signature")):
            signature = management.get("signature")
            found.append({"participant_id": row.participant_id, "site_id": row.site_id,
                          "visit": row.code, "completed_on": row.completed_on.isoformat(),
                          "sdv": management.get("sdv", "not_verified"),
                          "invalidated": signature is not None})
    return found


def casebooks_to_sign(t: Trialog, scope: Scope) -> list[dict[str, Any]]:
    """Participants who completed or left the study, with no query open and every visit
    completed or missed (a withdrawn participant's visits whose windows were still open
    on the day it left are cancelled), whose casebook has no valid signature: those that
    SignCasebook takes."""
    query = _scoped(select(participants).where(
        participants.c.status.in_(("completed", "withdrawn"))
    ).order_by(participants.c.participant_id), scope)
    with t.engine.connect() as c:
        rows = c.execute(query).all()
        pending: dict[str, list[date]] = {}  # each visit neither completed nor missed
        for visit in c.execute(select(visits.c.participant_id, visits.c.window_end).where(
                visits.c.completed_on.is_(None), visits.c.missed.is_(False))):
            pending.setdefault(visit.participant_id, []).append(visit.window_end)
    found = []
    for row in rows:
        management = row.management or {}
        if management.get("open_queries", 0) or not _unsigned(
                (management.get("casebook") or {}).get("signature")):
            continue
        if row.participant_id in pending:
            left = None if row.status == "completed" else (
                row.left_on or _left_study_on(t, row.participant_id))
            if left is None or any(end < left for end in pending[row.participant_id]):
                continue
        found.append({"participant_id": row.participant_id, "site_id": row.site_id,
                      "status": row.status})
    return found


def _left_study_on(t: Trialog, participant_id: str) -> date | None:
    """The day a withdrawn participant left the study, replayed: a row written before the
    read models kept it has none. One that can't be replayed is left to the list of those
    set aside."""
    try:
        left: date | None = t.service.get_participant(participant_id).withdrawn_on("study")
    except Exception as error:
        if is_unavailable(error):
            raise
        log.warning("participant %s can't be replayed; left off the casebooks to sign",
                    participant_id)
        return None
    return left


def quarantined(t: Trialog, scope: Scope) -> list[dict[str, Any]]:
    """Participants a follower of the log has set aside, with the event and the error."""
    with t.engine.connect() as c:
        rows = quarantine.listing(c)
    return [r for r in rows if visible(t, scope, r["participant_id"])]
