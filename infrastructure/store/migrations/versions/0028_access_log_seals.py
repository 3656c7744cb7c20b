"""A row of the access log carries a seal (store.access_seals: AccessSeals.disclosure):
the rows already there are sealed here, a chunk at a time, under the deployment's key
(the migration is run by trialog, which registers it).

Revision ID: 0028
Revises: 0027
"""
import sqlalchemy as sa
from alembic import context, op

revision = "0028"
down_revision = "0027"
branch_labels = None
depends_on = None

CHUNK = 1000


def upgrade() -> None:
    from infrastructure.store.access_seals import seals_for

    seals = seals_for(context.config.attributes["engine"])
    with op.batch_alter_table("trialog_access_log") as table:  # SQLite: a plain ADD COLUMN
        table.add_column(sa.Column("seal", sa.LargeBinary(), nullable=True))
    connection = op.get_bind()
    log = sa.table("trialog_access_log", sa.column("id"),
                   sa.column("at", sa.DateTime(timezone=True)), sa.column("actor"),
                   sa.column("participant_id"), sa.column("endpoint"),
                   sa.column("request_id"), sa.column("seal"))
    seal = (log.update().where(log.c.id == sa.bindparam("row"))
            .values(seal=sa.bindparam("sealed")))
    after = 0
    while True:  # in the key's order, a chunk at a time: no table held in memory
        rows = connection.execute(sa.select(log).where(log.c.id > after)
                                  .order_by(log.c.id).limit(CHUNK)).all()
        if not rows:
            break
        connection.execute(seal, [
            {"row": row.id, "sealed": seals.disclosure(row.at, row.actor, row.participant_id,
                                                      row.endpoint, row.request_id)}
            for row in rows])
        after = rows[-1].id


def downgrade() -> None:
    with op.batch_alter_table("trialog_access_log") as table:
        table.drop_column("seal")
