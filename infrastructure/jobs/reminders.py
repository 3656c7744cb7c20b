"""Visit reminders: a scan turns due reminders into outbox rows; sending one emails the
participant (in their language) and the site coordinator, then records ReminderSent.

An outbox row goes from pending to sending (just before SMTP talks, with the time and the
message's Message-ID, committed waiting for the disk, and only if the row is still as it
was read) to mailed (the SMTP server took the message) to sent (ReminderSent recorded), or
to cancelled (no longer due), expired (more than a day late) or failed (an address no
server will take, with the reason); or, when it falls due later than the row says (the
registration corrected to a later day since the scan), to rescheduled, then pending again
from the first scan on or after its new day (cancelled if none is owed any more). No
database transaction or row lock is held while SMTP talks: a sender has a row to itself by
a PostgreSQL session lock, which ends with the sender or with its connection if it dies.

At most one email a reminder: a row found sending (its sender was killed, or lost its
database, while SMTP talked) and one whose connection failed after the message's content
went out, before the server's reply, may have been emailed; each is marked uncertain, with
why, never emailed again, and nothing is recorded for it until a person resolves it from
the SMTP server's log (``resolve``: sent, and its ReminderSent is recorded; or not, and
it is pending again). The row is marked mailed in a transaction of its own before
ReminderSent is written, so an attempt that fails to record the event (a write conflict
the command bus could not get past, a lost database) leaves a row the next attempt records
without emailing again: ReminderSent at most once, and exactly once for every email known
to have gone. The marks but sending are committed without waiting for the disk (see
``_marks_not_waiting``); sending's commit waits, and makes those before it durable too.
Addresses appear masked in logs, in ``last_error`` and in what ``shown`` gives.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import re
import smtplib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email import policy
from email.header import Header
from email.message import EmailMessage
from email.utils import formataddr, formatdate, make_msgid, parseaddr
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID, uuid4

import kombu.exceptions
import sqlalchemy.exc
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from sqlalchemy import Connection, bindparam, func, insert, select, true, update
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random

from domain import commands as c
from domain.participant import ACTIVE, Participant
from domain.protocol import Protocol
from domain.schedule import reminder_due, scheduled_visit
from infrastructure.jobs import query_notices
from infrastructure.logs import mask_email, mask_emails_in
from infrastructure.readside.projections import TrialProjection
from infrastructure.store import locks
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.bus import WRITE_CONFLICTS, Accepted, Intent
from infrastructure.store.outages import is_unavailable
from infrastructure.store.stored import decrypt, encrypt, load_apart
from infrastructure.store.tables import (
    as_utc,
    outbox,
    participants,
    positions,
    reminder_schedule,
    set_position,
)

log = logging.getLogger("trialog.reminders")
# The statuses of rows a sender still has something to do for: email (pending), record
# ReminderSent (mailed), or find what became of (sending: its sender stopped).
TO_DO = ("pending", "mailed", "sending")
# A row whose reminder falls due later than it says (the registration corrected to a later
# day since the scan): kept as it is, and pending again when the scan reaches its new day.
RESCHEDULED = "rescheduled"
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
SUBJECT_POLICY = policy.SMTP.clone(refold_source="all")  # an ASCII subject's folding
ADDRESS = re.compile(r"[^\s@<>()\[\],;:\"]+@[^\s@<>()\[\],;:\"]+")


class PermanentMailError(Exception):
    """The message can never be sent as it is (5xx, a malformed address): recorded as
    failed, not retried."""


class TransientMailError(Exception):
    """The server could not take the message now: retried with backoff."""


class ServerUnavailable(TransientMailError):
    """The server can't be talked to now (the connection refused or lost before the
    message's content, or a 421): it takes no message, so a chunk ends at once."""


class RecipientDeferred(Exception):
    """The addressee's server refused them for now (a 4xx to their address: greylisting,
    a full mailbox): the message went to no one, and its row waits for a later scan
    (every REENQUEUE_AFTER, until the reminder expires), while the rows after it go on."""


class UncertainMailError(Exception):
    """The connection failed once the message had gone out and before the server said
    whether it took it: it may have. Never sent again (at most one email)."""


class ReminderBusy(Exception):
    """Another sender has this reminder now: tried again later."""


@dataclass(frozen=True)
class Today:
    """The day it is at each site, by the site's time zone (UTC for a site the protocol
    doesn't list): a visit reminder falls due, counts its days and expires by its
    participant's site's calendar, so a site west of UTC gets it on its due day, not the
    evening before, and a query digest's week is its site's. ``Today.of(t)`` is now by the
    clock the events are recorded by; a plain date (a day named by hand) is that day at
    every site."""

    protocol: Protocol
    now: datetime | None = None
    day: date | None = None

    @classmethod
    def of(cls, t: Trialog) -> Today:
        return cls(t.protocol, now=t.bus.clock())

    def at(self, site_id: str | None) -> date:
        if self.now is None:
            assert self.day is not None
            return self.day
        return self.protocol.day_at(site_id, self.now)

    def span(self) -> tuple[date, date]:
        """The earliest and the latest of the sites' days (UTC's among them)."""
        if self.now is None:
            assert self.day is not None
            return self.day, self.day
        return self.protocol.day_span(self.now)


def _days(t: Trialog, today: Today | date) -> Today:
    return today if isinstance(today, Today) else Today(t.protocol, day=today)


def expired(due_on: date, today: date) -> bool:
    """A reminder more than a day past its due day is not sent: what it says ("in three
    days", "from today") and when it would arrive no longer help the participant."""
    return today - due_on > LATE_BY_AT_MOST


# --- scanning ----------------------------------------------------------------------------

def scan(t: Trialog, today: Today | date, enqueue: Callable[[Any], None] | None = None,
         chunk: int = 1) -> list[str]:
    """Writes an outbox row for each reminder due ``today`` (its site's day) that has
    none, in one transaction with the read models' position, and makes rescheduled rows
    pending again once due (``_due_again``); then hands pending rows to ``enqueue``.
    Returns the ids of the rows to send (one found too late is written expired).

    Only what can have become due since the last scan is looked at for new rows:
    reminders due after the last scan's earliest day, and schedule rows written since its
    position."""
    days = _days(t, today)
    # Two scans at once (beat's and one by hand) may both find a reminder without a row:
    # the second's insert conflicts, and its scan again finds the row written.
    for attempt in Retrying(retry=retry_if_exception_type(WRITE_CONFLICTS),
                            stop=stop_after_attempt(3), wait=wait_random(0, 0.05),
                            reraise=True):
        with attempt:
            new, again, notices = _write_rows(t, days)
    if enqueue is not None:
        hand_over(t, enqueue, chunk)
    return ([r["reminder_id"] for r in new if r["status"] == "pending"] + again
            + [n["reminder_id"] for n in notices])


def _write_rows(t: Trialog, days: Today
                ) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]]]:
    """The scan's transaction: the outbox rows written for the due reminders found, the
    rows due again, and the query notices written."""
    s = reminder_schedule
    now = datetime.now(UTC)
    earliest, latest = days.span()
    with t.service.recorder.transaction(commit=True) as session:  # type: ignore[attr-defined]
        position = TrialProjection(t).position()
        last_day, last_position = _last_scan(session)
        if position < last_position:
            # The read models are being rebuilt (`projections rebuild`, migration 0032):
            # what they hold yet is a record as it stood before, whose due days and
            # queries may since have changed. Nothing is decided on it until they are back.
            log.warning("reminder scan: the read models are at %s, behind the last scan's "
                        "%s (being rebuilt); nothing new is decided until they are back",
                        position, last_position)
            return [], [], []
        since = s.c.due_on > last_day if last_day else s.c.due_on.is_not(None)
        due = (
            select(s.c.reminder_id, s.c.participant_id, s.c.visit, s.c.kind, s.c.due_on,
                   s.c.until, participants.c.site_id)
            .outerjoin(outbox, outbox.c.reminder_id == s.c.reminder_id)
            .outerjoin(participants, participants.c.participant_id == s.c.participant_id)
            .where(s.c.due_on <= latest, s.c.until >= earliest,
                   outbox.c.reminder_id.is_(None), since | (s.c.position > last_position))
        )
        new = []
        for r in session.execute(due):
            today = days.at(r.site_id)
            if r.due_on <= today <= r.until:  # by its site's calendar
                new.append({"reminder_id": r.reminder_id, "participant_id": r.participant_id,
                            "visit": r.visit, "kind": r.kind, "due_on": r.due_on,
                            "status": "expired" if expired(r.due_on, today) else "pending",
                            "attempts": 0, "scan_position": position, "created_at": now,
                            "query_id": None})
        again = _due_again(session, days)
        notices = query_notices.outbox_rows(t, session, days.at, now, position)
        if new or notices:  # in one order, so two scans at once can't deadlock
            session.execute(insert(outbox), sorted(new + notices,
                                                   key=lambda r: r["reminder_id"]))
        # Never lowered, though two scans at once commit in either order: see above.
        set_position(session, "reminder_scan", position, updated_at=now, only_up=True)
        # The earliest site's day: a reminder not due at a site then is due after it.
        set_position(session, "reminder_scan_day", earliest.toordinal(), updated_at=now)
    return new, again, notices


def _due_again(session: Any, days: Today) -> list[str]:
    """The rows set aside as rescheduled, looked at by every scan: pending again with their
    new due day once it has come at their site (expired when that was more than a day
    ago), cancelled once no reminder is owed (the schedule's row gone: withdrawn, the visit
    done or missed) or its window has closed unsent. The ids of those to send."""
    s = reminder_schedule
    rows = session.execute(
        select(outbox.c.reminder_id, s.c.due_on, s.c.until, participants.c.site_id)
        .outerjoin(s, s.c.reminder_id == outbox.c.reminder_id)
        .outerjoin(participants, participants.c.participant_id == outbox.c.participant_id)
        .where(outbox.c.status == RESCHEDULED)).all()
    again = []
    for row in rows:
        today = days.at(row.site_id)
        if row.due_on is not None and row.due_on > today:
            continue  # not yet
        if row.due_on is None or row.until < today:
            values: dict[str, Any] = {"status": "cancelled"}
        elif expired(row.due_on, today):
            values = {"status": "expired", "due_on": row.due_on}
        else:
            values = {"status": "pending", "due_on": row.due_on, "enqueued_at": None}
            again.append(row.reminder_id)
        session.execute(update(outbox).where(outbox.c.reminder_id == row.reminder_id,
                                             outbox.c.status == RESCHEDULED).values(**values))
    return again


def _last_scan(session: Any) -> tuple[date | None, int]:
    found = dict(session.execute(select(positions.c.name, positions.c.position).where(
        positions.c.name.in_(("reminder_scan", "reminder_scan_day")))).all())
    day = found.get("reminder_scan_day")
    return (date.fromordinal(day) if day else None), int(found.get("reminder_scan", -1))


def hand_over(t: Trialog, enqueue: Callable[[Any], None], chunk: int = 1) -> int:
    """Enqueues pending rows (and mailed ones, whose ReminderSent is still to record, and
    sending ones long after sending began: their sender stopped) not enqueued yet or long
    ago (the broker may have lost them), one id at a time or lists of ``chunk`` ids; a
    broker that is down leaves them for the next scan."""
    stale = datetime.now(UTC) - REENQUEUE_AFTER
    with t.engine.connect() as connection:
        ids = list(connection.execute(select(outbox.c.reminder_id).where(
            outbox.c.status.in_(TO_DO),
            (outbox.c.enqueued_at.is_(None)) | (outbox.c.enqueued_at < stale),
            # A row sending is looked at once its sender has had long enough.
            (outbox.c.status != "sending") | outbox.c.sending_at.is_(None)
            | (outbox.c.sending_at < stale))).scalars())
    handed: list[str] = []
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        try:
            enqueue(part if chunk > 1 else part[0])
        except (OSError, kombu.exceptions.OperationalError) as e:
            # The broker is unreachable: commands go on, the rows wait for the next scan.
            log.warning("could not enqueue reminders; they stay pending",
                        extra={"error": str(e), "pending": len(ids) - len(handed)})
            break
        handed += part
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
        if "\r" in sender or "\n" in sender:
            raise ValueError("TRIALOG_MAIL_FROM: must be on one line")
        name, address = parseaddr(sender)
        self.domain = address.rpartition("@")[2] or "trialog.localhost"
        self.from_header = formataddr((name, address), charset="utf-8") or sender
        self.envelope_from = address or sender
        self._smtp: smtplib.SMTP | None = None
        self.taken = 0  # the messages the server has taken (for one recipient or more)

    def send(self, email: Email, message: bytes | EmailMessage | None = None
             ) -> dict[str, tuple[int, bytes]]:
        """Sends ``email`` (as ``message``, when it is written already); returns the
        recipients the server refused while it took the message for the others, each with
        the server's reply."""
        if message is None:
            message = self.message(email)
        try:
            refused = self._deliver(message, email.to)
        except _Deferred as e:
            raise RecipientDeferred("recipient refused for now: "
                                    + "; ".join(_refusals(e.recipients))) from None
        except smtplib.SMTPRecipientsRefused as e:
            codes = [code for code, _ in e.recipients.values()]
            error = (PermanentMailError if all(code >= 500 for code in codes)
                     else ServerUnavailable if 421 in codes else TransientMailError)
            raise error("recipients refused: " + "; ".join(_refusals(e.recipients))) from None
        except smtplib.SMTPNotSupportedError as e:  # e.g. a non-ASCII address, no SMTPUTF8
            raise PermanentMailError(mask_emails_in(str(e))) from None
        except _Unreadable as e:  # before the message's content (after: uncertain)
            self.close()
            raise PermanentMailError(mask_emails_in(str(e))) from None
        except smtplib.SMTPResponseException as e:
            error = (PermanentMailError if e.smtp_code >= 500
                     else ServerUnavailable if e.smtp_code == 421 else TransientMailError)
            raise error(f"{e.smtp_code} {_reply(e.smtp_error)}") from None
        except (smtplib.SMTPException, OSError) as e:
            self.close()
            raise ServerUnavailable(mask_emails_in(str(e)) or type(e).__name__) from None
        self.taken += 1
        return refused

    def message(self, email: Email, message_id: str | None = None) -> bytes | EmailMessage:
        """The message, plain text and HTML, with its Date and Message-ID (``message_id``,
        or a new one); an address that is not one mailbox (a line break would inject
        headers) is refused for good."""
        message_id = message_id or self.new_message_id()
        malformed = [mask_email(a) for a in email.to if not ADDRESS.fullmatch(a)]
        if malformed or not email.to:
            raise PermanentMailError(f"not an email address: {', '.join(malformed)}"
                                     if malformed else "no recipient address")
        subject = " ".join(email.subject.split())  # on one line: no header injected
        if not self._ascii_envelope(email.to):
            # An address beyond ASCII goes with SMTPUTF8, which the standard library
            # sends only for an EmailMessage.
            international = EmailMessage()
            international["From"], international["To"] = self.sender, ", ".join(email.to)
            international["Subject"] = subject
            international["Date"] = formatdate(usegmt=True)
            international["Message-ID"] = message_id
            international.set_content(email.text)
            international.add_alternative(email.html, subtype="html")
            return international
        return self._ascii_message(email, subject, message_id)

    def new_message_id(self) -> str:
        return make_msgid(domain=self.domain)

    def _ascii_message(self, email: Email, subject: str, message_id: str) -> bytes:
        """The message's bytes as SMTP sends them: multipart/alternative, each part UTF-8
        in base64. Written out here because its shape never changes: the standard library's
        generator (header folding, a boundary checked against every part) was a third of a
        reminder's cost. The boundary needs no check: a delimiter line starts with two
        hyphens, which base64 never contains. Subject and To are folded at 78 columns; From
        is the setting's, on one line (a sender's name past some 60 characters makes it
        longer, as RFC 5322 allows up to 998)."""
        boundary = f"=_{uuid4().hex}"
        to = ", ".join(email.to)
        if len(to) > 70:  # folded between addresses (RFC 5322 lines of 78)
            to = ",\r\n ".join(email.to)
        head = (f"From: {self.from_header}\r\nTo: {to}\r\n"
                f"Subject: {_subject_header(subject)}\r\n"
                f"Date: {formatdate(usegmt=True)}\r\n"
                f"Message-ID: {message_id}\r\nMIME-Version: 1.0\r\n"
                f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"\r\n\r\n')
        parts = [head.encode("ascii")]
        for subtype, body in (("plain", email.text), ("html", email.html)):
            parts.append(f'--{boundary}\r\nContent-Type: text/{subtype}; charset="utf-8"\r\n'
                         "Content-Transfer-Encoding: base64\r\n\r\n".encode("ascii"))
            parts.append(base64.encodebytes(body.encode("utf-8")).replace(b"\n", b"\r\n"))
        parts.append(f"--{boundary}--\r\n".encode("ascii"))
        return b"".join(parts)

    def _ascii_envelope(self, to: tuple[str, ...]) -> bool:
        return self.envelope_from.isascii() and all(a.isascii() for a in to)

    def _deliver(self, message: bytes | EmailMessage,
                 to: tuple[str, ...]) -> dict[str, tuple[int, bytes]]:
        for attempt in (1, 2):
            if self._smtp is None:
                self._smtp = _SMTP(self.host, self.port, timeout=self.timeout)
            smtp = self._smtp
            smtp.content_sent = False
            smtp.addressee = to[0] if to else ""
            try:
                # The envelope as given, not parsed back out of the headers (an
                # EmailMessage goes with SMTPUTF8 if the server has it).
                if isinstance(message, EmailMessage):
                    return smtp.send_message(message, self.envelope_from, list(to))
                return smtp.sendmail(self.envelope_from, list(to), message)
            except smtplib.SMTPResponseException:
                raise  # the server's own answer: it did not take the message
            except smtplib.SMTPRecipientsRefused:
                try:
                    smtp.rset()
                except (smtplib.SMTPException, OSError):
                    self.close()  # the refusal stands; a new connection next time
                raise
            except (smtplib.SMTPException, OSError) as e:
                if smtp.content_sent:  # the server may have taken it: not sent again
                    self.close()
                    raise UncertainMailError(
                        mask_emails_in(str(e)) or type(e).__name__) from None
                if (not isinstance(e, smtplib.SMTPServerDisconnected)
                        or isinstance(e, _Unreadable) or attempt == 2):
                    raise  # (an unreadable reply: send closes the connection)
                self._smtp = None  # closed (while idle): one new connection, then give up
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (smtplib.SMTPException, OSError):
                pass
            self._smtp = None


class _Unreadable(smtplib.SMTPServerDisconnected):
    """smtplib's "500 Line too long.": a reply longer than it reads, the connection closed
    by smtplib itself. The server's answer went unread: after the message's content, it
    may have taken it; before, nothing went and the server can't be talked to (a
    permanent failure, as smtplib's 500 was); and smtplib's RSET after every recipient
    was refused passes over it, so the refusals stand."""

    def __init__(self, said: str) -> None:
        super().__init__(f"smtplib: {said} (a reply longer than it reads; the connection "
                         "closed)")


class _SMTP(smtplib.SMTP):
    """The standard library's client, telling whether the message's content has gone out
    (the server answered DATA with 354): a failure after that, before the server's reply,
    leaves it unknown whether the server took the message."""

    content_sent = False
    addressee = ""  # whom the message is for (the others get copies: a site coordinator)

    def rcpt(self, recip: str, options: Any = ()) -> tuple[int, bytes]:
        """The addressee refused for now (a 4xx to their address: greylisting, a full
        mailbox) stops the message before its content, for every recipient: it goes to
        all of them later (smtplib would send it to the copies and leave the addressee
        out for good). A copy's address refused is noted, and the others get it."""
        code, reply = super().rcpt(recip, options)
        if 400 <= code < 500 and code != 421 and recip == self.addressee:
            raise _Deferred({recip: (code, reply)})  # (421: smtplib ends the connection)
        return code, reply

    def getreply(self) -> tuple[int, bytes]:
        try:
            code, reply = super().getreply()
        except smtplib.SMTPResponseException as e:  # smtplib's own, not the server's
            raise _Unreadable(_reply(e.smtp_error)) from None
        if code == 354:
            self.content_sent = True
        return code, reply


class _Deferred(smtplib.SMTPRecipientsRefused):
    """The addressee refused for now (see _SMTP.rcpt); the transaction is reset."""


@functools.lru_cache(maxsize=256)
def _subject_header(subject: str) -> str:
    """A subject on one line as a header's value, folded at 78: in encoded words beyond
    ASCII (``Header``, whose folds keep every space; the newer policy's folding can put a
    fold between two encoded words where a space was, and readers drop it). Reminders
    share a few subjects, so each is folded once."""
    if not subject.isascii():
        return Header(subject, "utf-8", header_name="Subject").encode(linesep="\r\n")
    folded = SUBJECT_POLICY.fold("Subject", subject)
    return folded.removeprefix("Subject: ").removesuffix("\r\n")


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


def _owed(t: Trialog, participant: Participant, visit: str,
          kind: str) -> tuple[date, date] | None:
    """The reminder's due day and its visit window's last day as the record stands; None
    when none is owed (withdrawn, not randomized, the visit done or missed)."""
    if participant.status not in ACTIVE or participant.registered_on is None:
        return None
    if visit in participant.completed_visits() or visit in participant.missed_visits:
        return None
    protocol_visit = t.protocol.visit(visit)
    offset = next((o for o in t.protocol.reminders if o.kind == kind), None)
    if protocol_visit is None or offset is None:
        return None
    scheduled = scheduled_visit(protocol_visit, participant.registered_on)
    return reminder_due(scheduled, offset), scheduled.window_end


def send(t: Trialog, mailer: Mailer, reminder_id: str, today: Today | date) -> str:
    """Sends one outbox row; what happened: sent, recorded_before, cancelled, rescheduled
    (not due yet: see RESCHEDULED), expired, failed, uncertain (it may have gone, see the
    module's docstring), busy (another sender changed the row meanwhile, or, on SQLite,
    still has it sending), or done (nothing left to do). Raises ReminderBusy while another
    sender holds the row's lock (PostgreSQL), TransientMailError when the server cannot
    take the message now."""
    with _alone_with(t, reminder_id) as connection:
        if connection is None:
            raise ReminderBusy(f"reminder {reminder_id} is being sent by another worker")
        row = connection.execute(
            select(outbox).where(outbox.c.reminder_id == reminder_id)).first()
        if row is None or row.status not in TO_DO:
            return "done"
        outcome, to, _ = _one(t, connection, mailer, row, _days(t, today))
        if to is not None:
            _record_sent(t, connection, row, to)
        return outcome


def _one(t: Trialog, connection: Connection, mailer: Mailer, row: Any,
         days: Today) -> tuple[str, tuple[str, ...] | None, Participant | None]:
    """What became of one pending, sending or mailed row (sent, recorded_before, rescheduled,
    cancelled, expired, failed, uncertain, busy), and the recipients when its ReminderSent
    is still to record (the caller records it). A visit reminder, a raised query's email
    (keyed by the query id) and a weekly digest (no participant, its row is its record)
    all pass here. Also the participant as loaded (for the caller's ReminderSent)."""
    if row.status == "sending":
        if not _sender_stopped(connection, row):
            return "busy", None, None
        return _uncertain(connection, row, row.message_id, "the sender stopped while the "
                          "message was being sent; not sent again"), None, None
    if row.kind == query_notices.DIGEST:
        return _send_digest(t, connection, mailer, row), None, None
    try:
        participant = t.service.get_participant(row.participant_id)
    except Exception as e:
        if is_unavailable(e):
            raise
        error = mask_emails_in(f"the participant's record can't be read: {e!r}")
        _mark(connection, row, "failed", error=error)
        log.warning("reminder failed", extra={"reminder_id": row.reminder_id, "error": error})
        return "failed", None, None
    if row.status == "mailed":  # the server took it: at most ReminderSent is missing
        return _mailed(t, connection, row, participant)
    if row.kind == query_notices.RAISED:
        email = query_notices.raised_email(t, participant, row.query_id)
        if _recorded(row, participant):
            _mark(connection, row, "sent")
            return "recorded_before", None, None
        if email is None:
            _mark(connection, row, "cancelled")
            return "cancelled", None, None
    else:
        today = days.at(participant.site_id)  # the participant's site's day
        outcome = _check(t, row, participant, today)
        if outcome == RESCHEDULED:  # only as read: on SQLite another sender may have it
            changed = connection.execute(update(outbox).where(
                outbox.c.reminder_id == row.reminder_id, outbox.c.status == row.status)
                .values(status=RESCHEDULED))
            return (outcome if changed.rowcount == 1 else "busy"), None, None
        if outcome != "due":
            _mark(connection, row, "sent" if outcome == "recorded_before" else outcome)
            return outcome, None, None
        email = compose(t, participant, row.visit, row.kind, today)
    outcome, took = _mail(t, connection, mailer, row, email)
    if outcome != "sent":
        return outcome, None, None
    return outcome, took, participant


def _sender_stopped(connection: Connection, row: Any) -> bool:
    """Whether the sender that marked ``row`` sending has stopped (the email may have gone
    or not). On PostgreSQL, yes: the caller holds the reminder's lock, which that sender held
    while it lived. SQLite has no such lock: only once the sender has had long enough
    (REENQUEUE_AFTER, as ``hand_over`` waits); until then it may still be talking to SMTP."""
    if connection.dialect.name == "postgresql" or row.sending_at is None:
        return True
    return as_utc(row.sending_at) < datetime.now(UTC) - REENQUEUE_AFTER


def _mailed(t: Trialog, connection: Connection, row: Any, participant: Participant
            ) -> tuple[str, tuple[str, ...] | None, Participant | None]:
    """A row the SMTP server took: its ReminderSent, to the addresses the email was sent
    to, is still to record, unless an attempt recorded it and its row's mark was lost (then
    recording it again, to addresses changed since, would be refused as another command
    under the same id, on every attempt)."""
    if _recorded(row, participant):
        _mark(connection, row, "sent")
        return "recorded_before", None, None
    return "sent", _mailed_to(t, row, participant), participant


def _mailed_to(t: Trialog, row: Any, participant: Participant) -> tuple[str, ...]:
    """The addresses a row's email went to: as the row keeps them, or, for a row from
    before it kept them, as they are now."""
    if row.mailed_to is not None:
        return _opened(t, row.mailed_to)
    if row.kind == query_notices.RAISED:
        return query_notices.raised_recipients(t, participant)
    return recipients(t, participant)


def _sealed(t: Trialog, to: tuple[str, ...]) -> bytes:
    """The addresses as the outbox keeps them: sealed as the events' states are."""
    return encrypt(t.service.mapper, json.dumps(list(to)).encode())


def _opened(t: Trialog, sealed: bytes) -> tuple[str, ...]:
    return tuple(json.loads(decrypt(t.service.mapper, sealed)))


def _uncertain(connection: Connection, row: Any, message_id: str | None, why: str) -> str:
    """A row sending ``message_id`` whose email may or may not have gone: marked uncertain,
    for a person to look at, and never emailed again (at most one email); nothing is
    recorded. Busy when the row is no longer that sending (another sender has it)."""
    changed = connection.execute(_UNCERTAIN, {
        "reminder": row.reminder_id, "sending": message_id, "error": why[:2000]})
    if changed.rowcount != 1:
        return "busy"
    log.warning("reminder may not have been sent; marked uncertain, not sent again",
                extra={"reminder_id": row.reminder_id, "message_id": message_id,
                       "error": why})
    return "uncertain"


_UNCERTAIN = (update(outbox)
              .where(outbox.c.reminder_id == bindparam("reminder"),
                     outbox.c.status == "sending",
                     outbox.c.message_id.is_not_distinct_from(bindparam("sending")))
              .values(status="uncertain", attempts=outbox.c.attempts + 1,
                      last_error=bindparam("error")))


def _send_digest(t: Trialog, connection: Connection, mailer: Mailer, row: Any) -> str:
    """A site's weekly digest; its outbox row is its only record. Not while the read
    models, whose queries it lists, are behind the scan that wrote it (being rebuilt):
    busy, handed over again later."""
    if row.status == "mailed":
        _mark(connection, row, "sent")
        return "sent"
    if TrialProjection(t).position() < row.scan_position:
        return "busy"
    email = query_notices.digest_email(t, row.participant_id)
    if email is None:
        _mark(connection, row, "cancelled")
        return "cancelled"
    outcome, _ = _mail(t, connection, mailer, row, email)
    if outcome == "sent":
        _mark(connection, row, "sent")
    return outcome


def _check(t: Trialog, row: Any, participant: Participant, today: date) -> str:
    if _recorded(row, participant):
        return "recorded_before"  # sent and recorded by an attempt whose row update was lost
    owed = _owed(t, participant, row.visit, row.kind)
    if owed is None or today > owed[1]:
        return "cancelled"
    if today < owed[0]:
        return RESCHEDULED  # the scan of its new day hands it over again
    if expired(owed[0], today):  # its due day as the record has it now, not as scanned
        return "expired"
    return "due"


def _mail(t: Trialog, connection: Connection, mailer: Mailer, row: Any,
          email: Email) -> tuple[str, tuple[str, ...]]:
    """Sends the email; the row is marked sending before (if it is still as read, and
    waiting for the disk: a row found sending later is never emailed again), and mailed
    when the server took it, with the addresses it took it for (the caller records
    ReminderSent to those: a copy's address refused is not among them). What became of
    it, and those addresses."""
    to = _sealed(t, email.to) if row.kind != query_notices.DIGEST else None
    try:
        message_id = mailer.new_message_id()
        message = mailer.message(email, message_id)
        if not _claim(connection, row, message_id, to):
            return "busy", ()  # another sender changed the row meanwhile
        refused = mailer.send(email, message)
    except UncertainMailError as e:
        return _uncertain(connection, row, message_id, f"the connection failed as the "
                          f"server was taking the message ({e}); not sent again"), ()
    except PermanentMailError as e:
        _mark(connection, row, "failed", attempted=True, error=str(e))
        log.warning("reminder cannot be sent; marked failed",
                    extra={"reminder_id": row.reminder_id, "error": str(e)})
        return "failed", ()
    except TransientMailError as e:
        _mark(connection, row, "pending", attempted=True, error=str(e))
        raise
    except RecipientDeferred as e:  # this row's addressee: no reason to stop the others
        # A visit reminder expires with its due day (``_check``); a query's email and a
        # digest once a day old (a query still open is in the weekly digest).
        stale = (row.kind in (query_notices.RAISED, query_notices.DIGEST)
                 and as_utc(row.created_at) < datetime.now(UTC) - LATE_BY_AT_MOST)
        _mark(connection, row, "expired" if stale else "pending", attempted=True,
              error=str(e))
        log.warning("reminder deferred by a recipient's server; a later scan sends it again"
                    if not stale else "reminder deferred a day long; expired",
                    extra={"reminder_id": row.reminder_id, "error": str(e)})
        return ("expired" if stale else "deferred"), ()
    took = tuple(a for a in email.to if a not in refused)
    note = "recipients refused: " + "; ".join(_refusals(refused)) if refused else None
    _mark(connection, row, "mailed", attempted=True, error=note, sent_at=datetime.now(UTC),
          mailed_to=_sealed(t, took) if refused and to is not None else None)
    if note:
        log.warning("reminder sent; some recipients refused",
                    extra={"reminder_id": row.reminder_id, "error": note})
    return "sent", took


def _record_sent(t: Trialog, connection: Connection, row: Any, to: tuple[str, ...]) -> None:
    """ReminderSent in a transaction of its own, which the command bus retries (tenacity)
    in a fresh one on a write conflict; then the row is sent. Never emails."""
    intent = _reminder_sent(t, row, to)
    t.bus.dispatch(intent.command, command_id=intent.command_id, actor=intent.actor)
    _mark(connection, row, "sent")


def _reminder_sent(t: Trialog, row: Any, to: tuple[str, ...]) -> Intent:
    """The ReminderSent command of an outbox row, with its id derived from the row's."""
    return Intent(c.RecordReminderSent(row.participant_id, {
                      "visit": _about(row), "kind": row.kind, "recipients": list(to)}),
                  t.derived_command_id("reminder-sent", row.reminder_id), ACTOR)


def _about(row: Any) -> str:
    """What a row's ReminderSent names as its visit: the query a query's email is about."""
    return str(row.query_id or row.visit)


def _recorded(row: Any, participant: Participant) -> bool:
    """Whether the row's ReminderSent is in the participant's record already."""
    return f"{_about(row)}/{row.kind}" in participant.reminders


def _mark(connection: Connection, row: Any, status: str, *, attempted: bool = False,
          error: str | None = None, sent_at: datetime | None = None,
          mailed_to: bytes | None = None) -> None:
    """The row's new status, committed at once (the connection commits each statement)."""
    values: dict[str, Any] = {"reminder": row.reminder_id, "status": status}
    if error:
        values["last_error"] = error[:2000]
    if sent_at:
        values["sent_at"] = sent_at
    if mailed_to is not None:
        values["mailed_to"] = mailed_to
    connection.execute(_marking(attempted, frozenset(values)), values)


def _claim(connection: Connection, row: Any, message_id: str, to: bytes | None) -> bool:
    """The row marked sending, with the time, the message's Message-ID and the sealed
    addresses, if it is still as it was read (False otherwise: another sender has changed
    it); on PostgreSQL its commit waits for the disk (the sender's marks otherwise don't,
    see ``_marks_not_waiting``): it outlives a database crash, and so do the marks before
    it."""
    statement = _CLAIMS[connection.dialect.name == "postgresql"]
    changed = connection.execute(statement, {
        "reminder": row.reminder_id, "was": row.status, "status": "sending",
        "sending_at": datetime.now(UTC), "message_id": message_id, "mailed_to": to})
    return bool(changed.rowcount == 1)


# synchronous_commit set for the statement's own transaction (which PostgreSQL reads as it
# commits), in the statement itself: no round trip to set it, none to set it back.
_FOR_THIS_COMMIT = select(func.set_config("synchronous_commit", "on", true())).scalar_subquery()
_CLAIM = (update(outbox)
          .where(outbox.c.reminder_id == bindparam("reminder"),
                 outbox.c.status == bindparam("was"))
          .values(status=bindparam("status"), sending_at=bindparam("sending_at"),
                  message_id=bindparam("message_id"), mailed_to=bindparam("mailed_to")))
_CLAIMS = {False: _CLAIM, True: _CLAIM.where(_FOR_THIS_COMMIT == "on")}


_MARKINGS: dict[tuple[bool, frozenset[str]], Any] = {}


def _marking(attempted: bool, names: frozenset[str]) -> Any:
    """``_mark``'s statement for these values, built once (the values bound when run)."""
    key = (attempted, names)
    if key not in _MARKINGS:
        columns: dict[str, Any] = {name: bindparam(name) for name in names - {"reminder"}}
        if attempted:
            columns["attempts"] = outbox.c.attempts + 1
        _MARKINGS[key] = (update(outbox).where(outbox.c.reminder_id == bindparam("reminder"))
                          .values(**columns))
    return _MARKINGS[key]


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
        with locks.held(connection, _lock_name(reminder_id)) as alone:
            if not alone:
                yield None
                return
            with _marks_not_waiting(connection):
                yield connection


@contextmanager
def _marks_not_waiting(connection: Connection) -> Iterator[None]:
    """The outbox's marks on this connection are committed without waiting for the disk
    (PostgreSQL's synchronous_commit off, for this connection only and until it goes back
    to the pool), but for sending (``_claim``). What a database crash can lose is
    the marks since the last commit that waited: a mailed row found sending again (then
    marked uncertain, never emailed again), or a sent row found mailed (its ReminderSent is
    found recorded, and nothing more is); ReminderSent's own commit waits for the disk,
    and for every mark before it."""
    connection.exec_driver_sql("SET synchronous_commit = off")
    try:
        yield
    finally:
        try:
            connection.exec_driver_sql("RESET synchronous_commit")
        except sqlalchemy.exc.SQLAlchemyError:
            connection.invalidate()  # not back to the pool as it is (the lock goes with it)


# --- uncertain rows, resolved by a person ------------------------------------------------

class NotUncertain(Exception):
    """The row is not (or no longer) uncertain: nothing is changed."""


def uncertain_rows(t: Trialog) -> list[Any]:
    """The rows marked uncertain, oldest first."""
    with t.engine.connect() as connection:
        return list(connection.execute(select(outbox).where(outbox.c.status == "uncertain")
                                       .order_by(outbox.c.sending_at, outbox.c.reminder_id)))


def shown(t: Trialog, row: Any) -> dict[str, Any]:
    """An uncertain row as a person resolving it needs it: what, when, its Message-ID, and
    the addresses masked (as in the logs)."""
    to = _opened(t, row.mailed_to) if row.mailed_to is not None else ()
    return {"reminder_id": row.reminder_id, "participant_id": row.participant_id,
            "about": _about(row), "kind": row.kind, "due_on": row.due_on.isoformat(),
            "sending_at": row.sending_at.isoformat() if row.sending_at else None,
            "message_id": row.message_id, "to": [mask_email(a) for a in to],
            "why": row.last_error}


def resolve(t: Trialog, reminder_id: str, *, sent: bool, actor: str, reason: str) -> str:
    """A person's answer for an uncertain row, from the SMTP server's log: ``sent``, its
    ReminderSent is recorded by ``actor`` with ``reason`` (to the addresses it went to,
    under the command id a worker would have used; unless it is recorded already) and the
    row marked sent; otherwise the row is pending again, and the next scan hands it to the
    workers, which send it if it is still due (not more than a day late). Either way the
    row keeps who decided, when, why, and the Message-ID they decided on, before what it
    said. Returns the row's new status."""
    with _alone_with(t, reminder_id) as connection:
        if connection is None:
            raise NotUncertain(f"reminder {reminder_id} is being sent or resolved now")
        row = connection.execute(
            select(outbox).where(outbox.c.reminder_id == reminder_id)).first()
        if row is None:
            raise NotUncertain(f"no reminder {reminder_id} in the outbox")
        if row.status != "uncertain":
            raise NotUncertain(f"reminder {reminder_id} is {row.status}, not uncertain")
        if sent and row.kind != query_notices.DIGEST:
            participant = t.service.get_participant(row.participant_id)
            if not _recorded(row, participant):
                intent = _reminder_sent(t, row, _mailed_to(t, row, participant))
                t.bus.dispatch(intent.command, command_id=intent.command_id, actor=actor,
                               reason=reason)
        now = datetime.now(UTC)
        status = "sent" if sent else "pending"
        note = (f"resolved as {'sent' if sent else 'not sent'} by {actor} on "
                f"{now.isoformat(timespec='seconds')} (Message-ID {row.message_id}): "
                f"{mask_emails_in(reason)}; before: {row.last_error}")
        changed = connection.execute(
            update(outbox).where(outbox.c.reminder_id == reminder_id,
                                 outbox.c.status == "uncertain")
            .values(status=status, enqueued_at=None, last_error=note[:2000],
                    sent_at=row.sending_at if sent else None))
        if changed.rowcount != 1:  # SQLite, which has no lock: another got there first
            raise NotUncertain(f"reminder {reminder_id} changed meanwhile")
    log.info("uncertain reminder resolved", extra={
        "reminder_id": reminder_id, "status": status, "actor": actor,
        "message_id": row.message_id, "reason": mask_emails_in(reason)})
    return status


# --- many at a time ----------------------------------------------------------------------

CHUNK = 50  # reminders a task sends over one SMTP connection
FRESH_FOR = 1.0  # seconds a chunk's participants, read together, are used before a new read


def send_chunk(t: Trialog, mailer: Mailer, reminder_ids: list[str],
               today: Today | date) -> dict[str, str]:
    """Sends several outbox rows over the mailer's one connection, then records their
    ReminderSent events in one transaction and marks them sent together; what happened
    to each (as ``send`` says, ``busy`` for a row another sender has). The rules are
    ``send``'s: a row is held by one sender at a time, marked sending before SMTP talks
    and mailed as soon as the server took it, and never emailed again once sending. A
    message the server can't take now is left pending and the next is tried (a server
    deferring one message, as a content filter may, holds up no other); a second before
    the server takes another, or a server that can't be talked to, ends the chunk (it
    takes none now). Either way what was mailed is recorded, then TransientMailError
    (the task is retried for the rows left)."""
    outcomes: dict[str, str] = {}
    not_now: TransientMailError | None = None  # the server's last "not now", if any
    taken_then: int | None = None  # the messages the server had taken when it said so
    days = _days(t, today)
    with _alone_with_many(t, reminder_ids) as (connection, held):
        outcomes.update({r: "busy" for r in reminder_ids if r not in held})
        rows = connection.execute(select(outbox).where(outbox.c.reminder_id.in_(held))).all()
        outcomes.update({r: "done" for r in held})
        mailed: list[tuple[Any, tuple[str, ...]]] = []
        loaded: list[Participant] = []
        todo = [row for row in sorted(rows, key=lambda r: reminder_ids.index(r.reminder_id))
                if row.status in TO_DO]
        try:
            while todo:
                # The participants are read together, and again once FRESH_FOR has passed:
                # a withdrawal or a new address committed while the chunk is mailed holds
                # for the rows after it, as it would row by row.
                with t.service.together(*_participants(t, todo)):
                    read_at = time.monotonic()
                    while todo:
                        row = todo.pop(0)
                        try:
                            outcome, to, participant = _one(t, connection, mailer, row,
                                                            days)
                        except TransientMailError as error:
                            if (isinstance(error, ServerUnavailable)
                                    or taken_then == mailer.taken):  # none taken since
                                raise
                            not_now, taken_then = error, mailer.taken
                        else:
                            outcomes[row.reminder_id] = outcome
                            if to is not None:
                                mailed.append((row, to))
                                if participant is not None:
                                    loaded.append(participant)
                        if time.monotonic() - read_at >= FRESH_FOR:
                            break
        finally:
            _record_all(t, connection, mailed, loaded)
        for row, _ in mailed:
            outcomes[row.reminder_id] = "sent"
    if not_now is not None:
        raise not_now
    return outcomes


def _participants(t: Trialog, rows: list[Any]) -> tuple[list[Participant], set[UUID]]:
    """The rows' participants, read in one go (a digest's row names a site); one whose
    record can't be loaded is left out, so that its own row alone is marked failed when
    ``_one`` reads it (the others go on)."""
    wanted = {row.participant_id for row in rows if row.kind != query_notices.DIGEST}
    with t.service.recorder.transaction(commit=False) as session:
        loaded, new, _ = load_apart(t.service, session, wanted)
    return loaded, new


def _record_all(t: Trialog, connection: Connection, mailed: list[tuple[Any, tuple[str, ...]]],
                loaded: list[Participant]) -> None:
    """ReminderSent for every mailed row in one transaction (the participants ``loaded`` to
    compose them are not read again; on a write conflict the bus decides them all again
    from the store), then the rows marked sent at once."""
    if not mailed:
        return
    outcomes = t.bus.dispatch_all([_reminder_sent(t, row, to) for row, to in mailed], loaded)
    sent = [row.reminder_id for (row, _), outcome in zip(mailed, outcomes, strict=True)
            if isinstance(outcome, Accepted)]
    if sent:
        connection.execute(update(outbox).where(outbox.c.reminder_id.in_(sent))
                           .values(status="sent"))
    for outcome in outcomes:
        if not isinstance(outcome, Accepted):
            raise outcome  # its row stays mailed: recorded on the next pass


@contextmanager
def _alone_with_many(t: Trialog, reminder_ids: list[str]
                     ) -> Iterator[tuple[Connection, list[str]]]:
    """A connection as ``_alone_with``'s, holding the rows it could get to itself (on
    PostgreSQL a session lock each; the others are another sender's)."""
    with t.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        if t.engine.dialect.name != "postgresql":
            yield connection, list(reminder_ids)
            return
        taken = set(locks.try_locks(connection, [_lock_name(r) for r in reminder_ids]))
        held = [r for r in reminder_ids if _lock_name(r) in taken]
        try:
            with _marks_not_waiting(connection) if held else nullcontext():
                yield connection, held
        finally:
            locks.release(connection, *(_lock_name(r) for r in held))


def _lock_name(reminder_id: str) -> str:
    return f"trialog:reminder:{reminder_id}"
