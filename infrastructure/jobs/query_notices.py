"""Query emails through the reminder outbox: when a monitor raises a query, the site
coordinator gets one email, in the coordinator's language; and once a week each site
coordinator with queries open more than 7 days gets a digest of them.

The reminder scan writes the outbox rows (``kind`` ``query_raised`` with the query's id,
or ``query_digest`` for a site and ISO week) and the reminder sender sends them, with the
same once-only rules: a raised query's email is recorded as ``ReminderSent`` on the
participant (keyed by the query id), a digest's row is its record.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime, timedelta
from typing import Any
from uuid import NAMESPACE_URL, uuid5

from sqlalchemy import and_, select

from domain.participant import Participant
from infrastructure.audit.history import masked_text
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.tables import as_utc, outbox, queries

RAISED, DIGEST = "query_raised", "query_digest"
DIGEST_AFTER_DAYS = 7
# A query raised longer ago than this when a scan first sees it (the workers were down)
# is left to the weekly digest rather than announced late.
ANNOUNCE_WITHIN = timedelta(days=1)
SUBJECTS = {
    RAISED: {"en": "New query on participant {pid}",
             "es": "Nueva consulta sobre el participante {pid}"},
    DIGEST: {"en": "{n} queries open more than 7 days at {site}",
             "es": "{n} consultas abiertas hace más de 7 días en {site}"},
}


def notice_id(*parts: str) -> str:
    return str(uuid5(NAMESPACE_URL, "trialog:query-notice:" + ":".join(parts)))


def digest_key(site_id: str, today: date) -> str:
    """One digest per site and ISO week."""
    year, week, _ = today.isocalendar()
    return f"site:{site_id}:{year}-W{week:02d}"


def outbox_rows(t: Trialog, session: Any, today: Callable[[str], date], now: datetime,
                position: int) -> list[dict[str, Any]]:
    """The outbox rows a scan adds: one per query raised since the last day with none yet,
    and one digest per site with queries open more than 7 days and none this week (the
    site's week: ``today`` gives the day at a site)."""
    base = {"status": "pending", "attempts": 0, "scan_position": position,
            "created_at": now}
    now = t.bus.clock()  # the clock the events are recorded by
    raised = session.execute(
        select(queries.c.query_id, queries.c.participant_id, queries.c.target,
               queries.c.site_id)
        .outerjoin(outbox, and_(outbox.c.query_id == queries.c.query_id,
                                outbox.c.participant_id == queries.c.participant_id,
                                outbox.c.kind == RAISED))
        .where(outbox.c.reminder_id.is_(None), queries.c.opened_at >= now - ANNOUNCE_WITHIN)
    ).all()
    rows = [{**base, "due_on": today(r.site_id),
             "reminder_id": notice_id(RAISED, r.participant_id, r.query_id),
             "participant_id": r.participant_id, "visit": r.target.get("visit") or "",
             "kind": RAISED, "query_id": r.query_id} for r in raised]
    late = now - timedelta(days=DIGEST_AFTER_DAYS)
    sites = session.execute(
        select(queries.c.site_id).distinct()
        .where(queries.c.status.in_(("open", "answered")), queries.c.opened_at <= late)
    ).scalars().all()
    for site_id in sites:
        key = digest_key(site_id, today(site_id))
        reminder_id = notice_id(DIGEST, key)
        if session.execute(select(outbox.c.reminder_id)
                           .where(outbox.c.reminder_id == reminder_id)).first() is None:
            rows.append({**base, "due_on": today(site_id), "reminder_id": reminder_id,
                         "participant_id": key[:64], "visit": "", "kind": DIGEST,
                         "query_id": None})
    return rows


def _language(t: Trialog, site_id: str) -> str:
    site = t.protocol.site(site_id)
    language = site.coordinator_language if site else "en"
    return language if language in SUBJECTS[RAISED] else "en"


def _visit_names(t: Trialog, language: str) -> dict[str, str]:
    """Each visit's name in ``language``, as the reminders name it, by its code."""
    return {visit.code: visit.name_in(language) for visit in t.protocol.visits}


def raised_recipients(t: Trialog, participant: Participant) -> tuple[str, ...]:
    """Whom a raised query's email goes to: the participant's site coordinator."""
    site = t.protocol.site(participant.site_id)
    return (site.coordinator_email,) if site is not None and site.coordinator_email else ()


def raised_email(t: Trialog, participant: Participant, query_id: str) -> Any:
    """The email to the participant's site coordinator about a raised query, or None when
    the query is no longer open when it would be sent (answered, closed or cancelled
    meanwhile: the email asks for an answer)."""
    from infrastructure.jobs.reminders import TEMPLATES, Email

    query = participant.queries.get(query_id)
    site = t.protocol.site(participant.site_id)
    if query is None or query["status"] != "open" or site is None:
        return None
    language = _language(t, participant.site_id)
    context = {"study": t.protocol.title, "participant_id": participant.participant_id,
               "site_name": site.name, "target": query["target"],
               # An address quoted in it masked, as the digest (from the read models) and
               # every other reader shows it.
               "text": masked_text(query["thread"][0]["text"]), "raised_by": query["opened_by"],
               "raised_at": query["opened_at"][:16].replace("T", " "),
               "visit_names": _visit_names(t, language)}
    return Email(
        to=raised_recipients(t, participant),
        subject=SUBJECTS[RAISED][language].format(pid=participant.participant_id),
        text=TEMPLATES.get_template(f"query_raised_{language}.txt").render(context),
        html=TEMPLATES.get_template(f"query_raised_{language}.html").render(context),
    )


def digest_email(t: Trialog, key: str) -> Any:
    """The week's digest for the site named in ``key``, or None when nothing is open more
    than 7 days any more."""
    from infrastructure.jobs.reminders import TEMPLATES, Email

    site_id = key.split(":")[1]
    site = t.protocol.site(site_id)
    now = t.bus.clock()
    late = now - timedelta(days=DIGEST_AFTER_DAYS)
    with t.engine.connect() as connection:
        rows = connection.execute(
            select(queries).where(queries.c.site_id == site_id,
                                  queries.c.status.in_(("open", "answered")),
                                  queries.c.opened_at <= late)
            .order_by(queries.c.opened_at)).all()
    if not rows or site is None:
        return None
    language = _language(t, site_id)
    listed = [{"participant_id": r.participant_id, "status": r.status,
               "days_open": (now - as_utc(r.opened_at)).days, "target": r.target,
               "text": r.thread[0]["text"]} for r in rows]
    context = {"study": t.protocol.title, "site_name": site.name, "queries": listed,
               "visit_names": _visit_names(t, language)}
    return Email(
        to=(site.coordinator_email,),
        subject=SUBJECTS[DIGEST][language].format(n=len(listed), site=site.name),
        text=TEMPLATES.get_template(f"query_digest_{language}.txt").render(context),
        html=TEMPLATES.get_template(f"query_digest_{language}.html").render(context),
    )

