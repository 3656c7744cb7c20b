"""Query emails with a real Celery worker, Redis, PostgreSQL and SMTP server: one email to
the site coordinator when a query is raised (in the coordinator's language, once however
often the scan runs), and a weekly digest of the queries open more than 7 days."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import date, timedelta

import pytest
from sqlalchemy import select, update

from domain import commands as c
from infrastructure.jobs import query_notices, reminders
from infrastructure.readside.projections import TrialProjection
from infrastructure.store.tables import outbox
from tests.integration import test_workers
from tests.integration.test_workers import REGISTERED, wait_until
from tests.smtp import text_of

stack = test_workers.stack  # the fixture: a Celery worker, Redis, PostgreSQL, an SMTP server
BASELINE = {"visit": "baseline", "completed_on": REGISTERED}


def raise_query(stack, pid: str, text: str) -> str:
    query_id = str(uuid.uuid4())
    stack.send(c.RaiseQuery(pid, {"query_id": query_id, "text": text, "visit": "baseline"}))
    return query_id


def act_on(stack, pid: str, query_id: str, steps: list[tuple[str, str | None]]) -> None:
    """Steps on the query by the monitor (or the coordinator): (command type, text)."""
    for name, text in steps:
        stack.trialog.bus.dispatch(
            c.COMMAND_TYPES[name](pid, {"query_id": query_id, "text": text}),
            command_id=str(uuid.uuid4()), actor="cra-1", reason="the source disagrees")


def scanned_row(stack) -> str:
    """The one outbox row the scan on REGISTERED writes (not handed to the workers)."""
    stack.clock.set(REGISTERED)
    TrialProjection(stack.trialog).catch_up()
    [row_id] = reminders.scan(stack.trialog, REGISTERED)
    return row_id


def test_the_site_coordinator_gets_one_email_per_raised_query(stack):
    pid = stack.enrol()
    stack.send(c.CompleteVisit(pid, BASELINE))
    query_id = raise_query(stack, pid, "Is the worst pain 7 or 8?")
    stack.scan(REGISTERED)
    [message] = stack.sink.wait_for(1)
    coordinator = stack.trialog.protocol.site("CASE").coordinator_email
    assert message["To"] == coordinator
    assert message["Subject"] == f"New query on participant {pid}"
    body = text_of(message)
    assert "Is the worst pain 7 or 8?" in body and "the baseline visit" in body
    assert "@example.org" not in body  # nothing of the participant's contact details
    wait_until(lambda: f"{query_id}/query_raised" in stack.reminders_sent(pid))
    # Scanning again, or sending the row again, emails nobody.
    stack.scan(REGISTERED)
    row_id = query_notices.notice_id("query_raised", pid, query_id)
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
    assert reminders.send(stack.trialog, mailer, row_id, REGISTERED) == "done"
    assert len(stack.sink.messages) == 1


def test_an_address_quoted_in_a_raised_querys_text_is_masked_in_its_email(stack):
    """The weekly digest quoted a query's text with an address in it masked (from the read
    models), while the email announcing the query quoted it whole, from the record: an
    address a monitor quotes to ask about it leaves the database masked, as in every
    other place it is shown."""
    pid = stack.enrol()
    stack.send(c.CompleteVisit(pid, BASELINE))
    raise_query(stack, pid, "Is ana.lopez@example.org her address? BP 120/80@10.30am")
    stack.scan(REGISTERED)
    [message] = stack.sink.wait_for(1)
    body = text_of(message)
    assert "ana.lopez@example.org" not in body
    assert "a***@example.org her address? BP 120/80@10.30am" in body


def test_a_query_cancelled_before_its_email_goes_is_not_announced(stack):
    pid = stack.enrol()
    stack.send(c.CompleteVisit(pid, BASELINE))
    query_id = raise_query(stack, pid, "raised in error")
    stack.send(c.CancelQuery(pid, {"query_id": query_id, "text": "sorry"}))
    row_id = scanned_row(stack)
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
    assert reminders.send(stack.trialog, mailer, row_id, REGISTERED) == "cancelled"
    assert stack.sink.messages == []


ANSWERED = [("RespondToQuery", "8")]
CLOSED = [*ANSWERED, ("CloseQuery", None)]


@pytest.mark.parametrize("after, outcome", [
    (ANSWERED, "cancelled"), (CLOSED, "cancelled"),
    ([*CLOSED, ("ReopenQuery", "which form?")], "sent")],
    ids=["answered", "closed", "reopened"])
def test_only_a_query_still_open_when_its_email_goes_is_announced(stack, after, outcome):
    """The email asks the coordinator to answer: a query answered or closed before the
    scan's email goes is not announced; one reopened since is."""
    pid = stack.enrol()
    stack.send(c.CompleteVisit(pid, BASELINE))
    query_id = raise_query(stack, pid, "Is the worst pain 7 or 8?")
    act_on(stack, pid, query_id, after)
    row_id = scanned_row(stack)
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
    assert reminders.send(stack.trialog, mailer, row_id, REGISTERED) == outcome
    assert len(stack.sink.messages) == (outcome == "sent")


def test_the_email_names_the_visit_as_the_reminders_do(stack):
    pid = stack.enrol()
    stack.send(c.CompleteVisit(pid, BASELINE))
    stack.send(c.RaiseQuery(pid, {"query_id": str(uuid.uuid4()), "text": "which scale?",
                                  "visit": "week6"}))
    stack.scan(REGISTERED)
    [message] = stack.sink.wait_for(1)
    assert "About: the week 6 visit" in text_of(message)


def test_a_query_on_an_event_and_field_is_announced_and_digested(stack):
    """A query raised on an event (not a visit) names the event and field; a week later
    the digest lists it. Both emails failed to render before (its target has no visit)."""
    pid = stack.enrol()
    version = stack.send(c.CompleteVisit(pid, BASELINE))["version"]
    event_id = stack.trialog.service.get_participant(pid).event_id_of(version)
    stack.send(c.RaiseQuery(pid, {"query_id": str(uuid.uuid4()), "text": "7 or 8?",
                                  "event_id": event_id, "field": "bpi_sf.worst"}))
    stack.scan(REGISTERED)
    [message] = stack.sink.wait_for(1)
    assert f"About: event {event_id}, field bpi_sf.worst" in text_of(message)
    stack.scan(REGISTERED + timedelta(days=8))
    [_, digest] = stack.sink.wait_for(2)
    assert f"{pid}, 8 days, open: 7 or 8?" in text_of(digest)


def test_a_query_email_mailed_before_the_query_closed_is_recorded_as_sent_to_the_coordinator(
        stack):
    """The server took the email, then recording ReminderSent failed (the row is left
    mailed); the query is closed before the next attempt records it: the record names
    the coordinator it went to, not nobody."""
    pid = stack.enrol()
    stack.send(c.CompleteVisit(pid, BASELINE))
    query_id = raise_query(stack, pid, "Is the worst pain 7 or 8?")
    row_id = scanned_row(stack)
    with stack.trialog.engine.begin() as connection:
        connection.execute(update(outbox).where(outbox.c.reminder_id == row_id)
                           .values(status="mailed"))
    act_on(stack, pid, query_id, CLOSED)
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
    assert reminders.send(stack.trialog, mailer, row_id, REGISTERED) == "sent"
    assert stack.sink.messages == []  # not emailed again
    participant = stack.trialog.service.get_participant(pid)
    [sent] = [e for e in stack.trialog.service.events.get(participant.id)
              if type(e).__name__ == "ReminderSent"]
    assert sent.recipients == [stack.trialog.protocol.site("CASE").coordinator_email]
    with stack.trialog.engine.connect() as connection:
        assert connection.execute(select(outbox.c.status).where(
            outbox.c.reminder_id == row_id)).scalar() == "sent"


def test_the_email_speaks_the_coordinators_language(stack):
    t = stack.trialog
    spanish = tuple(replace(s, coordinator_language="es") for s in t.protocol.sites)
    original = t.protocol
    t.protocol = replace(original, sites=spanish)
    try:
        pid = stack.enrol()
        stack.send(c.CompleteVisit(pid, BASELINE))
        raise_query(stack, pid, "¿Dolor máximo?")
        stack.scan(REGISTERED)
        [message] = stack.sink.wait_for(1)
        assert message["Subject"] == f"Nueva consulta sobre el participante {pid}"
        assert "Por favor, respóndala" in text_of(message)
        assert "la visita inicial" in text_of(message)
    finally:
        t.protocol = original


def test_each_week_the_coordinator_gets_a_digest_of_queries_open_more_than_7_days(stack):
    pid = stack.enrol()
    stack.send(c.CompleteVisit(pid, BASELINE))
    old = raise_query(stack, pid, "an old question")
    stack.scan(REGISTERED)
    stack.sink.wait_for(1)  # the query's own email
    stack.clock.set(REGISTERED + timedelta(days=3))
    raise_query(stack, pid, "a newer question")
    later = REGISTERED + timedelta(days=8)
    stack.scan(later)
    messages = stack.sink.wait_for(2)  # the newer one, raised 5 days ago, is not announced
    digests = [m for m in messages if "open more than 7 days" in m["Subject"]]
    assert len(digests) == 1, [m["Subject"] for m in messages]
    body = text_of(digests[0])
    assert f"{pid}, 8 days, open" in body and "an old question" in body
    assert "answer the open ones" in body  # an answered one waits for a monitor
    assert "a newer question" not in body
    # The same week again: no second digest; the next week, one more.
    stack.scan(later + timedelta(days=1))
    stack.send(c.RespondToQuery(pid, {"query_id": old, "text": "8, see the source"}))
    stack.scan(date.fromordinal(later.toordinal() + 7))
    wait_until(lambda: len([m for m in stack.sink.messages
                            if "open more than 7 days" in m["Subject"]]) == 2)


def test_a_chunk_sends_a_digest_too(stack):
    """The workers send the outbox in chunks: a digest row (no participant) among them
    is sent, not marked failed."""
    pid = stack.enrol()
    stack.send(c.CompleteVisit(pid, BASELINE))
    raise_query(stack, pid, "an old question")
    later = REGISTERED + timedelta(days=8)
    stack.clock.set(later)
    TrialProjection(stack.trialog).catch_up()
    ids = reminders.scan(stack.trialog, later)
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
    outcomes = reminders.send_chunk(stack.trialog, mailer, ids, later)
    assert list(outcomes.values()) == ["sent"]
    [message] = stack.sink.messages
    assert "open more than 7 days" in message["Subject"]


def test_a_query_email_the_coordinators_server_defers_waits_then_expires_after_a_day(stack):
    """Deferred, it was handed over again every 5 minutes for as long as the query
    stayed open."""
    pid = stack.enrol()
    stack.send(c.CompleteVisit(pid, BASELINE))
    raise_query(stack, pid, "Is the worst pain 7 or 8?")
    row_id = scanned_row(stack)
    stack.sink.defer = {stack.trialog.protocol.site("CASE").coordinator_email}
    mailer = reminders.Mailer(stack.sink.url, stack.trialog.settings.mail_from)
    assert reminders.send(stack.trialog, mailer, row_id, REGISTERED) == "deferred"
    with stack.trialog.engine.begin() as connection:  # a day later, still deferred
        connection.execute(update(outbox).where(outbox.c.reminder_id == row_id).values(
            created_at=outbox.c.created_at - timedelta(days=1, minutes=1)))
    assert reminders.send(stack.trialog, mailer, row_id, REGISTERED) == "expired"
    with stack.trialog.engine.connect() as connection:
        row = connection.execute(select(outbox).where(outbox.c.reminder_id == row_id)).one()
    assert row.status == "expired" and "451" in row.last_error
    assert stack.sink.messages == []
