"""Tables of our own beside the event store (migrated by Alembic)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

from domain.scoring import SCORE_NAMES

metadata = MetaData()


def as_utc(moment: datetime) -> datetime:
    """A time read from a ``DateTime(timezone=True)`` column, in UTC (SQLite gives it back
    without its zone)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)

# One row per accepted command: the idempotency key, a fingerprint of its body and the
# answer given, written in the same transaction as the command's events.
command_records = Table(
    "trialog_commands",
    metadata,
    Column("command_id", String(36), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("participant_id", String(64), nullable=False, index=True),
    Column("response", Text, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
)


# The read models: the current state of the trial, built only from events by the
# projection in infrastructure/projections.py. Contact details are not copied here; they
# stay encrypted in the event store.
participants = Table(
    "rm_participants",
    metadata,
    Column("participant_id", String(64), primary_key=True),
    Column("site_id", String(32), nullable=False, index=True),
    Column("status", String(32), nullable=False, index=True),
    Column("arm", String(32), nullable=True, index=True),
    Column("version", Integer, nullable=False),
    Column("language", String(8), nullable=False),
    Column("eligible", Boolean, nullable=False),
    Column("failed_criteria", JSON, nullable=False),
    Column("screened_on", Date, nullable=False),
    Column("registered_on", Date, nullable=True),
    Column("scores", JSON, nullable=False),
    Column("position", BigInteger, nullable=False),
)

visits = Table(
    "rm_visits",
    metadata,
    Column("participant_id", String(64), primary_key=True),
    Column("code", String(32), primary_key=True),
    Column("sequence", Integer, nullable=False),
    Column("target", Date, nullable=False),
    Column("window_start", Date, nullable=False, index=True),
    Column("window_end", Date, nullable=False),
    Column("completed_on", Date, nullable=True),
    Column("missed", Boolean, nullable=False),
)

deviations = Table(
    "rm_deviations",
    metadata,
    Column("deviation_id", String(36), primary_key=True),
    Column("participant_id", String(64), nullable=False, index=True),
    Column("code", String(64), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("detail", Text, nullable=False),
    Column("evidence", JSON, nullable=False),
    Column("detected_at", DateTime(timezone=True), nullable=False),
    Column("resolution", Text, nullable=True),
)

scores = Table(
    "rm_scores",
    metadata,
    Column("participant_id", String(64), primary_key=True),
    Column("visit", String(32), primary_key=True),
    Column("arm", String(32), nullable=True),
    Column("bpi_average", Float, nullable=True),
    *(Column(name, Float, nullable=True) for name in SCORE_NAMES),
)

# How far each follower of the notification log has got, written in the same transaction
# as what it did with the events.
positions = Table(
    "trialog_positions",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("position", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=True),
)


# Participants a follower of the log could not apply an event of: the follower moves on
# and retries with the participant's next event; a row goes when a retry succeeds.
quarantine = Table(
    "trialog_quarantine",
    metadata,
    Column("follower", String(64), primary_key=True),
    Column("originator_id", String(36), primary_key=True),
    Column("participant_id", String(64), nullable=False, index=True),
    Column("position", BigInteger, nullable=True),
    Column("event_type", String(100), nullable=True),
    Column("error", Text, nullable=False),
    Column("quarantined_at", DateTime(timezone=True), nullable=False),
    Column("attempts", Integer, nullable=False),
)


# Who was shown a participant's contact details (written by the server as it answers; no
# endpoint writes here).
access_log = Table(
    "trialog_access_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(100), nullable=False),
    Column("participant_id", String(64), nullable=False, index=True),
    Column("endpoint", String(200), nullable=False),
    Column("request_id", String(100), nullable=True),
)


# API tokens: only a SHA-256 of each token is kept; the token is shown once at creation.
tokens = Table(
    "trialog_tokens",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("role", String(16), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

# The reminders still to send: when each is due (built by the projection from the visit
# schedule and the protocol's offsets), until when it is worth sending (the window's end),
# and the log position that wrote it. Rows go when the visit is done or missed or the
# participant leaves.
reminder_schedule = Table(
    "rm_reminder_schedule",
    metadata,
    Column("reminder_id", String(36), primary_key=True),
    Column("participant_id", String(64), nullable=False, index=True),
    Column("visit", String(32), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("due_on", Date, nullable=False, index=True),
    Column("until", Date, nullable=False),
    Column("position", BigInteger, nullable=False, index=True),
)

# The outbox: one row per reminder a scan found due, written with the scan's position;
# a task sends it and records ReminderSent. Status: pending, mailed (the SMTP server took
# it, ReminderSent still to record), sent, cancelled, expired (more than a day late),
# failed (the reason in last_error, addresses masked).
outbox = Table(
    "trialog_outbox",
    metadata,
    Column("reminder_id", String(36), primary_key=True),
    Column("participant_id", String(64), nullable=False, index=True),
    Column("visit", String(32), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("due_on", Date, nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=True),
    Column("scan_position", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("enqueued_at", DateTime(timezone=True), nullable=True),
    Column("sent_at", DateTime(timezone=True), nullable=True),
)

READ_MODELS = (participants, visits, deviations, scores, reminder_schedule)
