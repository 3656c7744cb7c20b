"""Visit reminders: a scan turns due reminders into outbox rows; sending one emails the
participant (in their language) and the site coordinator, then records ReminderSent.

At most one ReminderSent per (participant, visit, kind): the outbox row is locked while it
is sent, and ReminderSent and the row's new status commit together. A sender killed
mid-send leaves the row pending, and the next attempt sends it again.
"""

from __future__ import annotations

import logging
import smtplib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import NAMESPACE_URL, uuid5

import kombu.exceptions
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from sqlalchemy import insert, select, update

from domain import commands as c
from domain.participant import ACTIVE, Participant
from domain.schedule import reminder_due, scheduled_visit
from infrastructure.bootstrap import Trialog
from infrastructure.projections import TrialProjection
from infrastructure.tables import outbox, positions, reminder_schedule

log = logging.getLogger("trialog.reminders")
ACTOR = "reminder-worker"
REENQUEUE_AFTER = timedelta(minutes=5)
TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=select_autoescape(["html"]), undefined=StrictUndefined,
    keep_trailing_newline=True,
)
SUBJECTS = {"en": "Reminder: your {visit} visit", "es": "Recordatorio: su visita {visit}"}
VISIT_NAMES = {
    "en": {"baseline": "baseline", "week6": "week 6", "end_of_treatment": "end-of-treatment",
           "follow_up": "follow-up"},
    "es": {"baseline": "inicial", "week6": "de la semana 6",
           "end_of_treatment": "de fin de tratamiento", "follow_up": "de seguimiento"},
}


class PermanentMailError(Exception):
    """The server refused the message for good (5xx): recorded, not retried."""


class TransientMailError(Exception):
    """The server could not take the message now: retried with backoff."""


# --- scanning ----------------------------------------------------------------------------

def scan(t: Trialog, today: date, enqueue: Callable[[str], None] | None = None) -> list[str]:
    """Writes an outbox row for each reminder due ``today`` that has none, in one
    transaction with the read models' position; then hands pending rows to ``enqueue``.
    Returns the new rows' ids.

    Only what can have become due since the last scan is looked at: reminders due after
    the last scan's day, and schedule rows written since its position."""
    s = reminder_schedule
    now = datetime.now(UTC)
    with t.service.recorder.transaction(commit=True) as session:  # type: ignore[attr-defined]
        position = TrialProjection(t).position()
        last_day, last_position = _last_scan(session)
        since = s.c.due_on > last_day if last_day else s.c.due_on.is_not(None)
        due = (
            select(s.c.reminder_id, s.c.participant_id, s.c.visit, s.c.kind, s.c.due_on)
            .outerjoin(outbox, outbox.c.reminder_id == s.c.reminder_id)
            .where(s.c.due_on <= today, s.c.until >= today, outbox.c.reminder_id.is_(None),
                   since | (s.c.position > last_position))
        )
        rows = session.execute(due).all()
        if rows:
            session.execute(insert(outbox), [
                {"reminder_id": r.reminder_id, "participant_id": r.participant_id,
                 "visit": r.visit, "kind": r.kind, "due_on": r.due_on, "status": "pending",
                 "attempts": 0, "scan_position": position, "created_at": now}
                for r in rows])
        _record(session, "reminder_scan", position, now)
        _record(session, "reminder_scan_day", today.toordinal(), now)
    if enqueue is not None:
        hand_over(t, enqueue)
    return [r.reminder_id for r in rows]


def _last_scan(session: Any) -> tuple[date | None, int]:
    found = dict(session.execute(select(positions.c.name, positions.c.position).where(
        positions.c.name.in_(("reminder_scan", "reminder_scan_day")))).all())
    day = found.get("reminder_scan_day")
    return (date.fromordinal(day) if day else None), int(found.get("reminder_scan", -1))


def _record(session: Any, name: str, value: int, now: datetime) -> None:
    updated = session.execute(update(positions).where(positions.c.name == name)
                              .values(position=value, updated_at=now))
    if updated.rowcount == 0:
        session.execute(insert(positions).values(name=name, position=value, updated_at=now))


def hand_over(t: Trialog, enqueue: Callable[[str], None]) -> int:
    """Enqueues pending rows not enqueued yet (or long ago: the broker may have lost
    them); a broker that is down leaves them for the next scan."""
    stale = datetime.now(UTC) - REENQUEUE_AFTER
    with t.engine.connect() as connection:
        ids = list(connection.execute(select(outbox.c.reminder_id).where(
            outbox.c.status == "pending",
            (outbox.c.enqueued_at.is_(None)) | (outbox.c.enqueued_at < stale))).scalars())
    handed: list[str] = []
    for reminder_id in ids:
        try:
            enqueue(reminder_id)
        except (OSError, kombu.exceptions.OperationalError) as e:
            # The broker is unreachable: commands go on, the rows wait for the next scan.
            log.warning("could not enqueue reminders; they stay pending",
                        extra={"error": str(e), "pending": len(ids) - len(handed)})
            break
        handed.append(reminder_id)
    if handed:
        with t.engine.begin() as connection:
            connection.execute(update(outbox).where(outbox.c.reminder_id.in_(handed))
                               .values(enqueued_at=datetime.now(UTC)))
    return len(handed)


# --- sending -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Email:
    to: tuple[str, ...]
    subject: str
    text: str
    html: str


class Mailer:
    """SMTP with the standard library (``smtp://host:port``); one connection is kept and
    reused for the next message, and opened again when the server has closed it."""

    def __init__(self, url: str, sender: str, timeout: float = 30) -> None:
        parts = urlsplit(url)
        if parts.scheme != "smtp" or not parts.hostname:
            raise ValueError("TRIALOG_SMTP_URL: must be smtp://host:port")
        self.host, self.port = parts.hostname, parts.port or 25
        self.sender, self.timeout = sender, timeout
        self._smtp: smtplib.SMTP | None = None

    def send(self, email: Email) -> None:
        message = EmailMessage()
        message["From"], message["To"] = self.sender, ", ".join(email.to)
        message["Subject"] = email.subject
        message.set_content(email.text)
        message.add_alternative(email.html, subtype="html")
        try:
            self._deliver(message)
        except smtplib.SMTPRecipientsRefused as e:
            codes = [code for code, _ in e.recipients.values()]
            if all(code >= 500 for code in codes):
                raise PermanentMailError(f"recipients refused: {e.recipients}") from None
            raise TransientMailError(f"recipients deferred: {e.recipients}") from None
        except smtplib.SMTPResponseException as e:
            error = PermanentMailError if e.smtp_code >= 500 else TransientMailError
            raise error(f"{e.smtp_code} {e.smtp_error!r}") from None
        except (smtplib.SMTPException, OSError) as e:
            self.close()
            raise TransientMailError(str(e) or type(e).__name__) from None

    def _deliver(self, message: EmailMessage) -> None:
        for attempt in (1, 2):
            if self._smtp is None:
                self._smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
            try:
                self._smtp.send_message(message)
                return
            except smtplib.SMTPServerDisconnected:
                self._smtp = None  # closed while idle: one new connection, then give up
                if attempt == 2:
                    raise
            except smtplib.SMTPRecipientsRefused:
                self._smtp.rset()
                raise

    def close(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (smtplib.SMTPException, OSError):
                pass
            self._smtp = None


def compose(t: Trialog, participant: Participant, visit: str, kind: str) -> Email:
    """The reminder in the participant's language, to them and their site coordinator."""
    language = participant.screening["language"]
    if language not in SUBJECTS:
        language = "en"
    protocol_visit = t.protocol.visit(visit)
    if participant.registered_on is None or protocol_visit is None:
        raise ValueError(f"{participant.participant_id} has no {visit} visit scheduled")
    scheduled = scheduled_visit(protocol_visit, participant.registered_on)
    site = t.protocol.site(participant.site_id)
    coordinator = site.coordinator_email if site else ""
    context = {
        "study": t.protocol.title, "visit_name": VISIT_NAMES[language].get(visit, visit),
        "kind": kind, "target": scheduled.target, "window_start": scheduled.window_start,
        "window_end": scheduled.window_end, "site_name": site.name if site else "",
        "coordinator": coordinator,
    }
    recipients = tuple(a for a in (participant.screening.get("email"), coordinator) if a)
    return Email(
        to=recipients,
        subject=SUBJECTS[language].format(visit=context["visit_name"]),
        text=TEMPLATES.get_template(f"reminder_{language}.txt").render(context),
        html=TEMPLATES.get_template(f"reminder_{language}.html").render(context),
    )


def still_due(t: Trialog, participant: Participant, visit: str, kind: str,
              today: date) -> bool:
    """False when the schedule changed since the scan: withdrawn, visit done or missed,
    window closed."""
    if participant.status not in ACTIVE or participant.registered_on is None:
        return False
    if visit in participant.completed_visits() or visit in participant.missed_visits:
        return False
    protocol_visit = t.protocol.visit(visit)
    offset = next((o for o in t.protocol.reminders if o.kind == kind), None)
    if protocol_visit is None or offset is None:
        return False
    scheduled = scheduled_visit(protocol_visit, participant.registered_on)
    return reminder_due(scheduled, offset) <= today <= scheduled.window_end


def send(t: Trialog, mailer: Mailer, reminder_id: str, today: date) -> str:
    """Sends one outbox row; what happened: sent, recorded_before, cancelled, done, failed."""
    try:
        with t.service.recorder.transaction(commit=True) as session:  # type: ignore[attr-defined]
            row = session.execute(select(outbox).where(outbox.c.reminder_id == reminder_id)
                                  .with_for_update()).first()
            if row is None or row.status != "pending":
                return "done"
            participant = t.service.get_participant(row.participant_id)
            outcome = _deliver(t, mailer, row, participant, today)
            session.execute(update(outbox).where(outbox.c.reminder_id == reminder_id).values(
                status="cancelled" if outcome == "cancelled" else "sent",
                attempts=row.attempts + 1, sent_at=datetime.now(UTC)))
            return outcome
    except PermanentMailError as e:
        _note_failure(t, reminder_id, str(e), "failed")
        log.warning("reminder refused for good", extra={"reminder_id": reminder_id,
                                                         "error": str(e)})
        return "failed"
    except TransientMailError as e:
        _note_failure(t, reminder_id, str(e), "pending")
        raise


def _deliver(t: Trialog, mailer: Mailer, row: Any, participant: Participant,
             today: date) -> str:
    if f"{row.visit}/{row.kind}" in participant.reminders:
        return "recorded_before"  # sent and recorded by an attempt whose row update was lost
    if not still_due(t, participant, row.visit, row.kind, today):
        return "cancelled"
    email = compose(t, participant, row.visit, row.kind)
    mailer.send(email)
    t.bus.dispatch(
        c.RecordReminderSent(row.participant_id, {"visit": row.visit, "kind": row.kind,
                                                  "recipients": list(email.to)}),
        command_id=str(uuid5(NAMESPACE_URL, f"trialog:reminder-sent:{row.reminder_id}")),
        actor=ACTOR,
    )
    return "sent"


def _note_failure(t: Trialog, reminder_id: str, error: str, status: str) -> None:
    with t.engine.begin() as connection:
        connection.execute(update(outbox).where(outbox.c.reminder_id == reminder_id).values(
            status=status, attempts=outbox.c.attempts + 1, last_error=error[:2000]))
