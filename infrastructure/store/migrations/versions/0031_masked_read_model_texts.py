"""The read models keep free texts in plain text for every role: an address quoted in a
query's message or a deviation's resolution is kept masked (audit.history.masked_text).
The rows written before are masked here.

Revision ID: 0031
Revises: 0030
"""
import sqlalchemy as sa
from alembic import op

revision = "0031"
down_revision = "0030"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from infrastructure.audit.history import masked_text
    from infrastructure.readside.projections import without_addresses

    connection = op.get_bind()
    queries = sa.table("rm_queries", sa.column("participant_id"), sa.column("query_id"),
                       sa.column("thread", sa.JSON()))
    for row in connection.execute(sa.select(queries).where(
            sa.cast(queries.c.thread, sa.Text).like("%@%"))).all():
        connection.execute(sa.update(queries).where(
            queries.c.participant_id == row.participant_id,
            queries.c.query_id == row.query_id).values(thread=without_addresses(row.thread)))
    deviations = sa.table("rm_deviations", sa.column("deviation_id"),
                          sa.column("resolution"))
    for row in connection.execute(sa.select(deviations).where(
            deviations.c.resolution.like("%@%"))).all():
        connection.execute(sa.update(deviations).where(
            deviations.c.deviation_id == row.deviation_id).values(
                resolution=masked_text(row.resolution)))


def downgrade() -> None:
    pass  # the masked texts stay masked: the record keeps them whole
