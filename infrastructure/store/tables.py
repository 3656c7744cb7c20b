"""Tables of our own beside the event store (migrated by Alembic)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Enum,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    any_,
    bindparam,
    case,
    insert,
    types,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.orm import Session

from domain.scoring import SCORE_NAMES

metadata = MetaData()


def as_utc(moment: datetime) -> datetime:
    """A time read from a ``DateTime(timezone=True)`` column, in UTC (SQLite gives it back
    without its zone)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def any_of(column: Any, postgres: bool, item_type: Any = None, name: str = "ids") -> Any:
    """``column IN (:ids)``, the values bound when run. On PostgreSQL ``column = ANY(:ids)``
    with the values as one array: the same statement whatever their number, which the
    driver converts once (an IN list of a batch's hundreds of values is a new statement
    each time, and the slowest part of a batch's Python)."""
    if postgres:  # an array of text, not of varchar(n): a cast to varchar(n) truncates
        item_type = item_type or (Text() if isinstance(column.type, String) else column.type)
        return column == any_(bindparam(name, type_=ARRAY(item_type)))
    return column.in_(bindparam(name, expanding=True))


def insert_rows(on: Session | Connection, table: Table,
                rows: Sequence[dict[str, Any]]) -> None:
    """Inserts ``rows`` as SQLAlchemy's executemany would (each value through its column
    type's bind processor). On PostgreSQL with psycopg as one statement whose parameters
    are binary arrays, one a column: the driver's executemany converts and sends each
    row's parameters apart, the slowest part of a follower's batch. What the arrays ask
    of the rows: each has every key of the first and no other (a KeyError otherwise), a
    column's values are of one Python type (psycopg dumps a list of one type), and a
    column left out gets the table's server default, not a Python-side ``default=``."""
    if not rows:
        return
    connection = on.connection() if isinstance(on, Session) else on
    dialect = connection.dialect
    if dialect.name != "postgresql" or dialect.driver != "psycopg":
        connection.execute(insert(table), list(rows))
        return
    names = tuple(rows[0])
    if any(row.keys() != rows[0].keys() for row in rows):
        raise KeyError(f"insert_rows into {table.name}: rows with other keys than {names}")
    statement, processors = _array_insert(table, names, dialect)
    connection.exec_driver_sql(statement, tuple(
        [row[name] for row in rows] if process is None
        else [process(row[name]) for row in rows]
        for name, process in zip(names, processors, strict=True)))


@lru_cache(maxsize=64)
def _array_insert(table: Table, names: tuple[str, ...],
                  dialect: Dialect) -> tuple[str, tuple[Any, ...]]:
    """``INSERT ... SELECT * FROM unnest(...)`` of ``names``' columns, and each column's
    bind processor (None when it has none)."""
    columns = [table.c[name] for name in names]
    quote = dialect.identifier_preparer
    arrays = ", ".join(f"%b::{_array_type(c.type, dialect)}[]" for c in columns)
    statement = (f"INSERT INTO {quote.format_table(table)} "
                 f"({', '.join(quote.format_column(c) for c in columns)}) "
                 f"SELECT * FROM unnest({arrays})")
    return statement, tuple(c.type.dialect_impl(dialect).bind_processor(dialect)
                            for c in columns)


def _array_type(column_type: Any, dialect: Dialect) -> str:
    if isinstance(column_type, (Enum, types.ARRAY, TypeDecorator)):
        # An enum is a String sent as text, an array would be flattened by unnest, and a
        # decorated type's own processing would be skipped: none is sent this way yet.
        raise NotImplementedError(f"insert_rows: no array form for {column_type!r}")
    if isinstance(column_type, String):  # text, not varchar(n): see any_of
        return "text"
    if isinstance(column_type, JSON):  # the bind processor's JSON text
        return "json"
    return str(column_type.compile(dialect=dialect)).lower()


# One row per accepted command: the idempotency key, a fingerprint of its body and the
# answer given, written in the same transaction as the command's events, sealed.
command_records = Table(
    "trialog_commands",
    metadata,
    Column("command_id", String(36), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("participant_id", String(64), nullable=False, index=True),
    Column("response", Text, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    # A keyed MAC of the row (store.access_seals): one changed or made up outside trialog
    # is answered to no retry.
    Column("seal", LargeBinary, nullable=True),
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
    Column("left_on", Date, nullable=True),  # the withdrawal from the study's day
    Column("scores", JSON, nullable=False),
    Column("position", BigInteger, nullable=False),
    # Queries open, source verification, signatures and locks, per visit and casebook.
    Column("management", JSON, nullable=True),
)

queries = Table(
    "rm_queries",
    metadata,
    Column("participant_id", String(64), primary_key=True, index=True),
    Column("query_id", String(36), primary_key=True),
    Column("site_id", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("target", JSON, nullable=False),
    Column("opened_at", DateTime(timezone=True), nullable=False),
    Column("opened_by", String(100), nullable=False),
    Column("thread", JSON, nullable=False),
    Index("ix_rm_queries_status_opened", "status", "opened_at"),
    Index("ix_rm_queries_site_status", "site_id", "status"),
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


def set_position(on: Session | Connection, name: str, value: int, *,
                 updated_at: datetime, only_up: bool = False) -> None:
    """The row ``name`` of trialog_positions set to ``value`` (made if it is not there);
    ``only_up``: a higher value already there is kept (as the row is when the update
    runs, after any commit it waited for). Two transactions making the row at once: the
    second's insert fails on the key, and its caller decides."""
    new = (case((positions.c.position < value, value), else_=positions.c.position)
           if only_up else value)
    updated = on.execute(update(positions).where(positions.c.name == name)
                         .values(position=new, updated_at=updated_at))
    if updated.rowcount == 0:
        on.execute(insert(positions).values(name=name, position=value,
                                            updated_at=updated_at))


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
    Column("seal", LargeBinary, nullable=True),  # store.access_seals: AccessSeals.disclosure
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
    # The sites the token may see, as a JSON list; NULL is every site.
    Column("sites", Text, nullable=True),
    Column("seal", LargeBinary, nullable=True),  # see access_seals
)

# The database lock as the command bus keeps it, in the transaction of the LockDatabase or
# UnlockDatabase event (the trial stream is the record): every data command reads it in
# its own transaction, after its events are written.
database_lock = Table(
    "trialog_database_lock",
    metadata,
    Column("study_id", String(64), primary_key=True),
    Column("locked_at", DateTime(timezone=True), nullable=True),
    Column("locked_by", String(100), nullable=True),
    Column("position", BigInteger, nullable=True),
)

# People: a login, a full name, a role and sites; the password only as an Argon2 hash.
users = Table(
    "trialog_users",
    metadata,
    Column("login", String(100), primary_key=True),
    Column("full_name", String(200), nullable=False),
    Column("role", String(16), nullable=False),
    Column("sites", Text, nullable=True),
    Column("password_hash", Text, nullable=False),  # migration 0027: a wrapped hash is longer
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("disabled_at", DateTime(timezone=True), nullable=True),
    # How many times the password was changed (the access register records each change).
    Column("password_set", Integer, nullable=False, server_default="0"),
    Column("seal", LargeBinary, nullable=True),  # see access_seals
)

# A person's bearer tokens from POST /v1/sessions (SHA-256 of each), valid until expires_at.
user_sessions = Table(
    "trialog_user_sessions",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("login", String(100), nullable=False, index=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    # The person's password_set when the session began: one begun under an older password
    # is refused.
    Column("password_set", Integer, nullable=False, server_default="0"),
    Column("seal", LargeBinary, nullable=True),  # see access_seals
)

# Wrong passwords in a row per login tried (known or not, so that a lock says nothing about
# whether a login exists), and until when the login is locked.
login_failures = Table(
    "trialog_login_failures",
    metadata,
    Column("login", String(100), primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("last_failed_at", DateTime(timezone=True), nullable=False),
    Column("locked_until", DateTime(timezone=True), nullable=True),
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
# a task sends it and records ReminderSent. Status: pending, sending (SMTP talking, or its
# sender stopped), mailed (the SMTP server took it, ReminderSent still to record), sent,
# cancelled, expired (more than a day late), failed (the reason in last_error, addresses
# masked), uncertain (it may have gone: never sent again; a person resolves it),
# rescheduled (due later than it says: pending again from the scan of its new day).
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
    # The query a ``query_raised`` email is about.
    Column("query_id", String(36), nullable=True, index=True),
    # The addresses the email goes to, kept as the row is marked sending (a JSON list,
    # sealed as the events' states are; any the server refused are noted in last_error):
    # what its ReminderSent names, whatever the addresses are by then.
    Column("mailed_to", LargeBinary, nullable=True),
    # When the row was marked sending, and its message's Message-ID: an uncertain row is
    # matched with the SMTP server's log by them.
    Column("sending_at", DateTime(timezone=True), nullable=True),
    Column("message_id", String(255), nullable=True),
)

READ_MODELS = (participants, visits, deviations, scores, reminder_schedule, queries)

# Webhook subscriptions: where to, which sites and event types (NULL: all), the secret
# (encrypted with the events' cipher), the last position delivered, and the retry state.
webhooks = Table(
    "trialog_webhooks",
    metadata,
    Column("webhook_id", String(36), primary_key=True),
    Column("url", Text, nullable=False),
    Column("sites", Text, nullable=True),
    Column("types", Text, nullable=True),
    Column("secret", Text, nullable=False),
    Column("previous_secret", Text, nullable=True),
    Column("previous_until", DateTime(timezone=True), nullable=True),
    Column("position", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("retry_at", DateTime(timezone=True), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("disabled_at", DateTime(timezone=True), nullable=True),
)

# Events a subscription's receiver did not take after every attempt, kept for redelivery.
webhook_failures = Table(
    "trialog_webhook_failures",
    metadata,
    Column("webhook_id", String(36), primary_key=True),
    Column("position", BigInteger, primary_key=True),
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("failed_at", DateTime(timezone=True), nullable=False),
    Column("redelivered_at", DateTime(timezone=True), nullable=True),
)

# The event feed's pages, rendered ahead by the feed's follower of the log: one row per
# position, with whose stream it is (subject, site: NULL when every reader may see it), the
# event type, and the CloudEvent as the feed sends it without contact details (NULL: render
# it from the store when read). ``contact``: for an event that a reader allowed contact
# details sees otherwise, that reader's CloudEvent, encrypted as the events are. ``entry``:
# the event as the participant's history shows it without contact details (the
# CloudEvent's data with its digest), so that a history is read without decoding events.
# ``seals``: keyed MACs binding the row's texts to it (see audit.feed.FeedSeals).
feed_events = Table(
    "rm_feed",
    metadata,
    Column("position", BigInteger, primary_key=True, autoincrement=False),
    Column("subject", Text, nullable=False),
    Column("site", String(64), nullable=True),
    Column("type", String(64), nullable=False),
    Column("body", Text, nullable=True),
    Column("contact", LargeBinary, nullable=True),
    Column("entry", Text, nullable=True),
    Column("seals", LargeBinary, nullable=True),
    Index("ix_rm_feed_subject", "subject", "position"),
)
