"""An outbox row keeps the addresses its email was sent to, sealed as the events are:
the ReminderSent recorded after it names them, even when an address changed in between.

Revision ID: 0020
Revises: 0019
"""
import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trialog_outbox") as table:  # SQLite: a plain ADD COLUMN
        table.add_column(sa.Column("mailed_to", sa.LargeBinary, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("trialog_outbox") as table:
        table.drop_column("mailed_to")
