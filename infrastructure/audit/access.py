"""The accounting of disclosures: every answer that carried a participant's contact details
(email, birth date, reminder recipients) is recorded with who was shown them, when, and by
which endpoint. Only the server writes here, as it answers; the API only lists it. Each row
is sealed: one changed or made up in the database without the key shows as not intact."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from flask import has_request_context, request
from sqlalchemy import insert, select, text
from sqlalchemy.engine import Connection, Engine

from domain.access import EVERY_SITE, Scope
from infrastructure.readside.queries import in_scope
from infrastructure.store.access_seals import seals_for
from infrastructure.store.tables import access_log, as_utc


def record(engine: Engine | Connection, actor: str, participant_ids: Iterable[str],
           endpoint: str, request_id: str | None) -> None:
    """One row per participant whose contact details this answer carries: committed here,
    or, given a connection, in its transaction. An answer to HEAD carries no body: it
    shows nothing, and nothing is recorded."""
    ids = list(participant_ids)
    if not ids or (has_request_context() and request.method == "HEAD"):
        return
    if isinstance(engine, Connection):
        _insert(engine, actor, ids, endpoint, request_id)
        return
    with engine.begin() as connection:
        _insert(connection, actor, ids, endpoint, request_id)


# On PostgreSQL, a page's rows in one statement whose text never changes (the ids and their
# seals are two array parameters), so it is prepared once rather than compiled for each
# count of rows.
_UNNEST = text("INSERT INTO trialog_access_log (at, actor, participant_id, endpoint, "
               "request_id, seal) SELECT :at, :actor, shown.id, :endpoint, :request_id, "
               "shown.seal FROM unnest(CAST(:ids AS text[]), CAST(:seals AS bytea[])) "
               "AS shown(id, seal)")


def _insert(connection: Connection, actor: str, ids: list[str], endpoint: str,
            request_id: str | None) -> None:
    """The rows, each sealed (AccessSeals.disclosure): one changed or made up in the
    database without the key is shown as not intact, and reported by verify."""
    now = datetime.now(UTC)
    seals = seals_for(connection.engine)
    sealed = [seals.disclosure(now, actor, pid, endpoint, request_id) for pid in ids]
    if connection.dialect.name == "postgresql":
        connection.execute(_UNNEST, {"at": now, "actor": actor, "ids": ids, "seals": sealed,
                                     "endpoint": endpoint, "request_id": request_id})
        return
    connection.execute(insert(access_log), [
        {"at": now, "actor": actor, "participant_id": pid, "endpoint": endpoint,
         "request_id": request_id, "seal": seal} for pid, seal in zip(ids, sealed, strict=True)])


def disclosures(engine: Engine, participant_id: str | None = None, limit: int = 1000,
                scope: Scope = EVERY_SITE) -> list[dict[str, Any]]:
    """Who was shown contact details of the scope's participants, newest first; for one
    participant if given."""
    query = (select(access_log).where(in_scope(scope, access_log.c.participant_id))
             .order_by(access_log.c.id.desc()).limit(limit))
    if participant_id is not None:
        query = query.where(access_log.c.participant_id == participant_id)
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    seals = seals_for(engine)
    return [{"at": as_utc(r.at).isoformat(), "actor": r.actor,
             "participant_id": r.participant_id, "endpoint": r.endpoint,
             "request_id": r.request_id, "intact": seals.disclosure_holds(r)} for r in rows]
