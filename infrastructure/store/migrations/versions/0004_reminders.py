"""The reminder schedule (a read model) and the reminder outbox.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rm_reminder_schedule",
        sa.Column("reminder_id", sa.String(36), primary_key=True),
        sa.Column("participant_id", sa.String(64), nullable=False, index=True),
        sa.Column("visit", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("due_on", sa.Date, nullable=False, index=True),
        sa.Column("until", sa.Date, nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False, index=True),
    )
    op.create_table(
        "trialog_outbox",
        sa.Column("reminder_id", sa.String(36), primary_key=True),
        sa.Column("participant_id", sa.String(64), nullable=False, index=True),
        sa.Column("visit", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("due_on", sa.Date, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("scan_position", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("trialog_outbox")
    op.drop_table("rm_reminder_schedule")
