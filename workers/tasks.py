"""The tasks: each takes ids or nothing, reloads what it needs and is safe to run twice."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from infrastructure.jobs import monitor, reminders, webhooks
from workers.app import MAX_RETRY_COUNTDOWN, trialog


def _app(task: Any) -> Any:
    return trialog(task.app)


_MAILERS: dict[str, reminders.Mailer] = {}


def _mailer(t: Any) -> reminders.Mailer:
    """This process's SMTP connection to the configured server, reused between tasks."""
    url = t.settings.smtp_url
    if url not in _MAILERS:
        _MAILERS[url] = reminders.Mailer(url, t.settings.mail_from)
    return _MAILERS[url]


@shared_task(bind=True, autoretry_for=(reminders.TransientMailError, reminders.ReminderBusy),
             retry_backoff=5, retry_backoff_max=MAX_RETRY_COUNTDOWN, retry_jitter=True,
             max_retries=8)
def send_reminder(self: Any, reminder_id: str) -> str:
    """Sends one reminder of the outbox (once; an address that cannot be sent to is
    recorded as failed, a reminder more than a day late as expired)."""
    t = _app(self)
    return reminders.send(t, _mailer(t), reminder_id, reminders.Today.of(t))


@shared_task(bind=True)
def scan_reminders(self: Any) -> int:
    """Turns due reminders into outbox rows and hands them to send_reminder."""
    t = _app(self)
    new = reminders.scan(t, reminders.Today.of(t), enqueue=send_reminders.delay,
                         chunk=reminders.CHUNK)
    return len(new)


@shared_task(bind=True, autoretry_for=(reminders.TransientMailError,),
             retry_backoff=5, retry_backoff_max=MAX_RETRY_COUNTDOWN, retry_jitter=True,
             max_retries=8)
def send_reminders(self: Any, reminder_ids: list[str]) -> dict[str, str]:
    """Sends a chunk of the outbox over one SMTP connection and records the sent ones in
    one transaction (rows another sender has are left to it and to the next scan)."""
    t = _app(self)
    return reminders.send_chunk(t, _mailer(t), list(reminder_ids), reminders.Today.of(t))


@shared_task(bind=True)
def follow_deviations(self: Any) -> int:
    """Runs the event-driven deviation rules over the events since the last run."""
    return monitor.DeviationMonitor(_app(self)).catch_up()


@shared_task(bind=True)
def scan_deviations(self: Any) -> dict[str, int]:
    """Runs the clock-driven rules (missed visits, poor adherence)."""
    t = _app(self)
    return monitor.scan_clock(t, t.ended_everywhere())


@shared_task(bind=True)
def dispatch_webhooks(self: Any) -> int:
    """Hands every subscription behind the log (and not waiting for a retry) to
    deliver_webhook."""
    ids = webhooks.due(_app(self))
    for webhook_id in ids:
        deliver_webhook.delay(webhook_id)
    return len(ids)


# A deliverer starts deliveries for WORK_BUDGET, each whole within TIMEOUT but for a
# receiver that sends its headers slowly (a per-read timeout alone): the soft limit stops
# that one as a failed delivery, the hard limit a deliverer stuck elsewhere.
DELIVERY_LIMITS = {"soft_time_limit": webhooks.WORK_BUDGET + 3 * webhooks.TIMEOUT,
                   "time_limit": webhooks.WORK_BUDGET + 6 * webhooks.TIMEOUT}


@shared_task(bind=True, **DELIVERY_LIMITS)
def deliver_webhook(self: Any, webhook_id: str) -> str:
    """Delivers one subscription's events in order until it is up to date, a delivery
    fails (then its retry time is recorded for the next dispatch), or it has worked its
    budget (the next dispatch goes on)."""
    t = _app(self)
    return webhooks.deliver(t, webhook_id, feed=_feed(t),
                            interrupted=(SoftTimeLimitExceeded,))


_FEEDS: dict[int, Any] = {}


def _feed(t: Any) -> Any:
    """This process's feed reader, whose knowledge of streams' sites is kept."""
    from infrastructure.audit.feed import Feed

    if id(t) not in _FEEDS:
        _FEEDS[id(t)] = Feed(t)
    return _FEEDS[id(t)]
