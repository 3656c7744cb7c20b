"""A finished deep check's row carries a seal (store.access_seals): the finished checks
already there are sealed here, under the deployment's key (the migration is run by
trialog, which registers it).

Revision ID: 0026
Revises: 0025
"""
import sqlalchemy as sa
from alembic import context, op

revision = "0026"
down_revision = "0025"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from infrastructure.store.access_seals import seals_for

    seals = seals_for(context.config.attributes["engine"])
    with op.batch_alter_table("trialog_verify_jobs") as table:  # SQLite: a plain ADD COLUMN
        table.add_column(sa.Column("seal", sa.LargeBinary(), nullable=True))
    connection = op.get_bind()
    jobs = sa.table("trialog_verify_jobs", sa.column("job_id"), sa.column("status"),
                    sa.column("started_by"),
                    sa.column("started_at", sa.DateTime(timezone=True)),
                    sa.column("finished_at", sa.DateTime(timezone=True)),
                    sa.column("events_checked"), sa.column("report"), sa.column("seal"))
    for job in connection.execute(sa.select(jobs).where(jobs.c.status != "running")).all():
        connection.execute(jobs.update().where(jobs.c.job_id == job.job_id).values(
            seal=seals.verify_job(job.job_id, job.status, job.started_by, job.started_at,
                                  job.finished_at, job.events_checked, job.report)))


def downgrade() -> None:
    with op.batch_alter_table("trialog_verify_jobs") as table:
        table.drop_column("seal")
