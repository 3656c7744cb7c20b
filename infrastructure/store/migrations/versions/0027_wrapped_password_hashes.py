"""A password hash made before the pepper (0024's time) is kept encrypted
(store.access_seals: AccessSeals.wrap), so that one read from the database can't be
cracked without the key; it still signs its person in, and is replaced by a peppered hash
then. A row whose seal held is sealed again with its new hash; one whose seal failed
keeps failing (the migration is run by trialog, which registers the key).

Revision ID: 0027
Revises: 0026
"""
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from alembic import context, op

revision = "0027"
down_revision = "0026"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from infrastructure.store.people import PEPPERED, WRAPPED

    def older(users: sa.TableClause) -> sa.ColumnElement[bool]:
        return sa.and_(~users.c.password_hash.startswith(PEPPERED),
                       ~users.c.password_hash.startswith(WRAPPED))

    # An encrypted hash names its person (a login of up to 100 characters) and takes a
    # third more room in base64: wider than the 200 characters of a hash.
    with op.batch_alter_table("trialog_users") as table:
        table.alter_column("password_hash", type_=sa.Text(), existing_type=sa.String(200),
                           existing_nullable=False)
    _rewrite(older, lambda seals, login, stored: WRAPPED + seals.wrap(login, stored))


def downgrade() -> None:
    """Back as they were, for a release that reads them so."""
    from infrastructure.store.people import WRAPPED

    def unwrapped(seals: Any, login: str, stored: str) -> str:
        return seals.unwrap(login, stored.removeprefix(WRAPPED)) or stored

    _rewrite(lambda users: users.c.password_hash.startswith(WRAPPED), unwrapped)
    with op.batch_alter_table("trialog_users") as table:
        table.alter_column("password_hash", type_=sa.String(200), existing_type=sa.Text(),
                           existing_nullable=False)


def _rewrite(which: Callable[[sa.TableClause], Any],
             rewritten: Callable[[Any, str, str], str]) -> None:
    """Each person ``which`` selects given the hash ``rewritten`` makes of theirs, sealed
    again if their seal held."""
    from infrastructure.store.access_seals import seals_for
    from infrastructure.store.macs import same_seal

    seals = seals_for(context.config.attributes["engine"])
    connection = op.get_bind()
    users = sa.table("trialog_users", sa.column("login"), sa.column("full_name"),
                     sa.column("role"), sa.column("sites"), sa.column("password_hash"),
                     sa.column("disabled_at", sa.DateTime(timezone=True)),
                     sa.column("seal", sa.LargeBinary()))
    for row in connection.execute(sa.select(users).where(which(users))).all():
        stored = rewritten(seals, row.login, row.password_hash)
        disabled = row.disabled_at is not None
        held = same_seal(row.seal, seals.user(row.login, row.full_name, row.role, row.sites,
                                              row.password_hash, disabled))
        connection.execute(users.update().where(users.c.login == row.login).values(
            password_hash=stored,
            seal=seals.user(row.login, row.full_name, row.role, row.sites, stored, disabled)
            if held else row.seal))
