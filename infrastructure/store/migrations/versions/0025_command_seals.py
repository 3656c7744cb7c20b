"""Each command's record (its idempotency key, fingerprint and first answer) carries a seal
(store.access_seals): the records already there are sealed here, under the deployment's
key (the migration is run by trialog, which registers it), a thousand to a statement.

Revision ID: 0025
Revises: 0024
"""
import sqlalchemy as sa
from alembic import context, op

revision = "0025"
down_revision = "0024"
branch_labels = None
depends_on = None

CHUNK = 1000


def upgrade() -> None:
    from infrastructure.store.access_seals import seals_for

    seals = seals_for(context.config.attributes["engine"])
    with op.batch_alter_table("trialog_commands") as table:  # SQLite: a plain ADD COLUMN
        table.add_column(sa.Column("seal", sa.LargeBinary(), nullable=True))
    connection = op.get_bind()
    records = sa.table("trialog_commands", sa.column("command_id"), sa.column("fingerprint"),
                       sa.column("participant_id"), sa.column("response"),
                       sa.column("recorded_at", sa.DateTime(timezone=True)),
                       sa.column("seal"))
    seal = (records.update().where(records.c.command_id == sa.bindparam("id"))
            .values(seal=sa.bindparam("sealed")))
    after = ""
    while True:  # in the key's order, a chunk at a time: no table held in memory
        rows = connection.execute(sa.select(records).where(records.c.command_id > after)
                                  .order_by(records.c.command_id).limit(CHUNK)).all()
        if not rows:
            break
        connection.execute(seal, [
            {"id": row.command_id, "sealed": seals.command(
                row.command_id, row.fingerprint, row.participant_id, row.response,
                row.recorded_at)} for row in rows])
        after = rows[-1].command_id


def downgrade() -> None:
    with op.batch_alter_table("trialog_commands") as table:
        table.drop_column("seal")
