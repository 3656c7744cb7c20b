"""A token can be revoked: the time it was, or null while it is valid.

Revision ID: 0008
Revises: 0006
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trialog_tokens") as table:  # SQLite rebuilds the table
        table.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("trialog_tokens") as table:
        table.drop_column("revoked_at")
