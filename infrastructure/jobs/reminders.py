"""Visit reminders: a scan turns due reminders into outbox rows; sending one emails the
participant (in their language) and the site coordinator, then records ReminderSent.

An outbox row goes from pending to mailed (the SMTP server took the message) to sent
(ReminderSent recorded), or to cancelled (no longer due), expired (more than a day late) or
failed (an address no server will take, with the reason). No database transaction or row
lock is held while SMTP talks: a sender has a row to itself by a PostgreSQL session lock,
which ends with the sender or with its connection if it dies. The row is marked mailed in
a transaction of its own before ReminderSent is written, so an attempt that fails to
record the event (a write conflict the command bus could not get past, a lost database)
leaves a row the next attempt records without emailing again. A sender killed while SMTP
talks leaves the row pending and the next attempt sends it again: the email is at least
once, ReminderSent exactly once. Addresses appear masked in logs and in ``last_error``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import smtplib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import NAMESPACE_URL, uuid5

import kombu.exceptions
import sqlalchemy.exc
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from sqlalchemy import Connection, insert, select, text, update

from domain import commands as c
from domain.participant import ACTIVE, Participant
from domain.schedule import reminder_due, scheduled_visit
from infrastructure.logs import mask_email, mask_emails_in
from infrastructure.readside.projections import TrialProjection
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.outages import is_unavailable
from infrastructure.store.tables import outbox, positions, reminder_schedule

log = logging.getLogger("trialog.reminders")
ACTOR = "reminder-worker"
REENQUEUE_AFTER = timedelta(minutes=5)
LATE_BY_AT_MOST = timedelta(days=1)
TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=select_autoescape(["html"]), undefined=StrictUndefined,
    keep_trailing_newline=True,
)
SUBJECTS = {"en": "Reminder: your {visit} visit", "es": "Recordatorio: su visita {visit}"}
# One mailbox, nothing else: no display name, no second address, no line break (a header
# injection), no space.
ADDRESS = re.compile(r"[^\s@<>()\[\],;:\"]+@[^\s@<>()\[\],;:\"]+")


class PermanentMailError(Exception):
    """The message can never be sent as it is (5xx, a malformed address): recorded as
    failed, not retried."""


class TransientMailError(Exception):
    """The server could not take the message now: retried with backoff."""


class ReminderBusy(Exception):
    """Another sender has this reminder now: tried again later."""


def expired(due_on: date, today: date) -> bool:
    """A reminder more than a day past its due day is not sent: what it says ("in three
    days", "from today") and when it would arrive no longer help the participant."""
    return today - due_on > LATE_BY_AT_MOST


# --- scanning ----------------------------------------------------------------------------

def scan(t: Trialog, today: date, enqueue: Callable[[str], None] | None = None) -> list[str]:
    """Writes an outbox row for each reminder due ``today`` that has none, in one
    transaction with the read models' position; then hands pending rows to ``enqueue``.
    Returns the ids of the new rows to send (one found too late is written expired).

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
                 "visit": r.visit, "kind": r.kind, "due_on": r.due_on,
                 "status": "expired" if expired(r.due_on, today) else "pending",
                 "attempts": 0, "scan_position": position, "created_at": now}
                for r in rows])
        _record(session, "reminder_scan", position, now)
        _record(session, "reminder_scan_day", today.toordinal(), now)
    if enqueue is not None:
        hand_over(t, enqueue)
    return [r.reminder_id for r in rows if not expired(r.due_on, today)]


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
    """Enqueues pending rows (and mailed ones, whose ReminderSent is still to record) not
    enqueued yet or long ago (the broker may have lost them); a broker that is down leaves
    them for the next scan."""
    stale = datetime.now(UTC) - REENQUEUE_AFTER
    with t.engine.connect() as connection:
        ids = list(connection.execute(select(outbox.c.reminder_id).where(
            outbox.c.status.in_(("pending", "mailed")),
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
        self.domain = parseaddr(sender)[1].rpartition("@")[2] or "trialog.localhost"
        self._smtp: smtplib.SMTP | None = None

    def send(self, email: Email) -> list[str]:
        """Sends ``email``; returns the recipients the server refused while it took the
        message for the others (masked, each with the server's reply)."""
        message = self.message(email)
        try:
            refused = self._deliver(message)
        except smtplib.SMTPRecipientsRefused as e:
            permanent = all(code >= 500 for code, _ in e.recipients.values())
            error = PermanentMailError if permanent else TransientMailError
            raise error("recipients refused: " + "; ".join(_refusals(e.recipients))) from None
        except smtplib.SMTPNotSupportedError as e:  # e.g. a non-ASCII address, no SMTPUTF8
            raise PermanentMailError(mask_emails_in(str(e))) from None
        except smtplib.SMTPResponseException as e:
            error = PermanentMailError if e.smtp_code >= 500 else TransientMailError
            raise error(f"{e.smtp_code} {_reply(e.smtp_error)}") from None
        except (smtplib.SMTPException, OSError) as e:
            self.close()
            raise TransientMailError(mask_emails_in(str(e)) or type(e).__name__) from None
        return _refusals(refused)

    def message(self, email: Email) -> EmailMessage:
        """The message, plain text and HTML, with its Date and Message-ID; an address that
        is not one mailbox (a line break would inject headers) is refused for good."""
        malformed = [mask_email(a) for a in email.to if not ADDRESS.fullmatch(a)]
        if malformed or not email.to:
            raise PermanentMailError(f"not an email address: {', '.join(malformed)}"
                                     if malformed else "no recipient address")
        message = EmailMessage()
        message["From"], message["To"] = self.sender, ", ".join(email.to)
        message["Subject"] = email.subject
        message["Date"] = formatdate(usegmt=True)
        message["Message-ID"] = make_msgid(domain=self.domain)
        message.set_content(email.text)
        message.add_alternative(email.html, subtype="html")
        return message

    def _deliver(self, message: EmailMessage) -> dict[str, tuple[int, bytes]]:
        for attempt in (1, 2):
            if self._smtp is None:
                self._smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
            try:
                return self._smtp.send_message(message)
            except smtplib.SMTPServerDisconnected:
                self._smtp = None  # closed while idle: one new connection, then give up
                if attempt == 2:
                    raise
            except smtplib.SMTPRecipientsRefused:
                self._smtp.rset()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (smtplib.SMTPException, OSError):
                pass
            self._smtp = None


def _refusals(recipients: dict[str, tuple[int, bytes]]) -> list[str]:
    return [f"{mask_email(address)} ({code} {_reply(reply)})"
            for address, (code, reply) in recipients.items()]


def _reply(reply: bytes | str) -> str:
    """A server's reply on one line, with any address in it masked."""
    said = reply.decode(errors="replace") if isinstance(reply, bytes) else reply
    return mask_emails_in(" ".join(said.split()))


def recipients(t: Trialog, participant: Participant) -> tuple[str, ...]:
    """The participant's address and their site coordinator's."""
    site = t.protocol.site(participant.site_id)
    coordinator = site.coordinator_email if site else ""
    return tuple(a for a in (participant.screening.get("email"), coordinator) if a)


def compose(t: Trialog, participant: Participant, visit: str, kind: str,
            today: date) -> Email:
    """The reminder in the participant's language, to them and their site coordinator, as
    true on ``today`` (the day it is sent) as on the day it was due."""
    language = participant.screening["language"]
    if language not in SUBJECTS:
        language = "en"
    protocol_visit = t.protocol.visit(visit)
    if participant.registered_on is None or protocol_visit is None:
        raise ValueError(f"{participant.participant_id} has no {visit} visit scheduled")
    scheduled = scheduled_visit(protocol_visit, participant.registered_on)
    site = t.protocol.site(participant.site_id)
    context = {
        "study": t.protocol.title, "visit_name": protocol_visit.name_in(language),
        "kind": kind, "target": scheduled.target, "window_start": scheduled.window_start,
        "window_end": scheduled.window_end, "site_name": site.name if site else "",
        "coordinator": site.coordinator_email if site else "", "sent_on": today,
        "days_left": (scheduled.target - today).days,
    }
    return Email(
        to=recipients(t, participant),
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
    """Sends one outbox row; what happened: sent, recorded_before, cancelled, expired,
    failed, or done (nothing left to do). Raises ReminderBusy while another sender has the
    row, TransientMailError when the server cannot take the message now."""
    with _alone_with(t, reminder_id) as connection:
        if connection is None:
            raise ReminderBusy(f"reminder {reminder_id} is being sent by another worker")
        row = connection.execute(
            select(outbox).where(outbox.c.reminder_id == reminder_id)).first()
        if row is None or row.status not in ("pending", "mailed"):
            return "done"
        try:
            participant = t.service.get_participant(row.participant_id)
        except Exception as e:
            if is_unavailable(e):
                raise
            error = mask_emails_in(f"the participant's record can't be read: {e!r}")
            _mark(connection, row, "failed", error=error)
            log.warning("reminder failed", extra={"reminder_id": reminder_id, "error": error})
            return "failed"
        if row.status == "mailed":  # the server took it: only ReminderSent is missing
            _record_sent(t, connection, row, recipients(t, participant))
            return "sent"
        outcome = _check(t, row, participant, today)
        if outcome != "due":
            _mark(connection, row, "sent" if outcome == "recorded_before" else outcome)
            return outcome
        return _mail(t, connection, mailer, row, compose(
            t, participant, row.visit, row.kind, today))


def _check(t: Trialog, row: Any, participant: Participant, today: date) -> str:
    if f"{row.visit}/{row.kind}" in participant.reminders:
        return "recorded_before"  # sent and recorded by an attempt whose row update was lost
    if not still_due(t, participant, row.visit, row.kind, today):
        return "cancelled"
    if expired(row.due_on, today):
        return "expired"
    return "due"


def _mail(t: Trialog, connection: Connection, mailer: Mailer, row: Any, email: Email) -> str:
    try:
        refused = mailer.send(email)
    except PermanentMailError as e:
        _mark(connection, row, "failed", attempted=True, error=str(e))
        log.warning("reminder cannot be sent; marked failed",
                    extra={"reminder_id": row.reminder_id, "error": str(e)})
        return "failed"
    except TransientMailError as e:
        _mark(connection, row, "pending", attempted=True, error=str(e))
        raise
    note = "recipients refused: " + "; ".join(refused) if refused else None
    _mark(connection, row, "mailed", attempted=True, error=note, sent_at=datetime.now(UTC))
    if note:
        log.warning("reminder sent; some recipients refused",
                    extra={"reminder_id": row.reminder_id, "error": note})
    _record_sent(t, connection, row, email.to)
    return "sent"


def _record_sent(t: Trialog, connection: Connection, row: Any, to: tuple[str, ...]) -> None:
    """ReminderSent in a transaction of its own, which the command bus retries (tenacity)
    in a fresh one on a write conflict; then the row is sent. Never emails."""
    t.bus.dispatch(
        c.RecordReminderSent(row.participant_id, {"visit": row.visit, "kind": row.kind,
                                                  "recipients": list(to)}),
        command_id=str(uuid5(NAMESPACE_URL, f"trialog:reminder-sent:{row.reminder_id}")),
        actor=ACTOR,
    )
    _mark(connection, row, "sent")


def _mark(connection: Connection, row: Any, status: str, *, attempted: bool = False,
          error: str | None = None, sent_at: datetime | None = None) -> None:
    """The row's new status, committed at once (the connection commits each statement)."""
    values: dict[str, Any] = {"status": status}
    if attempted:
        values["attempts"] = outbox.c.attempts + 1
    if error:
        values["last_error"] = error[:2000]
    if sent_at:
        values["sent_at"] = sent_at
    connection.execute(update(outbox).where(outbox.c.reminder_id == row.reminder_id)
                       .values(**values))


@contextmanager
def _alone_with(t: Trialog, reminder_id: str) -> Iterator[Connection | None]:
    """A connection on which each statement commits by itself, so that no transaction stays
    open while SMTP talks; None when another sender has the reminder. On PostgreSQL the
    connection holds a session lock on the reminder, gone with the connection if the sender
    dies; SQLite has one writer and no such lock."""
    with t.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        if t.engine.dialect.name != "postgresql":
            yield connection
            return
        digest = hashlib.blake2b(f"trialog:reminder:{reminder_id}".encode(), digest_size=8)
        key = {"key": int.from_bytes(digest.digest(), "big", signed=True)}
        if not connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), key):
            yield None
            return
        try:
            yield connection
        finally:
            try:
                connection.scalar(text("SELECT pg_advisory_unlock(:key)"), key)
            except sqlalchemy.exc.DBAPIError:
                connection.invalidate()  # a closed session holds no lock
