"""Data management: the queries read model, each participant's verification, signatures
and locks, and the database lock as the command bus keeps it.

Revision ID: 0011
Revises: 0010
"""
import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rm_participants") as batch:
        batch.add_column(sa.Column("management", sa.JSON, nullable=True))
    op.create_table(
        "rm_queries",
        sa.Column("query_id", sa.String(36), primary_key=True),
        sa.Column("participant_id", sa.String(64), nullable=False, index=True),
        sa.Column("site_id", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("target", sa.JSON, nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("opened_by", sa.String(100), nullable=False),
        sa.Column("thread", sa.JSON, nullable=False),
    )
    op.create_index("ix_rm_queries_status_opened", "rm_queries", ["status", "opened_at"])
    op.create_index("ix_rm_queries_site_status", "rm_queries", ["site_id", "status"])
    op.create_table(
        "trialog_database_lock",
        sa.Column("study_id", sa.String(64), primary_key=True),
        sa.Column("locked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("locked_by", sa.String(100), nullable=True),
        sa.Column("position", sa.BigInteger, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("trialog_database_lock")
    op.drop_table("rm_queries")
    with op.batch_alter_table("rm_participants") as batch:
        batch.drop_column("management")
