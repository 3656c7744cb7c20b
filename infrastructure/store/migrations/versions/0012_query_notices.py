"""The query a query email of the outbox is about.

Revision ID: 0012
Revises: 0011
"""
import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trialog_outbox") as batch:
        batch.add_column(sa.Column("query_id", sa.String(36), nullable=True))
        batch.create_index("ix_trialog_outbox_query_id", ["query_id"])


def downgrade() -> None:
    with op.batch_alter_table("trialog_outbox") as batch:
        batch.drop_index("ix_trialog_outbox_query_id")
        batch.drop_column("query_id")
