"""An outbox row marked sending keeps when its sending began and its message's
Message-ID: a row left uncertain (its email may have gone) can be matched with the SMTP
server's log before a person resolves it.

Revision ID: 0021
Revises: 0020
"""
import sqlalchemy as sa
from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trialog_outbox") as table:  # SQLite: a plain ADD COLUMN
        table.add_column(sa.Column("sending_at", sa.DateTime(timezone=True), nullable=True))
        table.add_column(sa.Column("message_id", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("trialog_outbox") as table:
        table.drop_column("message_id")
        table.drop_column("sending_at")
