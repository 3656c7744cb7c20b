"""Reminder delivery when things go wrong, with a real Celery worker, Redis, PostgreSQL and
SMTP server: nothing held in the database while SMTP talks, a write conflict on
ReminderSent, addresses that cannot be sent to, late reminders, the headers, and contact
details kept out of the outbox and the logs."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from email.message import Message
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import select, text, update

from domain import commands as c
from infrastructure.jobs import reminders
from infrastructure.logs import JsonFormatter, mask_email, mask_emails_in
from infrastructure.readside.projections import TrialProjection
from infrastructure.store.stored import events_table
from infrastructure.store.tables import outbox
from tests.integration import test_workers
from tests.integration.test_workers import REGISTERED, Stack, wait_until
from tests.smtp import text_of

stack = test_workers.stack  # the fixture: a Celery worker, Redis, PostgreSQL, an SMTP server

WEEK6 = REGISTERED + timedelta(days=42)
WINDOW_OPENS = WEEK6 - timedelta(days=7)  # the window_open reminder's due day
THREE_DAYS_BEFORE = WEEK6 - timedelta(days=3)
MEDICATION = {"drug": "ibuprofen", "started_on": REGISTERED, "stopped_on": None,
              "contains_b12": False}


def scan_without_sending(stack: Stack, today: date) -> list[str]:
    """The scan's outbox rows, not handed to the workers (as with the broker down)."""
    stack.clock.set(today)
    TrialProjection(stack.trialog).catch_up()
    return reminders.scan(stack.trialog, today)


def status(stack: Stack, reminder_id: str) -> str:
    return str(outbox_row(stack, reminder_id).status)


def outbox_row(stack: Stack, reminder_id: str) -> Any:
    with stack.trialog.engine.connect() as connection:
        return connection.execute(
            select(outbox).where(outbox.c.reminder_id == reminder_id)).one()


def event_types(stack: Stack, pid: str) -> list[str]:
    participant = stack.trialog.service.get_participant(pid)
    return [type(e).__name__ for e in stack.trialog.service.events.get(participant.id)]


def addresses(stack: Stack, pid: str) -> tuple[str, str]:
    return f"{pid.lower()}@example.org", stack.trialog.protocol.site("CASE").coordinator_email


def html_of(message: Message) -> str:
    part = next(p for p in message.walk() if p.get_content_type() == "text/html")
    return part.get_payload(decode=True).decode(part.get_content_charset() or "utf-8")  # type: ignore[union-attr]


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """The lines the application logs, as the JSON formatter writes them."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(JsonFormatter().format(record))

    logger, handler = logging.getLogger("trialog"), Keep()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


# --- SMTP outside any transaction; one sender at a time ------------------------------------

def test_nothing_is_held_in_the_database_while_smtp_talks(stack):
    stack.enrol()
    (reminder_id,) = scan_without_sending(stack, WINDOW_OPENS)
    stack.sink.hold()  # the server holds its answer to DATA
    stack.task("send_reminder").delay(reminder_id)
    assert stack.sink.received.wait(30)

    with stack.trialog.engine.begin() as connection:
        in_transaction = connection.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
            "AND xact_start IS NOT NULL")).scalar_one()
        locked = connection.execute(select(outbox.c.reminder_id).where(
            outbox.c.reminder_id == reminder_id).with_for_update(nowait=True)).scalar_one()
    assert in_transaction == 0 and locked == reminder_id
    stack.sink.release()
    wait_until(lambda: status(stack, reminder_id) == "sent")


def once_free(send: Any, timeout: float = 30) -> str:
    """What ``send`` answers once no other sender holds the reminder: a worker lets go of
    the reminder's lock just after it marks the row sent."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return send()
        except reminders.ReminderBusy:
            assert time.monotonic() < deadline, "the reminder stayed busy"
            time.sleep(0.05)


def test_a_second_sender_of_the_same_reminder_neither_waits_nor_sends(stack):
    stack.enrol()
    (reminder_id,) = scan_without_sending(stack, WINDOW_OPENS)
    stack.sink.hold()
    stack.task("send_reminder").delay(reminder_id)
    assert stack.sink.received.wait(30)  # the worker is mid-send
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)

    with pytest.raises(reminders.ReminderBusy):
        reminders.send(stack.trialog, mailer, reminder_id, WINDOW_OPENS)
    stack.sink.release()
    wait_until(lambda: status(stack, reminder_id) == "sent")
    assert once_free(lambda: reminders.send(stack.trialog, mailer, reminder_id,
                                            WINDOW_OPENS)) == "done"
    assert len(stack.sink.messages) == 1


# --- recording ReminderSent ----------------------------------------------------------------

def test_a_write_conflict_on_reminder_sent_is_retried_and_never_emails_again(stack):
    pid = stack.enrol()
    (reminder_id,) = scan_without_sending(stack, WINDOW_OPENS)
    t = stack.trialog
    events = t.service.recorder.events_record_cls.__table__.name
    with t.service.recorder.transaction(commit=True) as session:
        # Holding the event table's write lock: the worker mails, loads the participant and
        # queues for the lock; another command writes to the participant before it.
        session.execute(text(f"LOCK TABLE {events} IN EXCLUSIVE MODE"))
        stack.task("send_reminder").delay(reminder_id)
        wait_until(lambda: _waits_for_lock_on(stack, events))
        stack.send(c.ReportMedication(pid, MEDICATION))

    wait_until(lambda: status(stack, reminder_id) == "sent")
    assert event_types(stack, pid)[-2:] == ["MedicationReported", "ReminderSent"]
    mailer = reminders.Mailer(stack.sink.url, t.settings.mail_from)
    assert once_free(lambda: reminders.send(t, mailer, reminder_id, WINDOW_OPENS)) == "done"
    time.sleep(0.5)
    assert len(stack.sink.messages) == 1
    assert event_types(stack, pid).count("ReminderSent") == 1


def _waits_for_lock_on(stack: Stack, table: str) -> bool:
    with stack.trialog.engine.connect() as connection:
        return bool(connection.execute(text(
            "SELECT count(*) FROM pg_locks l JOIN pg_class r ON r.oid = l.relation "
            "WHERE r.relname = :table AND NOT l.granted"), {"table": table}).scalar_one())


def test_a_reminder_mailed_but_not_recorded_is_recorded_without_emailing_again(stack):
    pid = stack.enrol()
    (reminder_id,) = scan_without_sending(stack, WINDOW_OPENS)
    with stack.trialog.engine.begin() as connection:  # a sender that died after the server
        connection.execute(update(outbox).where(  # took the message
            outbox.c.reminder_id == reminder_id).values(status="mailed", attempts=1))

    assert reminders.hand_over(stack.trialog, stack.task("send_reminder").delay) == 1
    wait_until(lambda: status(stack, reminder_id) == "sent")
    assert stack.reminders_sent(pid) == ["week6/window_open"]
    assert stack.sink.messages == []


def correct_email(stack: Stack, pid: str, address: str) -> None:
    participant = stack.trialog.service.get_participant(pid)
    stack.trialog.bus.dispatch(
        c.CorrectData(pid, {"event_id": participant.screening_event, "field": "email",
                            "value": address}),
        command_id=str(uuid.uuid4()), actor="coordinator", reason="the participant moved")


def recorded_recipients(stack: Stack, pid: str) -> list[list[str]]:
    participant = stack.trialog.service.get_participant(pid)
    return [list(e.recipients) for e in stack.trialog.service.events.get(participant.id)
            if type(e).__name__ == "ReminderSent"]


def send_one(stack: Stack, reminder_id: str, how: str) -> str:
    """``reminders.send``, or a chunk of that one row."""
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
    try:
        if how == "alone":
            return reminders.send(stack.trialog, mailer, reminder_id, WINDOW_OPENS)
        return reminders.send_chunk(stack.trialog, mailer, [reminder_id],
                                    WINDOW_OPENS)[reminder_id]
    finally:
        mailer.close()


@pytest.mark.parametrize("how", ["alone", "chunk"])
def test_a_recorded_reminder_whose_sent_mark_was_lost_is_marked_sent_after_an_address_changed(
        stack, how):
    pid = stack.enrol()
    (reminder_id,) = scan_without_sending(stack, WINDOW_OPENS)
    assert send_one(stack, reminder_id, how) == "sent"
    with stack.trialog.engine.begin() as connection:  # the sent mark lost in a crash (it
        connection.execute(update(outbox).where(  # commits without waiting for the disk)
            outbox.c.reminder_id == reminder_id).values(status="mailed"))
    correct_email(stack, pid, "moved@example.org")

    assert send_one(stack, reminder_id, how) == "recorded_before"
    assert status(stack, reminder_id) == "sent"
    assert recorded_recipients(stack, pid) == [list(addresses(stack, pid))]
    assert len(stack.sink.messages) == 1


@pytest.mark.parametrize("how", ["alone", "chunk"])
def test_a_reminder_mailed_then_readdressed_is_recorded_to_the_addresses_it_went_to(
        stack, how, monkeypatch):
    pid = stack.enrol()
    (reminder_id,) = scan_without_sending(stack, WINDOW_OPENS)

    def database_gone(*args: Any, **kwargs: Any) -> Any:
        raise sqlalchemy.exc.OperationalError("INSERT", {}, Exception("the server went away"))

    with monkeypatch.context() as patched:  # mailed, then the database lost before the event
        patched.setattr(stack.trialog.bus, "dispatch", database_gone)
        patched.setattr(stack.trialog.bus, "dispatch_all", database_gone)
        with pytest.raises(sqlalchemy.exc.OperationalError):
            send_one(stack, reminder_id, how)
    assert status(stack, reminder_id) == "mailed"
    correct_email(stack, pid, "moved@example.org")

    assert send_one(stack, reminder_id, how) == "sent"
    assert recorded_recipients(stack, pid) == [list(addresses(stack, pid))]
    assert len(stack.sink.messages) == 1
    kept = outbox_row(stack, reminder_id).mailed_to
    assert kept is not None and b"example.org" not in kept  # sealed as the events are


# --- addresses that cannot be sent to ------------------------------------------------------

def test_an_address_with_a_line_break_is_marked_failed_and_nothing_is_sent(stack):
    pid = stack.enrol(email="x@example.org\r\nBcc: someone@example.net")
    (reminder_id,) = stack.scan(WINDOW_OPENS)
    wait_until(lambda: status(stack, reminder_id) == "failed")

    row = outbox_row(stack, reminder_id)
    assert row.attempts == 1 and row.last_error == "not an email address: ***"
    assert stack.sink.messages == [] and stack.reminders_sent(pid) == []
    assert reminders.hand_over(stack.trialog, stack.task("send_reminder").delay) == 0


def test_a_refused_address_is_logged_and_recorded_masked(stack, log_lines):
    pid = stack.enrol()
    participant, coordinator = addresses(stack, pid)
    stack.sink.refuse = {participant, coordinator}
    (reminder_id,) = stack.scan(WINDOW_OPENS)
    wait_until(lambda: status(stack, reminder_id) == "failed")

    row = outbox_row(stack, reminder_id)
    warnings = [line for line in log_lines if reminder_id in line]
    assert warnings
    for written in (row.last_error, *warnings):
        assert participant not in written and coordinator not in written
        assert mask_email(participant) in written and mask_email(coordinator) in written


@pytest.mark.parametrize("refusal, code", [("refuse", "550"), ("defer", "451")])
def test_a_copys_address_refused_is_noted_and_the_addressee_gets_the_reminder(stack, refusal,
                                                                             code):
    """For good or for now: a site coordinator's full mailbox holds back no participant's
    reminder."""
    pid = stack.enrol()
    participant, coordinator = addresses(stack, pid)
    setattr(stack.sink, refusal, {coordinator})
    (reminder_id,) = stack.scan(WINDOW_OPENS)
    wait_until(lambda: status(stack, reminder_id) == "sent")

    row = outbox_row(stack, reminder_id)
    assert row.last_error is not None and mask_email(coordinator) in row.last_error
    assert coordinator not in row.last_error and code in row.last_error
    assert [to for _, to in stack.sink.envelopes] == [[participant]]
    assert len(stack.sink.messages) == 1 and stack.reminders_sent(pid) == ["week6/window_open"]
    # What the record and the row say it went to: the address that took it.
    (sent,) = [e for e in stack.trialog.service.events.get(
        stack.trialog.service.get_participant(pid).id) if type(e).__name__ == "ReminderSent"]
    assert sent.recipients == [participant]
    assert reminders._opened(stack.trialog, row.mailed_to) == (participant,)


def between_attempts(stack: Stack, reminder_id: str) -> Any:
    """Once deferred, a row waits for its task's retry, which (its countdown jittered down
    to nothing) may already be sending it again: the row as read between two attempts."""
    row = outbox_row(stack, reminder_id)
    return row if row.attempts >= 1 and row.status != "sending" else None


def test_a_deferred_reminder_stays_pending_with_its_reason_masked(stack):
    pid = stack.enrol()
    stack.sink.defer = set(addresses(stack, pid))
    (reminder_id,) = stack.scan(WINDOW_OPENS)
    row = wait_until(lambda: between_attempts(stack, reminder_id))
    assert row.status == "pending" and "451" in row.last_error
    # The first recipient deferred stops the message (the others are not asked).
    assert mask_email(addresses(stack, pid)[0]) in row.last_error
    for address in addresses(stack, pid):
        assert address not in row.last_error


def test_an_addressee_deferred_leaves_the_row_for_a_later_scan_and_the_chunk_goes_on(stack):
    """A 451 to the participant's address (greylisting) while the coordinator's took the
    copy: the participant never got the reminder, and ReminderSent named them. Now the
    message waits for all, and the other rows of the chunk go out."""
    deferred, other = stack.enrol(), stack.enrol()
    ids = scan_without_sending(stack, WINDOW_OPENS)
    order = {outbox_row(stack, r).participant_id: r for r in ids}
    participant, coordinator = addresses(stack, deferred)
    stack.sink.defer = {participant}
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)

    outcomes = reminders.send_chunk(stack.trialog, mailer, [order[deferred], order[other]],
                                    WINDOW_OPENS)
    assert outcomes == {order[deferred]: "deferred", order[other]: "sent"}
    row = outbox_row(stack, order[deferred])
    assert row.status == "pending" and "451" in row.last_error
    assert mask_email(participant) in row.last_error and participant not in row.last_error
    assert [to for _, to in stack.sink.envelopes] == [list(addresses(stack, other))]
    assert stack.reminders_sent(deferred) == []

    stack.sink.defer = set()  # a later scan hands it over again: it goes to both, once
    assert reminders.send_chunk(stack.trialog, mailer, [order[deferred]], WINDOW_OPENS) == {
        order[deferred]: "sent"}
    assert sorted(stack.sink.envelopes[-1][1]) == sorted((participant, coordinator))
    assert stack.reminders_sent(deferred) == ["week6/window_open"]


def test_addresses_are_masked_to_their_first_character_and_domain():
    assert mask_email("jane.doe@example.org") == "j***@example.org"
    assert mask_email("x@example.org\r\nBcc: y@example.net") == "***"
    assert mask_email("not an address") == "***"
    assert mask_emails_in("550 5.1.1 <jane@example.org>: unknown; bob@x.org") == \
        "550 5.1.1 <j***@example.org>: unknown; b***@x.org"


# --- late reminders ------------------------------------------------------------------------

def test_a_reminder_found_more_than_a_day_late_is_expired_not_sent(stack):
    pid = stack.enrol()
    assert stack.scan(WINDOW_OPENS + timedelta(days=2)) == []  # the scans had stopped

    with stack.trialog.engine.connect() as connection:
        rows = connection.execute(select(outbox).where(outbox.c.participant_id == pid)).all()
    assert [(r.kind, r.status) for r in rows] == [("window_open", "expired")]
    time.sleep(0.5)
    assert stack.sink.messages == [] and stack.reminders_sent(pid) == []


def _registration_corrected_later(stack, pid: str, days: int) -> None:
    registration = next(e for e, _ in stack.trialog.service.get_participant(pid)
                        .records_of("ParticipantRandomized"))
    stack.trialog.bus.dispatch(c.CorrectData(pid, {
        "event_id": registration, "field": "registered_on",
        "value": (REGISTERED + timedelta(days=days)).isoformat()}),
        command_id=str(uuid.uuid4()), actor="dm", reason="registration date misread")


def test_a_reminder_whose_registration_was_corrected_later_goes_out_on_its_new_day(stack):
    """Between the scan and the send, the registration is corrected 5 days later: the
    reminder is not due yet. Its row is set aside as it is (not cancelled for good: its id
    is the visit's and kind's, and a person's resolution may be on it) and is pending
    again from the first scan on or after its new day, whichever scans came between."""
    pid = stack.enrol()
    (reminder_id,) = scan_without_sending(stack, WINDOW_OPENS)
    _registration_corrected_later(stack, pid, 5)
    new_day = WINDOW_OPENS + timedelta(days=5)
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)

    assert scan_without_sending(stack, new_day) == []  # its row is there, pending
    # A sender that took the row before midnight finds it not due yet.
    assert reminders.send(stack.trialog, mailer, reminder_id,
                          new_day - timedelta(days=1)) == "rescheduled"
    row = outbox_row(stack, reminder_id)
    assert (row.status, row.due_on) == ("rescheduled", WINDOW_OPENS)
    assert stack.sink.messages == []
    # The day's first scan ran before: the next one still finds it.
    assert scan_without_sending(stack, new_day) == [reminder_id]
    row = outbox_row(stack, reminder_id)
    assert (row.status, row.due_on) == ("pending", new_day)
    assert reminders.send(stack.trialog, mailer, reminder_id, new_day) == "sent"
    assert stack.reminders_sent(pid) == ["week6/window_open"]


def test_a_reminder_left_pending_past_its_moved_due_day_goes_out_on_the_new_one(stack):
    """The workers were down while the registration was corrected: the row, still pending
    with its old due day, is sent on its new one (not expired by the old day)."""
    pid = stack.enrol()
    (reminder_id,) = scan_without_sending(stack, WINDOW_OPENS)
    _registration_corrected_later(stack, pid, 5)
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
    assert reminders.send(stack.trialog, mailer, reminder_id,
                          WINDOW_OPENS + timedelta(days=5)) == "sent"
    assert stack.reminders_sent(pid) == ["week6/window_open"]


def test_a_rescheduled_reminder_no_longer_owed_is_cancelled_by_the_next_scan(stack):
    """Set aside as rescheduled, then the participant withdraws: the schedule has no row
    for it any more, and the next scan cancels it rather than keep it waiting forever."""
    pid = stack.enrol()
    (reminder_id,) = scan_without_sending(stack, WINDOW_OPENS)
    _registration_corrected_later(stack, pid, 5)
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
    assert reminders.send(stack.trialog, mailer, reminder_id, WINDOW_OPENS) == "rescheduled"
    stack.send(c.WithdrawParticipant(pid, {"withdrawn_on": WINDOW_OPENS, "scope": "study",
                                           "reason_code": "moved"}))
    assert scan_without_sending(stack, WINDOW_OPENS + timedelta(days=1)) == []
    assert status(stack, reminder_id) == "cancelled"


def test_a_scan_decides_nothing_while_the_read_models_are_rebuilt(stack, monkeypatch):
    """A rebuild (`trialog projections rebuild`, migration 0032) writes the schedule again
    event by event: a rescheduled reminder whose row was not written yet was cancelled,
    and one whose row still had its due day from before a correction was written expired,
    both for good."""
    from sqlalchemy import delete

    from infrastructure.store.tables import reminder_schedule

    rescheduled, corrected = stack.enrol(), stack.enrol()
    ids = scan_without_sending(stack, WINDOW_OPENS - timedelta(days=1))  # nothing due yet
    assert not [r for r in ids if outbox_row(stack, r).participant_id in (rescheduled,
                                                                            corrected)]
    _registration_corrected_later(stack, corrected, 10)  # due ten days later
    (reminder_id,) = [r for r in scan_without_sending(stack, WINDOW_OPENS)
                      if outbox_row(stack, r).participant_id in (rescheduled, corrected)]
    _registration_corrected_later(stack, rescheduled, 5)
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
    assert reminders.send(stack.trialog, mailer, reminder_id, WINDOW_OPENS) == "rescheduled"
    TrialProjection(stack.trialog).catch_up()
    with stack.trialog.engine.begin() as connection:  # as a rebuild half-way has them
        connection.execute(delete(reminder_schedule).where(
            reminder_schedule.c.participant_id == rescheduled))
        connection.execute(update(reminder_schedule).where(
            reminder_schedule.c.participant_id == corrected).values(
            due_on=reminder_schedule.c.due_on - timedelta(days=10),
            until=reminder_schedule.c.until - timedelta(days=10)))
    monkeypatch.setattr(TrialProjection, "position", lambda self: 0)  # from the start
    for _ in range(2):  # (the first scan of a rebuild wrote its low position as its mark)
        reminders.scan(stack.trialog, WINDOW_OPENS + timedelta(days=3))
    assert status(stack, reminder_id) == "rescheduled"
    with stack.trialog.engine.connect() as connection:
        assert connection.execute(select(outbox.c.status).where(
            outbox.c.participant_id == corrected)).all() == []


def test_a_row_another_sender_took_meanwhile_is_not_set_aside_over_it(stack):
    """The rescheduled mark takes the row only as it was read (on SQLite, with no lock,
    another sender may have marked it sending meanwhile)."""
    pid = stack.enrol()
    (reminder_id,) = scan_without_sending(stack, WINDOW_OPENS)
    _registration_corrected_later(stack, pid, 5)
    t = stack.trialog
    row = outbox_row(stack, reminder_id)
    with t.engine.begin() as connection:  # another sender took it meanwhile
        connection.execute(update(outbox).where(outbox.c.reminder_id == reminder_id)
                           .values(status="sending", message_id="<other@example.org>"))
    mailer = reminders.Mailer(stack.sink.url, t.settings.mail_from)
    with t.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        outcome, to, _ = reminders._one(t, connection, mailer, row,
                                        reminders.Today(t.protocol, day=WINDOW_OPENS))
    assert (outcome, to) == ("busy", None)
    assert status(stack, reminder_id) == "sending"


def test_a_reminder_that_waited_more_than_a_day_to_go_out_is_expired(stack):
    pid = stack.enrol()
    (reminder_id,) = scan_without_sending(stack, WINDOW_OPENS)
    stack.clock.set(WINDOW_OPENS + timedelta(days=2))  # e.g. the broker was down
    stack.task("send_reminder").delay(reminder_id)

    wait_until(lambda: status(stack, reminder_id) == "expired")
    assert stack.sink.messages == [] and stack.reminders_sent(pid) == []


def test_a_reminder_sent_a_day_late_gives_the_date_not_today(stack):
    english, spanish = stack.enrol("en"), stack.enrol("es")
    assert len(stack.scan(WINDOW_OPENS + timedelta(days=1))) == 2
    by_recipient = {m["To"].split(",")[0]: m for m in stack.sink.wait_for(2)}
    en = by_recipient[f"{english.lower()}@example.org"]
    es = by_recipient[f"{spanish.lower()}@example.org"]
    assert f"due from {WINDOW_OPENS}." in text_of(en) and "today" not in text_of(en)
    assert f"due from {WINDOW_OPENS}." in html_of(en) and "today" not in html_of(en)
    assert f"a partir del {WINDOW_OPENS}." in text_of(es) and "hoy" not in text_of(es)

    assert len(stack.scan(THREE_DAYS_BEFORE + timedelta(days=1))) == 2
    by_recipient = {m["To"].split(",")[0]: m for m in stack.sink.wait_for(4)[2:]}
    en = by_recipient[f"{english.lower()}@example.org"]
    es = by_recipient[f"{spanish.lower()}@example.org"]
    assert f"due on {WEEK6}." in text_of(en) and "three days" not in text_of(en)
    assert f"corresponde el {WEEK6}." in text_of(es) and "tres días" not in text_of(es)


def test_a_reminder_goes_by_its_sites_day_not_the_utc_day(stack):
    """CASE is in New York (UTC-4 in April): its reminder due on a day is not sent the
    evening before, when the UTC day has begun; and a day late in New York it is sent, not
    expired, although the UTC day is two days on."""
    pid = stack.enrol()
    t = stack.trialog
    TrialProjection(t).catch_up()

    def scan_at(now: datetime) -> list[Any]:
        stack.clock.now = now
        reminders.scan(t, reminders.Today.of(t))
        with t.engine.connect() as connection:
            return connection.execute(
                select(outbox).where(outbox.c.participant_id == pid)).all()

    evening_before = datetime.combine(WINDOW_OPENS, datetime.min.time(), UTC) + timedelta(
        hours=2)  # 22:00 the day before in New York
    assert scan_at(evening_before) == []
    a_day_late = evening_before + timedelta(days=2)  # 22:00 the day after, New York
    (row,) = scan_at(a_day_late)
    assert (row.kind, row.status, row.due_on) == ("window_open", "pending", WINDOW_OPENS)
    mailer = reminders.Mailer(stack.sink.url, t.settings.mail_from)
    assert reminders.send(t, mailer, row.reminder_id, reminders.Today.of(t)) == "sent"
    (message,) = stack.sink.wait_for(1)
    assert f"due from {WINDOW_OPENS}." in text_of(message)
    assert stack.reminders_sent(pid) == ["week6/window_open"]


def test_a_reminder_sent_on_its_day_says_so(stack):
    english = stack.enrol("en")
    stack.scan(WINDOW_OPENS)
    assert "is due from today." in text_of(stack.sink.wait_for(1)[0])
    stack.scan(THREE_DAYS_BEFORE)
    assert "is due in three days." in text_of(stack.sink.wait_for(2)[1])
    wait_until(lambda: len(stack.reminders_sent(english)) == 2)


# --- headers -------------------------------------------------------------------------------

def test_reminders_carry_a_date_and_a_message_id(stack):
    stack.enrol(), stack.enrol()
    stack.scan(WINDOW_OPENS)
    messages = stack.sink.wait_for(2)

    for message in messages:
        assert parsedate_to_datetime(message["Date"]).tzinfo is not None
        assert re.fullmatch(r"<[^<>@\s]+@trialog\.localhost>", message["Message-ID"])
    assert messages[0]["Message-ID"] != messages[1]["Message-ID"]


def test_a_reminder_of_a_record_that_cannot_be_read_fails_instead_of_coming_back(stack):
    from tests.integration.test_quarantine import write_straight_into_the_store

    pid = stack.enrol()
    (reminder_id,) = scan_without_sending(stack, WINDOW_OPENS)
    write_straight_into_the_store(stack.trialog, pid, None, "bpi_sf.worst", 3)
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)

    assert reminders.send(stack.trialog, mailer, reminder_id, WINDOW_OPENS) == "failed"

    row = outbox_row(stack, reminder_id)
    assert row.status == "failed" and "can't be read" in row.last_error
    assert stack.sink.messages == []
    assert reminders.hand_over(stack.trialog, stack.task("send_reminder").delay) == 0


def test_a_chunk_with_a_record_that_cannot_be_read_fails_that_row_alone(stack):
    """The chunk's participants are read together: one damaged row made the whole chunk
    fail before any email, every time it was handed over, until its reminders expired."""
    from tests.integration.test_quarantine import _flip_state

    damaged, other = stack.enrol(), stack.enrol()
    ids = scan_without_sending(stack, WINDOW_OPENS)
    by_participant = {outbox_row(stack, r).participant_id: r for r in ids}
    _flip_state(stack.trialog, damaged, 2)
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)

    outcomes = reminders.send_chunk(stack.trialog, mailer,
                                    [by_participant[damaged], by_participant[other]],
                                    WINDOW_OPENS)

    assert outcomes == {by_participant[damaged]: "failed", by_participant[other]: "sent"}
    assert "can't be read" in outbox_row(stack, by_participant[damaged]).last_error
    assert stack.reminders_sent(other) == ["week6/window_open"]
    assert [to[0] for _, to in stack.sink.envelopes] == [f"{other.lower()}@example.org"]


# --- many at a time ------------------------------------------------------------------------

def test_chunks_send_each_reminder_once_and_record_them_together(stack):
    pids = [stack.enrol() for _ in range(7)]
    stack.clock.set(WINDOW_OPENS)
    TrialProjection(stack.trialog).catch_up()
    ids = reminders.scan(stack.trialog, WINDOW_OPENS, enqueue=stack.task("send_reminders")
                         .delay, chunk=3)  # three tasks: 3, 3 and 1 reminders
    assert len(ids) == 7
    wait_until(lambda: all(status(stack, r) == "sent" for r in ids))
    assert len(stack.sink.messages) == 7
    for pid in pids:
        assert stack.reminders_sent(pid) == ["week6/window_open"]
    # Sending the same chunk again emails nobody and records nothing more.
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
    assert set(reminders.send_chunk(stack.trialog, mailer, ids, WINDOW_OPENS).values()) == {
        "done"}
    assert len(stack.sink.messages) == 7


def test_the_marks_dont_wait_for_the_disk_and_the_connection_goes_back_waiting(stack):
    """The outbox's marks commit without waiting for the WAL's flush, but for sending
    (before SMTP talks: a crash must not forget that an email may have gone), whose
    statement sets synchronous_commit for its own commit and leaves the connection's as it
    was; ReminderSent's commit waits (for the marks too); the connection goes back to the
    pool as it came."""
    stack.enrol(), stack.enrol()
    ids = scan_without_sending(stack, WINDOW_OPENS)
    engine = stack.trialog.engine
    seen: list[str] = []
    events = events_table(stack.trialog.service.recorder).name
    recorded: list[str] = []
    claim = reminders._CLAIMS[True].compile(dialect=engine.dialect).string
    claims: list[str] = []

    def setting_at_each_mark(connection, cursor, statement, *_):
        if statement == claim:
            claims.append(statement)
        elif statement.startswith((f"UPDATE {outbox.name} ", f"INSERT INTO {events} ")):
            with cursor.connection.cursor() as asking:  # the statement's own is left alone
                setting = asking.execute("SHOW synchronous_commit").fetchone()[0]
            (seen if statement.startswith("UPDATE") else recorded).append(setting)

    # What the claim's statement does to the setting: its own transaction's only.
    with engine.connect() as connection:
        connection.exec_driver_sql("SET synchronous_commit = off")
        connection.commit()
        claimed = connection.execute(reminders._CLAIMS[True], {
            "reminder": ids[0], "was": "pending", "status": "sending",
            "sending_at": None, "message_id": None, "mailed_to": None}).rowcount
        inside = connection.exec_driver_sql("SHOW synchronous_commit").scalar()
        connection.rollback()  # the row stays pending
        after = connection.exec_driver_sql("SHOW synchronous_commit").scalar()
        connection.exec_driver_sql("RESET synchronous_commit")
        connection.commit()
    assert (claimed, inside, after) == (1, "on", "off")

    sqlalchemy.event.listen(engine, "before_cursor_execute", setting_at_each_mark)
    try:
        mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
        assert set(reminders.send_chunk(stack.trialog, mailer, ids[:1],
                                        WINDOW_OPENS).values()) == {"sent"}
        assert reminders.send(stack.trialog, mailer, ids[1], WINDOW_OPENS) == "sent"
    finally:
        sqlalchemy.event.remove(engine, "before_cursor_execute", setting_at_each_mark)
    assert len(claims) == 2  # sending, in a chunk and alone, by that statement
    assert seen == ["off"] * 4  # mailed and sent, in a chunk and alone
    assert recorded == ["on", "on"]  # each ReminderSent waits for the disk
    pooled = [engine.connect() for _ in range(engine.pool.checkedin() + 1)]
    try:
        assert {c.exec_driver_sql("SHOW synchronous_commit").scalar() for c in pooled} == {
            "on"}
    finally:
        for connection in pooled:
            connection.close()
    assert [status(stack, r) for r in ids] == ["sent", "sent"]


@pytest.mark.parametrize("alone", [True, False], ids=["one", "chunk"])
def test_a_connection_lost_as_the_marks_end_costs_nothing_sent(stack, alone):
    """The sender's connection dies just as it would be put back waiting for the disk
    again: the reminder was sent and recorded, and is answered so; the connection is
    dropped rather than pooled."""
    stack.enrol()
    [reminder_id] = scan_without_sending(stack, WINDOW_OPENS)
    engine = stack.trialog.engine

    def kill_at_reset(connection, cursor, statement, *_):
        if statement == "RESET synchronous_commit":
            pid = connection.connection.dbapi_connection.info.backend_pid
            with engine.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
    sqlalchemy.event.listen(engine, "before_cursor_execute", kill_at_reset)
    try:
        if alone:
            outcome = reminders.send(stack.trialog, mailer, reminder_id, WINDOW_OPENS)
        else:
            outcome = reminders.send_chunk(stack.trialog, mailer, [reminder_id],
                                           WINDOW_OPENS)[reminder_id]
    finally:
        sqlalchemy.event.remove(engine, "before_cursor_execute", kill_at_reset)
    assert outcome == "sent" and status(stack, reminder_id) == "sent"
    assert len(stack.sink.messages) == 1
    with engine.connect() as connection:  # the pool hands out live connections only
        assert connection.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"


# --- at most one email ---------------------------------------------------------------------

def test_a_connection_lost_once_the_message_went_out_is_never_sent_again(stack):
    """The server had the message's content when the connection died, before its reply:
    it may have taken it. The row is marked uncertain, with why; nothing is recorded, and
    no attempt emails it again (a reconnection would send a second email)."""
    pid = stack.enrol()
    (reminder_id,) = scan_without_sending(stack, WINDOW_OPENS)
    stack.sink.dropping = True
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
    assert reminders.send(stack.trialog, mailer, reminder_id, WINDOW_OPENS) == "uncertain"
    row = outbox_row(stack, reminder_id)
    assert (row.status, row.attempts) == ("uncertain", 1)
    assert "not sent again" in row.last_error and "@" not in row.last_error
    assert stack.reminders_sent(pid) == []
    reminders.hand_over(stack.trialog, lambda _: pytest.fail("handed over again"))
    assert reminders.send(stack.trialog, mailer, reminder_id, WINDOW_OPENS) == "done"
    assert len(stack.sink.messages) == 1


@pytest.mark.parametrize(("unread", "status", "emails"), [("DATA", "uncertain", 1),
                                                          ("RCPT", "failed", 0)])
def test_a_reply_the_client_can_t_read_is_uncertain_after_the_message_failed_before(
        stack, unread, status, emails):
    """The server answered with a line longer than smtplib reads: smtplib closes the
    connection and calls it "500 Line too long", its own words, not the server's refusal.
    To the message's content, the server may have taken it: uncertain, not failed. To a
    recipient, nothing went and the server can't be talked to: failed (as smtplib's "500"
    was), not retried for ever."""
    pid = stack.enrol()
    (reminder_id,) = scan_without_sending(stack, WINDOW_OPENS)
    stack.sink.overlong = {unread}
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
    assert reminders.send(stack.trialog, mailer, reminder_id, WINDOW_OPENS) == status
    row = outbox_row(stack, reminder_id)
    assert row.status == status and "Line too long" in row.last_error
    assert stack.reminders_sent(pid) == [] and len(stack.sink.messages) == emails


def test_every_recipient_refused_stays_the_reason_when_the_reset_goes_unread(stack):
    """Every recipient refused, then smtplib's RSET answered past what it reads (it closes
    the connection): the refusals are what the row says, a permanent failure; the next
    message goes over a new connection."""
    pid = stack.enrol()
    other = stack.enrol()
    first, second = scan_without_sending(stack, WINDOW_OPENS)
    refused = first if outbox_row(stack, first).participant_id == pid else second
    stack.sink.refuse = set(addresses(stack, pid))
    stack.sink.overlong = {"RSET"}
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
    assert reminders.send(stack.trialog, mailer, refused, WINDOW_OPENS) == "failed"
    row = outbox_row(stack, refused)
    assert row.status == "failed" and "recipients refused" in row.last_error
    stack.sink.refuse = set()
    other_row = second if refused == first else first
    assert reminders.send(stack.trialog, mailer, other_row, WINDOW_OPENS) == "sent"
    assert stack.reminders_sent(other) and not stack.reminders_sent(pid)


SENDER = """
import os, sys
from datetime import date
from infrastructure.jobs import reminders
from infrastructure.store.bootstrap import bootstrap
from infrastructure.store.settings import Settings
t = bootstrap(Settings.from_env(os.environ))
mailer = reminders.Mailer(t.settings.smtp_url, t.settings.mail_from)
reminders.send(t, mailer, sys.argv[1], date.fromisoformat(sys.argv[2]))
"""


def test_a_sender_killed_while_smtp_talks_leaves_a_reminder_no_one_sends_again(stack):
    """A worker process killed (SIGKILL) while the server holds its answer to DATA: the
    email may have gone. The row says sending; the next sender marks it uncertain and
    emails nobody, so a participant never gets the same reminder twice."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import TEST_SECRETS

    pid = stack.enrol()
    (reminder_id,) = scan_without_sending(stack, WINDOW_OPENS)
    env = {**os.environ, **TEST_SECRETS, "TRIALOG_SMTP_URL": stack.sink.url,
           "TRIALOG_DATABASE_URL": stack.trialog.settings.database_url}
    stack.sink.hold()
    sender = subprocess.Popen([sys.executable, "-c", SENDER, reminder_id,
                               WINDOW_OPENS.isoformat()], env=env)
    try:
        assert stack.sink.received.wait(30)
        assert status(stack, reminder_id) == "sending"
    finally:
        sender.send_signal(signal.SIGKILL)
        sender.wait(10)
        stack.sink.release()
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
    assert once_free(lambda: reminders.send(stack.trialog, mailer, reminder_id,
                                            WINDOW_OPENS)) == "uncertain"
    assert status(stack, reminder_id) == "uncertain"
    assert "sender stopped" in outbox_row(stack, reminder_id).last_error
    assert stack.reminders_sent(pid) == []
    assert len(stack.sink.messages) == 1


def test_a_row_changed_since_it_was_read_is_not_emailed(stack):
    """The sending mark takes the row only as it was read (on SQLite, with no lock, two
    senders could both read it pending): the second finds it taken and emails no one."""
    pid = stack.enrol()
    (reminder_id,) = scan_without_sending(stack, WINDOW_OPENS)
    row = outbox_row(stack, reminder_id)
    with stack.trialog.engine.begin() as connection:  # another sender took it meanwhile
        connection.execute(update(outbox).where(outbox.c.reminder_id == reminder_id)
                           .values(status="sending"))
    t = stack.trialog
    mailer = reminders.Mailer(stack.sink.url, t.settings.mail_from)
    email = reminders.compose(t, t.service.get_participant(pid), row.visit, row.kind,
                              WINDOW_OPENS)
    with t.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        assert reminders._mail(t, connection, mailer, row, email) == ("busy", ())
    assert stack.sink.messages == [] and status(stack, reminder_id) == "sending"


def test_on_sqlite_a_row_sending_is_left_to_its_sender_until_it_has_had_long_enough(
        tmp_path):
    """SQLite has no lock to tell a sender still talking to SMTP from one that stopped: a
    second sender finding the row sending leaves it (busy) for REENQUEUE_AFTER, emailing no
    one and marking nothing; after that it counts the sender as stopped (uncertain)."""
    from infrastructure.store.bootstrap import bootstrap
    from tests.conftest import settings_for
    from tests.integration.test_workers import Clock
    from tests.smtp import smtp_sink

    with smtp_sink() as sink:
        clock = Clock(REGISTERED)
        t = bootstrap(settings_for(f"sqlite:///{tmp_path / 'trialog.db'}",
                                   TRIALOG_SMTP_URL=sink.url), migrate=True, clock=clock)
        try:
            lite = Stack(t, None, sink, clock)  # type: ignore[arg-type]
            pid = lite.enrol()
            (reminder_id,) = scan_without_sending(lite, WINDOW_OPENS)
            mailer = reminders.Mailer(sink.url, t.settings.mail_from)

            def sending_since(moment: datetime) -> None:
                with t.engine.begin() as connection:
                    connection.execute(update(outbox).where(
                        outbox.c.reminder_id == reminder_id).values(
                        status="sending", sending_at=moment, message_id="<m@example.org>"))

            sending_since(datetime.now(UTC) - timedelta(seconds=20))  # a sender talking now
            assert reminders.send(t, mailer, reminder_id, WINDOW_OPENS) == "busy"
            assert reminders.send_chunk(t, mailer, [reminder_id], WINDOW_OPENS) == {
                reminder_id: "busy"}
            row = outbox_row(lite, reminder_id)
            assert (row.status, row.last_error) == ("sending", None)
            sending_since(datetime.now(UTC) - reminders.REENQUEUE_AFTER
                          - timedelta(seconds=1))
            assert reminders.send(t, mailer, reminder_id, WINDOW_OPENS) == "uncertain"
            assert "sender stopped" in outbox_row(lite, reminder_id).last_error
            assert sink.messages == [] and lite.reminders_sent(pid) == []
        finally:
            t.close()


def uncertain_one(stack: Stack) -> tuple[str, str]:
    """A participant and their reminder left uncertain: the connection dropped after the
    message went out."""
    pid = stack.enrol()
    (reminder_id,) = scan_without_sending(stack, WINDOW_OPENS)
    stack.sink.dropping = True
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
    assert reminders.send(stack.trialog, mailer, reminder_id, WINDOW_OPENS) == "uncertain"
    return pid, reminder_id


def test_an_uncertain_reminder_is_shown_with_what_matches_it_in_the_smtp_log(stack):
    pid, reminder_id = uncertain_one(stack)
    [row] = [r for r in reminders.uncertain_rows(stack.trialog) if r.reminder_id == reminder_id]
    shown = reminders.shown(stack.trialog, row)
    [message] = stack.sink.messages
    assert shown["message_id"] == message["Message-ID"]
    assert shown["sending_at"] is not None and shown["participant_id"] == pid
    assert shown["to"] == [mask_email(a) for a in addresses(stack, pid)]
    assert (shown["about"], shown["kind"]) == ("week6", "window_open")
    assert "not sent again" in shown["why"]


def test_an_uncertain_reminder_found_sent_is_recorded_by_who_resolved_it(stack):
    pid, reminder_id = uncertain_one(stack)
    assert reminders.resolve(stack.trialog, reminder_id, sent=True, actor="dm-ana",
                             reason="the SMTP log shows 250 for it") == "sent"
    assert stack.reminders_sent(pid) == ["week6/window_open"]
    participant = stack.trialog.service.get_participant(pid)
    [event] = [e for e in stack.trialog.service.events.get(participant.id)
               if type(e).__name__ == "ReminderSent"]
    assert (event.actor, event.reason) == ("dm-ana", "the SMTP log shows 250 for it")
    assert event.recipients == list(addresses(stack, pid))
    assert status(stack, reminder_id) == "sent"
    with pytest.raises(reminders.NotUncertain, match="is sent, not uncertain"):
        reminders.resolve(stack.trialog, reminder_id, sent=False, actor="dm-ana",
                          reason="a second look")
    assert len(stack.sink.messages) == 1


def test_an_uncertain_reminder_found_not_sent_goes_out_with_the_next_scan(stack):
    pid, reminder_id = uncertain_one(stack)
    assert reminders.resolve(stack.trialog, reminder_id, sent=False, actor="dm-ana",
                             reason="no 250 for its Message-ID in the SMTP log") == "pending"
    stack.scan(WINDOW_OPENS)  # hands the pending row to the workers
    wait_until(lambda: status(stack, reminder_id) == "sent")
    assert len(stack.sink.messages) == 2
    assert stack.reminders_sent(pid) == ["week6/window_open"]


def test_resolving_keeps_who_why_and_the_message_id_on_the_row(stack):
    pid, reminder_id = uncertain_one(stack)
    message_id = outbox_row(stack, reminder_id).message_id
    reminders.resolve(stack.trialog, reminder_id, sent=False, actor="dm-ana",
                      reason=f"nothing in the log for {addresses(stack, pid)[0]}")
    note = outbox_row(stack, reminder_id).last_error
    assert note.startswith("resolved as not sent by dm-ana on ")
    assert f"(Message-ID {message_id})" in note and "before: the connection failed" in note
    assert addresses(stack, pid)[0] not in note  # masked, as every address on the row


def test_an_uncertain_reminder_recorded_already_is_resolved_sent_without_a_second_event(
        stack):
    """An earlier resolution recorded ReminderSent, then stopped before marking the row:
    resolving it again (with a reason, which makes another command under the same id)
    only marks the row."""
    pid, reminder_id = uncertain_one(stack)
    row = outbox_row(stack, reminder_id)
    intent = reminders._reminder_sent(stack.trialog, row, addresses(stack, pid))
    stack.trialog.bus.dispatch(intent.command, command_id=intent.command_id, actor="dm-ana")
    assert reminders.resolve(stack.trialog, reminder_id, sent=True, actor="dm-ana",
                             reason="250 in the SMTP log") == "sent"
    assert stack.reminders_sent(pid) == ["week6/window_open"]


def test_an_uncertain_reminder_without_its_addresses_is_recorded_to_the_current_ones(stack):
    """A row that kept no addresses (from before the rows kept them): ReminderSent names
    the addresses as they are now, never none."""
    pid, reminder_id = uncertain_one(stack)
    with stack.trialog.engine.begin() as connection:
        connection.execute(update(outbox).where(outbox.c.reminder_id == reminder_id)
                           .values(mailed_to=None))
    reminders.resolve(stack.trialog, reminder_id, sent=True, actor="dm-ana",
                      reason="250 in the SMTP log")
    participant = stack.trialog.service.get_participant(pid)
    [event] = [e for e in stack.trialog.service.events.get(participant.id)
               if type(e).__name__ == "ReminderSent"]
    assert event.recipients == list(addresses(stack, pid))


def test_a_reminder_being_resolved_or_sent_is_not_resolved_at_the_same_time(stack):
    _, reminder_id = uncertain_one(stack)
    with reminders._alone_with(stack.trialog, reminder_id) as held:  # another has it
        assert held is not None
        with pytest.raises(reminders.NotUncertain, match="being sent or resolved now"):
            reminders.resolve(stack.trialog, reminder_id, sent=True, actor="dm-ana",
                              reason="250 in the SMTP log")
    assert status(stack, reminder_id) == "uncertain"


def test_a_row_sending_is_handed_over_again_only_once_its_sender_had_long_enough(stack):
    stack.enrol(), stack.enrol()
    fresh, old = scan_without_sending(stack, WINDOW_OPENS)
    now = reminders.datetime.now(reminders.UTC)
    with stack.trialog.engine.begin() as connection:
        for reminder_id, began in ((fresh, now), (old, now - timedelta(minutes=10))):
            connection.execute(update(outbox).where(outbox.c.reminder_id == reminder_id)
                               .values(status="sending", sending_at=began, enqueued_at=None))
    handed: list[str] = []
    reminders.hand_over(stack.trialog, handed.append)
    assert handed == [old]


def test_the_command_line_lists_and_resolves_uncertain_reminders(stack, monkeypatch, capsys):
    import json

    from infrastructure.cli import main
    from tests.conftest import TEST_SECRETS

    pid, reminder_id = uncertain_one(stack)
    for name, value in {**TEST_SECRETS,
                        "TRIALOG_DATABASE_URL": stack.trialog.settings.database_url}.items():
        monkeypatch.setenv(name, value)
    assert main(["reminders", "uncertain"]) == 0
    out = capsys.readouterr().out
    listed = [json.loads(line) for line in out.splitlines()]
    assert [r["reminder_id"] for r in listed] == [reminder_id]
    assert listed[0]["to"] == [mask_email(a) for a in addresses(stack, pid)]
    assert not any(a in out for a in addresses(stack, pid))
    assert main(["reminders", "resolve", reminder_id, "--sent", "--actor", "dm-ana",
                 "--reason", "250 in the SMTP log"]) == 0
    assert capsys.readouterr().out == f"reminder {reminder_id}: sent\n"
    assert main(["reminders", "resolve", reminder_id, "--not-sent", "--actor", "dm-ana",
                 "--reason", "x"]) == 1
    assert "is sent, not uncertain" in capsys.readouterr().err
    assert main(["reminders", "resolve", "no-such-id", "--sent", "--actor", "dm-ana",
                 "--reason", "x"]) == 1
    assert capsys.readouterr().err == "trialog: no reminder no-such-id in the outbox\n"
    assert stack.reminders_sent(pid) == ["week6/window_open"]


def test_a_chunk_leaves_a_reminder_another_sender_holds(stack):
    stack.enrol(), stack.enrol()
    ids = scan_without_sending(stack, WINDOW_OPENS)
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
    with reminders._alone_with(stack.trialog, ids[0]) as held:  # another sender has it
        assert held is not None
        outcomes = reminders.send_chunk(stack.trialog, mailer, ids, WINDOW_OPENS)
    assert outcomes == {ids[0]: "busy", ids[1]: "sent"}
    assert status(stack, ids[0]) == "pending" and status(stack, ids[1]) == "sent"
    assert len(stack.sink.messages) == 1


def test_a_server_that_cant_take_a_message_now_ends_the_chunk_after_recording(stack):
    """A server that can't take two messages in a row can take none now: the chunk ends
    (the rows after them untried), what was mailed recorded first."""
    pids = [stack.enrol() for _ in range(4)]
    ids = scan_without_sending(stack, WINDOW_OPENS)
    order = {outbox_row(stack, r).participant_id: r for r in ids}
    stack.sink.busy_after = stack.sink.mails + 1  # the first message, then 451 to MAIL
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
    with pytest.raises(reminders.TransientMailError):
        reminders.send_chunk(stack.trialog, mailer, [order[pid] for pid in pids],
                             WINDOW_OPENS)
    assert status(stack, order[pids[0]]) == "sent"  # recorded before the error went up
    assert stack.reminders_sent(pids[0]) == ["week6/window_open"]
    rows = [outbox_row(stack, order[pid]) for pid in pids[1:]]
    assert [(row.status, row.attempts) for row in rows] == [("pending", 1), ("pending", 1),
                                                             ("pending", 0)]
    assert all(stack.reminders_sent(pid) == [] for pid in pids[1:])


def test_a_message_the_server_defers_holds_up_no_other_reminder_of_its_chunk(stack):
    """A 451 to one message's DATA (a content filter's "not now") ended the chunk, and
    each retry of the task met that message first again: the chunk's other reminders
    waited for the next scan's hand-over. The server took the next message, so the
    chunk goes on; the deferred row stays pending, and the task is retried for it."""
    deferred, *others = [stack.enrol() for _ in range(3)]
    ids = scan_without_sending(stack, WINDOW_OPENS)
    order = {outbox_row(stack, r).participant_id: r for r in ids}
    stack.sink.defer_data = {addresses(stack, deferred)[0]}
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
    with pytest.raises(reminders.TransientMailError, match="451"):
        reminders.send_chunk(stack.trialog, mailer, [order[deferred]]
                             + [order[pid] for pid in others], WINDOW_OPENS)
    row = outbox_row(stack, order[deferred])
    assert (row.status, row.attempts) == ("pending", 1) and "451" in row.last_error
    assert stack.reminders_sent(deferred) == []
    for pid in others:
        assert status(stack, order[pid]) == "sent"
        assert stack.reminders_sent(pid) == ["week6/window_open"]
    assert [to for _, to in stack.sink.envelopes] == [list(addresses(stack, pid))
                                                      for pid in others]


def test_a_connection_the_server_closed_while_idle_is_opened_again_and_sends_once():
    """The kept connection found closed before the message went out (the server reads
    nothing of it): a new connection sends it, once; only a failure after the content
    went out leaves a reminder uncertain."""
    import socket

    from infrastructure.jobs.reminders import Email, Mailer
    from tests.smtp import smtp_sink

    with smtp_sink() as sink:
        mailer = Mailer(sink.url, "Trialog Reminders <reminders@trialog.example>")
        try:
            assert mailer.send(Email(("ana@example.org",), "One", "1", "<p>1</p>")) == {}
            assert mailer._smtp is not None
            mailer._smtp.sock.shutdown(socket.SHUT_RD)  # as if closed by the server
            assert mailer.send(Email(("ana@example.org",), "Two", "2", "<p>2</p>")) == {}
        finally:
            mailer.close()
        assert [m["Subject"] for m in sink.wait_for(2)] == ["One", "Two"]
        time.sleep(0.2)
        assert len(sink.messages) == 2


def test_the_mailer_sends_the_envelope_it_is_given_and_refuses_an_address_the_server_cant_take():
    """ASCII addresses go as the envelope given; an address beyond ASCII needs the
    server's SMTPUTF8, and without it the message is refused for good (not retried)."""
    from infrastructure.jobs.reminders import Email, Mailer, PermanentMailError, RecipientDeferred
    from tests.smtp import smtp_sink, text_of

    with smtp_sink() as sink:
        mailer = Mailer(sink.url, "Trialog Reminders <reminders@trialog.example>")
        try:
            refused = mailer.send(Email(("ana@example.org", "site@example.org"),
                                        "Visit tomorrow", "See you.", "<p>See you.</p>"))
            assert refused == {}
            [message] = sink.wait_for(1)
            assert sink.envelopes == [("reminders@trialog.example",
                                       ["ana@example.org", "site@example.org"])]
            assert message["To"] == "ana@example.org, site@example.org"
            with pytest.raises(PermanentMailError):
                mailer.send(Email(("josé@example.org",), "Visit", "t", "<p>t</p>"))
            assert len(sink.messages) == 1
        finally:
            mailer.close()
    with smtp_sink(smtputf8=True) as sink:
        mailer = Mailer(sink.url, "Trialog Reminders <reminders@trialog.example>")
        try:
            assert mailer.send(Email(("josé@example.org",), "Visita mañana", "Hola José.",
                                     "<p>Hola José.</p>")) == {}
            [message] = sink.wait_for(1)
            assert sink.envelopes == [("reminders@trialog.example", ["josé@example.org"])]
            assert "Hola José." in text_of(message)
            # The envelope as given there too: an addressee refused for now is known as
            # the addressee (the headers parsed back may spell an address otherwise).
            odd = 'ana\\b@example.org'
            sink.defer = {'"ana\\\\b"@example.org'}  # as smtplib quotes it in RCPT
            with pytest.raises(RecipientDeferred):
                mailer.send(Email((odd, "josé@example.org"), "Visita", "t", "<p>t</p>"))
            assert len(sink.messages) == 1
        finally:
            mailer.close()


@contextmanager
def withdrawn_while_the_first_is_mailed(stack: Stack, pid: str) -> Iterator[None]:
    """The server holds its answer to the first message of the chunk sent inside until
    ``pid`` has left the study."""
    import threading

    stack.sink.hold()

    def withdraw() -> None:
        try:
            assert stack.sink.received.wait(30)
            stack.trialog.bus.dispatch(
                c.WithdrawParticipant(pid, {"withdrawn_on": WINDOW_OPENS,
                                            "scope": "study", "reason_code": "moved"}),
                command_id=str(uuid.uuid4()), actor="coordinator")
        finally:
            stack.sink.release()

    withdrawing = threading.Thread(target=withdraw)
    withdrawing.start()
    try:
        yield
    finally:
        withdrawing.join(30)


def test_a_withdrawal_committed_while_a_chunk_is_mailed_holds_for_the_rows_after_it(
        stack, monkeypatch):
    """A chunk reads its participants together, and again once they are FRESH_FOR old: a
    participant who leaves the study while the rows before theirs are mailed is not
    emailed."""
    first, second = stack.enrol(), stack.enrol()
    ids = scan_without_sending(stack, WINDOW_OPENS)
    order = {outbox_row(stack, r).participant_id: r for r in ids}
    monkeypatch.setattr(reminders, "FRESH_FOR", 0.0)  # read again after every row
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
    try:
        with withdrawn_while_the_first_is_mailed(stack, second):
            outcomes = reminders.send_chunk(stack.trialog, mailer,
                                            [order[first], order[second]], WINDOW_OPENS)
    finally:
        mailer.close()
    assert outcomes == {order[first]: "sent", order[second]: "cancelled"}
    assert len(stack.sink.messages) == 1
    assert stack.reminders_sent(second) == []


def test_a_withdrawal_committed_while_a_deferred_message_was_tried_holds_for_the_next(
        stack, monkeypatch):
    """The chunk went on past a message the server could not take now with the
    participants it had read before trying it (a try of up to the server's timeout, twice
    with a new connection), and emailed one who had left the study meanwhile."""
    deferred, second = stack.enrol(), stack.enrol()
    ids = scan_without_sending(stack, WINDOW_OPENS)
    order = {outbox_row(stack, r).participant_id: r for r in ids}
    monkeypatch.setattr(reminders, "FRESH_FOR", 0.0)  # read again after every row
    stack.sink.defer_data = {addresses(stack, deferred)[0]}  # answered 451, when released
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
    try:
        with withdrawn_while_the_first_is_mailed(stack, second), pytest.raises(
                reminders.TransientMailError, match="451"):
            reminders.send_chunk(stack.trialog, mailer, [order[deferred], order[second]],
                                 WINDOW_OPENS)
    finally:
        mailer.close()
    assert (status(stack, order[deferred]), status(stack, order[second])) == (
        "pending", "cancelled")
    assert stack.sink.messages == [] and stack.reminders_sent(second) == []


@pytest.mark.parametrize("down", ["refused", "421 to RCPT"])
def test_a_server_that_cant_be_reached_ends_the_chunk_at_once(stack, down):
    """A server down (the connection refused, or closing it with a 421) was tried again
    for the next row of the chunk, each try up to the server's timeout; it takes no
    message, so the chunk ends at the first, the rows after it untried."""
    pids = [stack.enrol() for _ in range(3)]
    ids = scan_without_sending(stack, WINDOW_OPENS)
    order = {outbox_row(stack, r).participant_id: r for r in ids}
    from tests.e2e.conftest import free_port

    url = stack.sink.url
    if down == "refused":
        url = f"smtp://127.0.0.1:{free_port()}"
    else:
        stack.sink.closing = {addresses(stack, pid)[0] for pid in pids}
    mailer = reminders.Mailer(url, stack.trialog.settings.mail_from)
    with pytest.raises(reminders.ServerUnavailable):
        reminders.send_chunk(stack.trialog, mailer, [order[pid] for pid in pids],
                             WINDOW_OPENS)
    rows = [outbox_row(stack, order[pid]) for pid in pids]
    assert [(row.status, row.attempts) for row in rows] == [("pending", 1), ("pending", 0),
                                                             ("pending", 0)]


@pytest.mark.parametrize("isolated_url", ["postgresql"], indirect=True)
def test_a_scan_that_meets_another_scans_rows_writes_each_row_once(isolated):
    """Two scans at once (beat's and `trialog reminders scan`): the second's insert of the
    rows the first had just written crashed it with an IntegrityError."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from tests.integration.helpers import enrol

    pid = enrol(isolated)
    TrialProjection(isolated).catch_up()
    met: list[list[str]] = []

    def another_scan_commits_first(conn, cursor, statement, *_):
        if not met and statement.lstrip().upper().startswith("INSERT INTO TRIALOG_OUTBOX"):
            met.append([])
            met[0] = reminders.scan(isolated, WINDOW_OPENS)  # on a connection of its own

    event.listen(Engine, "before_cursor_execute", another_scan_commits_first)
    try:
        ours = reminders.scan(isolated, WINDOW_OPENS)
    finally:
        event.remove(Engine, "before_cursor_execute", another_scan_commits_first)
    with isolated.engine.connect() as connection:
        rows = connection.execute(select(outbox.c.reminder_id, outbox.c.kind).where(
            outbox.c.participant_id == pid)).all()
    assert [kind for _, kind in rows] == ["window_open"]
    assert met == [[rows[0].reminder_id]] and set(ours) <= {rows[0].reminder_id}
