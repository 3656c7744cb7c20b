"""Reminders and the deviation monitor with a real Celery worker, real Redis and a real
SMTP server, on a fresh PostgreSQL database and a clock the test moves."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from sqlalchemy import select

import workers.app
from domain import commands as c
from domain.access import EVERY_SITE
from infrastructure.jobs import reminders
from infrastructure.readside.projections import TrialProjection
from infrastructure.readside.queries import list_deviations
from infrastructure.store.bootstrap import Trialog, bootstrap
from infrastructure.store.tables import outbox
from tests.conftest import migrated_postgres_template, settings_for
from tests.databases import PG_SERVER, fresh_postgres_database
from tests.factories import consent, new_participant_id, screening
from tests.smtp import Sink, smtp_sink, text_of
from workers.app import make_app

REGISTERED = date(2026, 3, 4)


class Clock:
    def __init__(self, today: date) -> None:
        self.now = datetime(today.year, today.month, today.day, 12, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def set(self, today: date) -> None:
        self.now = datetime(today.year, today.month, today.day, 12, tzinfo=UTC)


@dataclass
class Stack:
    trialog: Trialog
    app: Celery
    sink: Sink
    clock: Clock

    def task(self, name: str) -> Any:
        return self.app.tasks[f"workers.tasks.{name}"]

    def enrol(self, language: str = "en", registered_on: date = REGISTERED,
              site: str = "CASE", email: str | None = None) -> str:
        pid = new_participant_id(site)
        data = screening(site) | {"language": language,
                                  "email": email or f"{pid.lower()}@example.org"}
        for command in (c.ScreenParticipant(pid, data), c.RecordConsent(pid, consent()),
                        c.RandomizeParticipant(pid, {"registered_on": registered_on})):
            self.send(command)
        return pid

    def send(self, command: c.Command) -> dict[str, Any]:
        return self.trialog.bus.dispatch(command, command_id=str(uuid.uuid4()),
                                         actor="test").body

    def scan(self, today: date) -> list[str]:
        self.clock.set(today)
        TrialProjection(self.trialog).catch_up()
        return reminders.scan(self.trialog, today, enqueue=self.task("send_reminder").delay)

    def reminders_sent(self, pid: str) -> list[str]:
        return list(self.trialog.service.get_participant(pid).reminders)


def quick_to_stop(app: Celery) -> dict[str, Any]:
    """The app's broker options with Redis asked for a task every 0.1 s rather than every
    second: a stopping worker waits for its pending ask to end, 0.7 s a test otherwise."""
    return {**app.conf.broker_transport_options, "polling_interval": 0.1}


@pytest.fixture
def stack() -> Iterator[Stack]:
    with fresh_postgres_database("trialog_workers", template=migrated_postgres_template()
                                 ) as name, smtp_sink() as sink:
        settings = settings_for(f"{PG_SERVER}/{name}", TRIALOG_SMTP_URL=sink.url)
        clock = Clock(REGISTERED)
        trialog = bootstrap(settings, migrate=True, clock=clock)
        app = make_app(settings)
        app.conf.task_default_queue = f"trialog-test-{uuid.uuid4().hex[:8]}"
        app.conf.broker_transport_options = quick_to_stop(app)
        app.set_current()
        workers.app._trialog[id(app)] = trialog
        try:
            with worker(app):
                yield Stack(trialog, app, sink, clock)
        finally:
            workers.app._trialog.pop(id(app), None)
            workers.app.app.set_current()
            trialog.close()


@contextmanager
def worker(app: Celery) -> Iterator[None]:
    """A Celery worker in this process, the root logger's level left as it was found: the
    worker sets it to ERROR, and the tests after it then captured no warning."""
    root = logging.getLogger()
    level = root.level
    try:
        with start_worker(app, perform_ping_check=False, shutdown_timeout=30):
            yield
    finally:
        root.setLevel(level)


def wait_until(condition, timeout: float = 30) -> Any:
    """Polls ``condition`` until it gives something true: that."""
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return found


def test_reminders_arrive_once_in_the_participants_language_at_their_offsets(stack):
    english, spanish = stack.enrol("en"), stack.enrol("es")
    week6 = REGISTERED + timedelta(days=42)

    assert stack.scan(week6 - timedelta(days=8)) == []  # the day before the window opens
    assert len(stack.scan(week6 - timedelta(days=7))) == 2  # window_open, both
    messages = stack.sink.wait_for(2)
    by_recipient = {m["To"].split(",")[0]: m for m in messages}
    assert by_recipient[f"{english.lower()}@example.org"]["Subject"] == \
        "Reminder: your week 6 visit"
    spanish_message = by_recipient[f"{spanish.lower()}@example.org"]
    assert spanish_message["Subject"] == "Recordatorio: su visita de la semana 6"
    assert "a partir de hoy" in text_of(spanish_message)
    coordinator = stack.trialog.protocol.site("CASE").coordinator_email
    assert coordinator in spanish_message["To"]
    assert {p.get_content_type() for p in spanish_message.walk()} >= {"text/plain",
                                                                     "text/html"}
    wait_until(lambda: stack.reminders_sent(english) == ["week6/window_open"])

    assert stack.scan(week6 - timedelta(days=6)) == []  # nothing new the next day
    assert len(stack.scan(week6 - timedelta(days=3))) == 2  # three_days_before
    stack.sink.wait_for(4)
    wait_until(lambda: stack.reminders_sent(spanish) == ["week6/window_open",
                                                         "week6/three_days_before"])
    time.sleep(0.5)
    assert len(stack.sink.messages) == 4


def test_no_reminder_for_a_completed_visit_or_a_withdrawn_participant(stack):
    done, withdrawn = stack.enrol(), stack.enrol()
    week6 = REGISTERED + timedelta(days=42)
    stack.clock.set(week6 - timedelta(days=7))  # a record holds no date after its day
    stack.send(c.CompleteVisit(done, {"visit": "week6", "completed_on": week6 - timedelta(7)}))
    stack.send(c.WithdrawParticipant(withdrawn, {"withdrawn_on": REGISTERED + timedelta(20),
                                                 "scope": "study", "reason_code": "moved"}))
    assert stack.scan(week6 - timedelta(days=7)) == []


def test_a_withdrawal_after_the_scan_cancels_what_has_not_gone_out(stack):
    pid = stack.enrol()
    week6 = REGISTERED + timedelta(days=42)
    stack.clock.set(week6 - timedelta(days=7))
    TrialProjection(stack.trialog).catch_up()
    (reminder_id,) = reminders.scan(stack.trialog, week6 - timedelta(days=7))  # no enqueue
    stack.send(c.WithdrawParticipant(pid, {"withdrawn_on": week6 - timedelta(days=7),
                                           "scope": "study", "reason_code": "moved"}))
    stack.task("send_reminder").delay(reminder_id)
    wait_until(lambda: _status(stack, reminder_id) == "cancelled")
    assert stack.sink.messages == [] and stack.reminders_sent(pid) == []


def test_a_refused_address_is_recorded_as_failed_and_not_retried(stack):
    pid = stack.enrol()
    stack.sink.refuse = {f"{pid.lower()}@example.org",
                         stack.trialog.protocol.site("CASE").coordinator_email}
    (reminder_id,) = stack.scan(REGISTERED + timedelta(days=35))
    wait_until(lambda: _status(stack, reminder_id) == "failed")
    with stack.trialog.engine.connect() as connection:
        row = connection.execute(select(outbox).where(outbox.c.reminder_id == reminder_id)).one()
    assert row.attempts == 1 and "refused" in row.last_error
    assert f"{pid.lower()}@example.org" not in row.last_error  # contact details: masked
    assert f"{pid.lower()[0]}***@example.org" in row.last_error
    assert stack.reminders_sent(pid) == []
    assert reminders.hand_over(stack.trialog, stack.task("send_reminder").delay) == 0


def test_the_deviation_monitor_flags_events_as_they_arrive(stack):
    pid = stack.enrol()
    stack.send(c.ReportMedication(pid, {  # the seed's missed-washout case
        "drug": "multivitamin with B12", "started_on": date(2025, 1, 1),
        "stopped_on": REGISTERED - timedelta(days=5), "contains_b12": True}))
    stack.task("follow_deviations").delay()
    wait_until(lambda: "washout_incomplete" in {
        d["code"] for d in stack.trialog.service.get_participant(pid).deviations.values()})
    TrialProjection(stack.trialog).catch_up()
    listed = list_deviations(stack.trialog, scope=EVERY_SITE, participant_id=pid, status="open")
    assert [d["code"] for d in listed] == ["washout_incomplete"]
    assert listed[0]["severity"] == "major"

    stack.task("follow_deviations").delay()  # again: nothing new
    time.sleep(1)
    assert len(stack.trialog.service.get_participant(pid).deviations) == 1


def test_the_two_second_tasks_are_logged_only_when_they_did_something(caplog):
    """Beat sends follow_deviations and dispatch_webhooks every two seconds: Celery's INFO
    lines about them (beat's sending; a worker's receipt and success, four lines every two
    seconds) would bury the others. Logged as Celery logs them (the suite's workers log
    errors only)."""
    import logging

    from celery.app.trace import LOG_RECEIVED, LOG_SUCCESS

    caplog.set_level(logging.INFO)
    for task in ("follow_deviations", "dispatch_webhooks", "scan_deviations"):
        name, entry = f"workers.tasks.{task}", task.replace("_", "-")
        logging.getLogger("celery.beat").info("Scheduler: Sending due task %s (%s)",
                                              entry, name)
        for found in ("0", "3"):
            received = {"id": str(uuid.uuid4()), "name": name, "args": "()", "kwargs": "{}",
                        "eta": None}
            succeeded = {**received, "return_value": found, "runtime": 0.01}
            for logger, line, context in (("celery.worker.strategy", LOG_RECEIVED, received),
                                          ("celery.app.trace", LOG_SUCCESS, succeeded)):
                logging.getLogger(logger).info(line, context, extra={"data": context})
    logged = [(r.name, r.getMessage().split(":")[0].split("[")[0], r.getMessage()[-1])
              for r in caplog.records if r.name.startswith("celery")]
    assert logged == [
        ("celery.app.trace", "Task workers.tasks.follow_deviations", "3"),  # did something
        ("celery.app.trace", "Task workers.tasks.dispatch_webhooks", "3"),
        ("celery.beat", "Scheduler", ")"),  # every other task as before
        ("celery.worker.strategy", "Task workers.tasks.scan_deviations", "d"),
        ("celery.app.trace", "Task workers.tasks.scan_deviations", "0"),
        ("celery.worker.strategy", "Task workers.tasks.scan_deviations", "d"),
        ("celery.app.trace", "Task workers.tasks.scan_deviations", "3")]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name.startswith("celery"))


def test_the_clock_scan_records_missed_visits_and_flags_them(stack):
    pid = stack.enrol()
    stack.send(c.CompleteVisit(pid, {"visit": "baseline", "completed_on": REGISTERED}))
    stack.clock.set(REGISTERED + timedelta(days=50))  # the week6 window closed yesterday
    TrialProjection(stack.trialog).catch_up()
    stack.task("scan_deviations").delay()

    def recorded() -> tuple[list[str], set[str]]:
        participant = stack.trialog.service.get_participant(pid)
        return participant.missed_visits, {d["code"] for d in participant.deviations.values()}

    # The scan records the missed visit, then flags it: two commands, one after the other,
    # so the first may be seen before the second is written.
    wait_until(lambda: "visit_missed" in recorded()[1])
    missed, codes = recorded()
    assert "week6" in missed and "visit_missed" in codes


def _status(stack: Stack, reminder_id: str) -> str:
    with stack.trialog.engine.connect() as connection:
        return connection.execute(select(outbox.c.status)
                                  .where(outbox.c.reminder_id == reminder_id)).scalar_one()
