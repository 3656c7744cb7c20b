"""A person's row counts the changes of their password (``password_set``, 0 until the first;
the access register records each change, and a row from before one is refused), and a
sign-in session keeps the count it began under (one begun under an older password is
refused). A seal covers the count once it is above 0, so the rows already there keep
their seals.

Revision ID: 0029
Revises: 0028
"""
import sqlalchemy as sa
from alembic import op

revision = "0029"
down_revision = "0028"
branch_labels = None
depends_on = None

TABLES = ("trialog_users", "trialog_user_sessions")


def upgrade() -> None:
    for name in TABLES:
        with op.batch_alter_table(name) as table:  # SQLite: a plain ADD COLUMN
            table.add_column(sa.Column("password_set", sa.Integer(), nullable=False,
                                       server_default="0"))


def downgrade() -> None:
    """Refused once a password was changed: the seals of those rows cover the count, and
    an earlier release can't read the register's PasswordChanged events (it would refuse
    every caller)."""
    changed = op.get_bind().execute(sa.text(
        "SELECT count(*) FROM trialog_users WHERE password_set > 0")).scalar()
    if changed:
        raise RuntimeError(f"{changed} people have changed their password since revision "
                           "0029: a release before it can't read those changes")
    for name in TABLES:
        with op.batch_alter_table(name) as table:
            table.drop_column("password_set")
