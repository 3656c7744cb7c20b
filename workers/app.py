"""The Celery app: `celery -A workers.app worker` and `celery -A workers.app beat`.

Tasks are thin and idempotent: they take ids, reload what they need, and do one thing.
Safety: a task is acknowledged only when done (``acks_late``) and put back when its worker
process dies (``task_reject_on_worker_lost``); Redis redelivers an unacknowledged task
after ``visibility_timeout``, which is longer than any task or retry countdown here.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from typing import Any

from celery import Celery
from celery.signals import celeryd_init, import_modules, worker_process_shutdown

from infrastructure.store import migrations
from infrastructure.store.settings import (
    Settings,
    SettingsError,
    check_secrets,
    redis_url,
    smtp_url,
)

VISIBILITY_TIMEOUT = 3600  # s; longer than any task (SMTP timeout 30 s) or countdown
MAX_RETRY_COUNTDOWN = 600  # s; retries of a failing SMTP server back off up to this
REMINDER_SCAN_EVERY = 60.0  # s
DEVIATION_FOLLOW_EVERY = 2.0  # s
DEVIATION_SCAN_EVERY = 3600.0  # s
WEBHOOK_DISPATCH_EVERY = 2.0  # s
# The tasks beat sends every two seconds: Celery's INFO lines about them (sent, received,
# succeeded) are left out, but for a success that did something (not 0).
FREQUENT = frozenset({"workers.tasks.follow_deviations", "workers.tasks.dispatch_webhooks"})


class _QuietTicks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        data = getattr(record, "data", None)  # a worker's received and succeeded lines
        if isinstance(data, dict):
            return data.get("name") not in FREQUENT or data.get("return_value", "0") != "0"
        args = record.args  # beat's "Sending due task %s (%s)"
        return not (isinstance(args, tuple) and len(args) == 2 and args[1] in FREQUENT)


for _name in ("celery.beat", "celery.worker.strategy", "celery.app.trace"):
    logging.getLogger(_name).addFilter(_QuietTicks())


def beat_schedule_file() -> str:
    """Where beat keeps its schedule: ``TRIALOG_BEAT_SCHEDULE``, else the system's temporary
    folder, never the working folder (a checkout)."""
    default = os.path.join(tempfile.gettempdir(), "trialog-celerybeat-schedule")
    return os.environ.get("TRIALOG_BEAT_SCHEDULE") or default


def make_app(settings: Settings | None = None) -> Celery:
    """The app; without ``settings`` they are read from the environment when a task first
    needs them, so that importing this module (as `celery -A` does) writes nothing."""
    broker = settings.redis_url if settings else redis_url(checked=False)
    app = Celery("trialog", broker=broker, include=["workers.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        timezone="UTC",
        beat_schedule_filename=beat_schedule_file(),
        beat_schedule={
            "reminders-scan": {"task": "workers.tasks.scan_reminders",
                               "schedule": REMINDER_SCAN_EVERY},
            "deviations-follow": {"task": "workers.tasks.follow_deviations",
                                  "schedule": DEVIATION_FOLLOW_EVERY},
            "deviations-scan": {"task": "workers.tasks.scan_deviations",
                                "schedule": DEVIATION_SCAN_EVERY},
            "webhooks-dispatch": {"task": "workers.tasks.dispatch_webhooks",
                                  "schedule": WEBHOOK_DISPATCH_EVERY},
        },
    )
    app.conf.trialog_settings = settings
    return app


app = make_app()
_trialog: dict[int, Any] = {}


def trialog(celery_app: Celery | None = None) -> Any:
    """This process's application, built on first use (never at import), then kept out of
    the garbage collector's scans (see infrastructure.heap)."""
    from infrastructure.heap import freeze_startup
    from infrastructure.store.bootstrap import bootstrap

    key = id(celery_app or app)
    if key not in _trialog:
        settings = (celery_app or app).conf.trialog_settings or Settings.from_env()
        _trialog[key] = bootstrap(settings)
        freeze_startup()
    return _trialog[key]


@celeryd_init.connect
@import_modules.connect  # beat: before it prints its banner, which reads the URL
def _check_settings(**_: Any) -> None:
    """A worker or beat without the secrets its database needs, or with a broker's or
    mail server's URL it can't read, stops at once, in one line (not at its first task,
    or retrying for ever)."""
    if app.conf.trialog_settings is not None:
        return
    try:
        redis_url()
        smtp_url(os.environ)
        check_secrets()
    except SettingsError as e:
        print(f"trialog: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    settings = Settings.from_env()
    later = None if settings.is_sqlite else migrations.later(settings.database_url)
    if later is not None:  # see migrations.later: it would show and write what it can't
        print(f"trialog: {migrations.later_refusal(later)}", file=sys.stderr)
        raise SystemExit(1)


@worker_process_shutdown.connect
def _close(**_: Any) -> None:
    for t in _trialog.values():
        t.close()
    _trialog.clear()

