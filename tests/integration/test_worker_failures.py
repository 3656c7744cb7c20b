"""Failures the workers must survive: a worker process killed mid-send, Redis down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

import workers.app
import workers.tasks
from domain import commands as c
from infrastructure.jobs import reminders
from infrastructure.readside.projections import TrialProjection
from infrastructure.store.bootstrap import bootstrap
from infrastructure.store.tables import outbox
from tests.conftest import TEST_SECRETS, settings_for
from tests.databases import PG_SERVER, fresh_postgres_database
from tests.e2e.conftest import free_port
from tests.factories import consent, new_participant_id, screening
from tests.integration.test_workers import wait_until, worker
from tests.smtp import smtp_sink
from workers.app import make_app

CELERY = str(Path(sys.executable).with_name("celery"))
ROOT = Path(__file__).resolve().parents[2]


def enrol_due_today(t) -> str:
    """A participant whose week6 window opened yesterday (one reminder due today)."""
    pid = new_participant_id()
    registered = datetime.now(UTC).date() - timedelta(days=36)
    for command in (c.ScreenParticipant(pid, screening()), c.RecordConsent(pid, consent()),
                    c.RandomizeParticipant(pid, {"registered_on": registered})):
        t.bus.dispatch(command, command_id=str(uuid.uuid4()), actor="test")
    TrialProjection(t).catch_up()
    return pid


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True,
                         check=False).stdout
    return [int(p) for p in out.split()]


def test_a_worker_killed_mid_send_emails_no_one_again(tmp_path):
    """A Celery worker process killed (SIGKILL) while the SMTP server holds its answer to
    DATA: the task comes back (task_reject_on_worker_lost) to a row that says sending. The
    email may have gone, so the row is marked uncertain and nobody is emailed again (at
    most one email); nothing is recorded for it."""
    with fresh_postgres_database("trialog_kill") as name, smtp_sink() as sink:
        url = f"{PG_SERVER}/{name}"
        settings = settings_for(url, TRIALOG_SMTP_URL=sink.url)
        t = bootstrap(settings, migrate=True)
        queue = f"trialog-kill-{uuid.uuid4().hex[:8]}"
        env = {**os.environ, "TRIALOG_DATABASE_URL": url, **TEST_SECRETS,
               "TRIALOG_SMTP_URL": sink.url, "PYTHONPATH": str(ROOT)}
        worker = subprocess.Popen(
            [CELERY, "-A", "workers.app", "worker", "-P", "prefork", "-c", "1", "-Q", queue,
             "--loglevel", "error"], env=env, cwd=tmp_path)
        app = make_app(settings)
        app.conf.task_default_queue = queue
        try:
            pid = enrol_due_today(t)
            sink.hold()  # the first delivery is held open
            (reminder_id,) = reminders.scan(
                t, datetime.now(UTC).date(),
                enqueue=app.tasks["workers.tasks.send_reminder"].delay)
            assert sink.received.wait(60), "the worker did not start sending"
            (child,) = children(worker.pid)
            os.kill(child, signal.SIGKILL)  # mid-send: the SMTP DATA is not answered yet
            sink.release()

            def status() -> str:
                with t.engine.connect() as connection:
                    return str(connection.execute(select(outbox.c.status).where(
                        outbox.c.reminder_id == reminder_id)).scalar_one())

            wait_until(lambda: status() == "uncertain", timeout=60)
            time.sleep(1.5)  # anything more the worker would do
            assert status() == "uncertain"
            assert t.service.get_participant(pid).reminders == []
            assert len(sink.messages) == 1
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=30)
            t.close()


@pytest.fixture
def private_redis(tmp_path):
    """A Redis of this test's own, to stop and start again."""
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(tmp_path)]

    def start():
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_until(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"],
                                          capture_output=True, check=False).returncode == 0)
        return process

    yield port, start


def test_with_redis_down_commands_succeed_and_reminders_go_out_after_it_returns(
        private_redis):
    port, start_redis = private_redis
    with fresh_postgres_database("trialog_redis") as name, smtp_sink() as sink:
        settings = settings_for(f"{PG_SERVER}/{name}", TRIALOG_SMTP_URL=sink.url,
                                TRIALOG_REDIS_URL=f"redis://127.0.0.1:{port}/0")
        t = bootstrap(settings, migrate=True)
        app = make_app(settings)
        app.conf.broker_transport_options = {"max_retries": 1, "polling_interval": 0.1}
        app.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0}
        workers.app._trialog[id(app)] = t
        try:
            pid = enrol_due_today(t)  # Redis is not running: commands still succeed
            send = app.tasks["workers.tasks.send_reminder"].delay
            (_reminder_id,) = reminders.scan(t, datetime.now(UTC).date(), enqueue=send)
            assert reminders.hand_over(t, send) == 0  # still down: the row stays pending

            redis = start_redis()
            try:
                with worker(app):
                    assert reminders.hand_over(t, send) == 1  # the next scan hands it over
                    sink.wait_for(1)
                    wait_until(lambda: t.service.get_participant(pid).reminders != [])
            finally:
                redis.terminate()
                redis.wait()
        finally:
            workers.app._trialog.pop(id(app), None)
            t.close()
