"""The rows that say who may call carry seals (store.access_seals): machine tokens and
people are sealed here, under the deployment's key (the migration is run by trialog,
which registers it); sign-in and console sessions are ended (people sign in again).

Revision ID: 0024
Revises: 0023
"""
import sqlalchemy as sa
from alembic import context, op

revision = "0024"
down_revision = "0023"
branch_labels = None
depends_on = None

TABLES = ("trialog_tokens", "trialog_users", "trialog_user_sessions",
          "trialog_console_sessions")


def upgrade() -> None:
    from infrastructure.store.access_seals import seals_for

    seals = seals_for(context.config.attributes["engine"])
    for name in TABLES:
        with op.batch_alter_table(name) as table:  # SQLite: a plain ADD COLUMN
            table.add_column(sa.Column("seal", sa.LargeBinary(), nullable=True))
    op.execute("DELETE FROM trialog_console_sessions")
    op.execute("DELETE FROM trialog_user_sessions")
    connection = op.get_bind()
    tokens = sa.table("trialog_tokens", sa.column("name"), sa.column("role"),
                      sa.column("token_hash"), sa.column("sites"), sa.column("revoked_at"),
                      sa.column("seal"))
    for row in connection.execute(sa.select(tokens)).all():
        connection.execute(tokens.update().where(tokens.c.name == row.name).values(
            seal=seals.token(row.name, row.role, row.token_hash, row.sites,
                             row.revoked_at is not None)))
    users = sa.table("trialog_users", sa.column("login"), sa.column("full_name"),
                     sa.column("role"), sa.column("sites"), sa.column("password_hash"),
                     sa.column("disabled_at"), sa.column("seal"))
    for row in connection.execute(sa.select(users)).all():
        connection.execute(users.update().where(users.c.login == row.login).values(
            seal=seals.user(row.login, row.full_name, row.role, row.sites,
                            row.password_hash, row.disabled_at is not None)))


def downgrade() -> None:
    for name in TABLES:
        with op.batch_alter_table(name) as table:
            table.drop_column("seal")
