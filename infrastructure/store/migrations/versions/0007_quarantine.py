"""Participants quarantined by a follower of the log.

Revision ID: 0007
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "trialog_quarantine",
        sa.Column("follower", sa.String(64), primary_key=True),
        sa.Column("originator_id", sa.String(36), primary_key=True),
        sa.Column("participant_id", sa.String(64), nullable=False, index=True),
        sa.Column("position", sa.BigInteger, nullable=True),
        sa.Column("event_type", sa.String(100), nullable=True),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("quarantined_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("trialog_quarantine")
