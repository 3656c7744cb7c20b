"""Tables of our own beside the event store (migrated by Alembic)."""

from __future__ import annotations

from sqlalchemy import Column, DateTime, MetaData, String, Table, Text

metadata = MetaData()

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

