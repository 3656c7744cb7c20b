"""A person's row counts the changes of their password (``password_set``, 0 until the first;
the access register records each change, and a row from before one is refused). A row's
seal covers the count once it is above 0, so the rows already there keep their seals.

Revision ID: 0029
Revises: 0028
"""
import sqlalchemy as sa
from alembic import op

revision = "0029"
down_revision = "0028"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trialog_users") as table:  # SQLite: a plain ADD COLUMN
        table.add_column(sa.Column("password_set", sa.Integer(), nullable=False,
                                   server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("trialog_users") as table:
        table.drop_column("password_set")
