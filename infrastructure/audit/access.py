"""The accounting of disclosures: every answer that carried a participant's contact details
(email, birth date, reminder recipients) is recorded with who was shown them, when, and by
which endpoint. Only the server writes here, as it answers; the API only lists it."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Engine

from infrastructure.store.tables import access_log, as_utc


def record(engine: Engine, actor: str, participant_ids: Iterable[str], endpoint: str,
           request_id: str | None) -> None:
    """One row per participant whose contact details this answer carries."""
    now = datetime.now(UTC)
    rows = [{"at": now, "actor": actor, "participant_id": pid, "endpoint": endpoint,
             "request_id": request_id} for pid in participant_ids]
    if rows:
        with engine.begin() as connection:
            connection.execute(insert(access_log), rows)


def disclosures(engine: Engine, participant_id: str | None = None,
                limit: int = 1000) -> list[dict[str, Any]]:
    """Who was shown contact details, newest first; for one participant if given."""
    query = select(access_log).order_by(access_log.c.id.desc()).limit(limit)
    if participant_id is not None:
        query = query.where(access_log.c.participant_id == participant_id)
    with engine.connect() as connection:
        rows = connection.execute(query).mappings().all()
    return [{"at": as_utc(r["at"]).isoformat(), "actor": r["actor"],
             "participant_id": r["participant_id"], "endpoint": r["endpoint"],
             "request_id": r["request_id"]} for r in rows]
