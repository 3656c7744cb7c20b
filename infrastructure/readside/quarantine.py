"""Quarantine: what a follower of the log does with a participant whose event it can't apply.

One participant's bad event must never stop a follower for everyone. The follower sets the
participant aside with the error (stored here, logged once), moves on, and tries again
with that participant's next event (a correction that repairs the record); the row goes
when a try succeeds. ``trialog projections status`` and ``/healthz`` show the rows.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection

from domain.access import Scope
from infrastructure.logs import mask_emails_in
from infrastructure.store.bus import WRITE_CONFLICTS
from infrastructure.store.tables import as_utc, participants, quarantine

log = logging.getLogger("trialog.quarantine")


def describe(error: BaseException) -> str:
    """The error as stored and logged, addresses masked (it may quote recorded data)."""
    return mask_emails_in(f"{type(error).__name__}: {error}")[:2000]


def set_aside(session: Any, follower: str, originator_id: Any, participant_id: str,
              position: int | None, event_type: str | None, error: BaseException) -> None:
    """Records (or renews) the quarantine of one participant; logs the first time only."""
    key = (quarantine.c.follower == follower) & (
        quarantine.c.originator_id == str(originator_id))
    known = session.execute(select(quarantine.c.attempts).where(key)).scalar()
    values = {"participant_id": participant_id, "position": position,
              "event_type": event_type, "error": describe(error)}
    if known is None:
        try:
            with session.begin_nested():
                session.execute(insert(quarantine).values(
                    follower=follower, originator_id=str(originator_id), attempts=1,
                    quarantined_at=datetime.now(UTC), **values))
        except WRITE_CONFLICTS:
            return  # set aside at the same moment by another process, which logged it
        log.error("participant quarantined", extra={"follower": follower, **values})
    else:
        session.execute(update(quarantine).where(key).values(attempts=known + 1, **values))


def release(session: Any, follower: str, originator_ids: set[Any]) -> None:
    """Lifts the quarantine of participants whose events now apply."""
    if not originator_ids:
        return
    ids = [str(i) for i in originator_ids]
    released = session.execute(delete(quarantine).where(
        (quarantine.c.follower == follower) & quarantine.c.originator_id.in_(ids)))
    if released.rowcount:
        log.info("quarantine lifted", extra={"follower": follower, "count": released.rowcount})


def quarantined_ids(session: Any, follower: str) -> set[str]:
    return set(session.execute(select(quarantine.c.originator_id).where(
        quarantine.c.follower == follower)).scalars())


def set_aside_within(connection: Connection, follower: str, scope: Scope) -> set[str]:
    """The participants (their records' ids) ``follower`` has set aside within ``scope``'s
    sites. One whose site the read models never learnt (set aside at its first event) is
    in every scope: it may be of any site (how many are set aside is no secret: ``/healthz``
    counts every follower's)."""
    held = select(quarantine.c.originator_id).select_from(quarantine.outerjoin(
        participants, participants.c.participant_id == quarantine.c.participant_id)).where(
        quarantine.c.follower == follower)
    if scope.sites is not None:
        held = held.where(participants.c.site_id.is_(None)
                          | participants.c.site_id.in_(sorted(scope.sites)))
    return set(connection.execute(held).scalars())


def listing(connection: Connection) -> list[dict[str, Any]]:
    """Every quarantined participant, by follower, oldest first."""
    rows = connection.execute(select(quarantine).order_by(
        quarantine.c.follower, quarantine.c.quarantined_at)).mappings()
    return [{"follower": r["follower"], "participant_id": r["participant_id"],
             "position": r["position"], "event_type": r["event_type"], "error": r["error"],
             "attempts": r["attempts"],
             "quarantined_at": as_utc(r["quarantined_at"]).isoformat()} for r in rows]


def count(connection: Connection) -> int:
    """How many participants are set aside, by any follower."""
    return int(connection.execute(select(func.count()).select_from(quarantine)).scalar_one())
