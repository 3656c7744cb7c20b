"""Deep verifications run in the background: one row per check.

Revision ID: 0006
Revises: 0007 (the head when this revision was written)
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "trialog_verify_jobs",
        sa.Column("job_id", sa.String(36), primary_key=True),
        sa.Column("running", sa.Boolean, nullable=True, unique=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_by", sa.String(128), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("events_checked", sa.BigInteger, nullable=False),
        sa.Column("report", sa.Text, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("trialog_verify_jobs")
