"""Who was shown a participant's contact details: one row per answer and participant.

Revision ID: 0009
Revises: 0008
"""
import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "trialog_access_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("participant_id", sa.String(64), nullable=False, index=True),
        sa.Column("endpoint", sa.String(200), nullable=False),
        sa.Column("request_id", sa.String(100), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("trialog_access_log")
