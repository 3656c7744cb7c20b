"""Exports for statisticians and auditors, streamed row by row (constant memory; when
de-identified, the participants' ids are held to be ordered by their pseudonyms).

``deidentify`` replaces each participant id with a keyed pseudonym and shifts every date
of a participant by the same keyed number of days (1 to 365 back), so intervals within a
participant are kept and dates can't be matched to the source.

The CSV ends with each visit's data management: ``sdv`` (not_verified, verified,
changed_since_verified) and ``signed`` (true while a valid signature is on the visit)."""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row, Select, and_, select

from domain.access import EVERY_SITE, Scope
from domain.scoring import SCORE_NAMES
from domain.views import NOT_CAPTURED
from infrastructure.readside.queries import in_scope
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.tables import participants, scores, visits

CSV_COLUMNS = ("participant_id", "site_id", "arm", "visit", "completed_on", *SCORE_NAMES,
               "sdv", "signed")


class Deidentifier:
    def __init__(self, key: bytes) -> None:
        self.key = key

    def _digest(self, participant_id: str, purpose: bytes) -> bytes:
        return hmac.new(self.key, purpose + participant_id.encode(), hashlib.sha256).digest()

    def pseudonym(self, participant_id: str) -> str:
        return "P-" + self._digest(participant_id, b"id:").hex()[:12]

    def query_pseudonym(self, query_id: str) -> str:
        """Stands for a query id (which the service lists with the participant's id)."""
        return "Q-" + self._digest(query_id, b"query:").hex()[:12]

    def command_pseudonym(self, command_id: str) -> str:
        """Stands for a command id (which the history and the feed list with the
        participant's id)."""
        return "C-" + self._digest(command_id, b"command:").hex()[:16]

    def reference_pseudonym(self, reference: str) -> str:
        """Stands for an id derived from the participant's without a key (a deviation's,
        an event's)."""
        return "R-" + self._digest(reference, b"reference:").hex()[:16]

    def offset(self, participant_id: str) -> timedelta:
        """How far back this participant's dates move: 1 to 365 days, the same for all."""
        days = 1 + int.from_bytes(self._digest(participant_id, b"date:")[:4], "big") % 365
        return timedelta(days=days)

    def shift(self, participant_id: str, day: date) -> date:
        """The date moved back; the earliest date when that would go before year 1."""
        offset = self.offset(participant_id)
        return day - offset if day - date.min >= offset else date.min

    def shift_datetime(self, participant_id: str, moment: datetime) -> datetime:
        offset = self.offset(participant_id)
        earliest = datetime.min.replace(tzinfo=moment.tzinfo)
        return moment - offset if moment - earliest >= offset else earliest


ID_CHUNK = 500  # participants a query, de-identified


def by_participant(connection: Connection, query: Select[Any],
                   masker: Deidentifier | None) -> Iterator[Row[Any]]:
    """The rows of ``query`` (of ``participants``, ordered by participant id, then as
    within a participant), streamed. De-identified, the participants come in the order of
    their pseudonyms, ID_CHUNK of them a query, all in one snapshot on PostgreSQL: the
    real ids' order would show each site's order of enrolment."""
    if masker is None:
        yield from connection.execution_options(yield_per=1000).execute(query)
        return
    if connection.dialect.name == "postgresql":  # before the first statement begins
        connection.execution_options(isolation_level="REPEATABLE READ")
    ids = connection.execute(query.with_only_columns(participants.c.participant_id)
                             .order_by(None).distinct()).scalars()
    ordered = sorted(ids, key=masker.pseudonym)
    for start in range(0, len(ordered), ID_CHUNK):
        some = ordered[start:start + ID_CHUNK]
        rank = {pid: n for n, pid in enumerate(some)}
        found = connection.execute(query.where(participants.c.participant_id.in_(some)))
        yield from sorted(found, key=lambda row: rank[row.participant_id])  # stable


def csv_rows(t: Trialog, deidentify: bool = False,
             scope: Scope = EVERY_SITE) -> Iterator[dict[str, Any]]:
    """One row per participant of the scope's sites and scheduled visit, with the visit's
    scores, source verification and signature."""
    p, v, s = participants, visits, scores
    query = (
        select(p.c.participant_id, p.c.site_id, p.c.arm, v.c.code, v.c.completed_on,
               *(s.c[name] for name in SCORE_NAMES), p.c.management)
        .join(v, v.c.participant_id == p.c.participant_id)
        .outerjoin(s, and_(s.c.participant_id == v.c.participant_id, s.c.visit == v.c.code))
        .where(in_scope(scope, p.c.participant_id))
        .order_by(p.c.participant_id, v.c.sequence)
    )
    masker = Deidentifier(t.settings.pseudonym_key) if deidentify else None
    with t.engine.connect() as connection:
        for row in by_participant(connection, query, masker):
            pid, completed = row.participant_id, row.completed_on
            if masker is not None:
                completed = masker.shift(pid, completed) if completed else None
                pid = masker.pseudonym(pid)
            yield {"participant_id": pid, "site_id": row.site_id, "arm": row.arm,
                   "visit": row.code, "completed_on": completed.isoformat() if completed else "",
                   **{name: row._mapping[name] for name in SCORE_NAMES},
                   **visit_management(row.management, row.code)}


def visit_management(management: dict[str, Any] | None, code: str) -> dict[str, str]:
    """The ``sdv`` and ``signed`` columns of a visit, from the participant's management
    read model (a visit neither completed nor missed has none)."""
    visit = ((management or {}).get("visits") or {}).get(code, NOT_CAPTURED)
    signature = visit["signature"]
    signed = signature is not None and bool(signature["valid"])
    return {"sdv": visit["sdv"], "signed": "true" if signed else "false"}


def csv_text(t: Trialog, deidentify: bool = False,
             scope: Scope = EVERY_SITE) -> Iterator[str]:
    """The CSV document in chunks: a header, then one line per row."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for i, row in enumerate(csv_rows(t, deidentify, scope), 1):
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
        if i % 500 == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


FORMATS = ("csv", "odm", "fhir")
# Made from the read models (the ODM export reads the store).
FROM_READ_MODELS = frozenset({"csv", "fhir"})


def document(t: Trialog, kind: str, deidentify: bool = False,
             contact: bool = True, shown: list[str] | None = None,
             scope: Scope = EVERY_SITE) -> Iterator[str]:
    """The export of one format for the participants of the scope's sites, in chunks of
    text; contact details (only the ODM export has any) are left out unless ``contact``.
    ``shown`` collects the participants whose contact details the export carries, before
    its first chunk."""
    from infrastructure.audit import (
        fhir,  # they build on this module
        odm,
    )

    if kind == "odm":
        return odm.odm_document(t, deidentify=deidentify, contact=contact, shown=shown,
                                scope=scope)
    writers: dict[str, Callable[..., Iterator[str]]] = {"csv": csv_text,
                                                         "fhir": fhir.fhir_ndjson}
    return writers[kind](t, deidentify=deidentify, scope=scope)
