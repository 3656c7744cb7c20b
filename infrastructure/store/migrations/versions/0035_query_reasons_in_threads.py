"""The read models rendered again by this release's rules: a query's step that has both a
text and a reason (a reopening's reason is required, its text not) keeps the reason in
the thread `GET /v1/queries` and the console show; read models written before hold its
text alone, the reason only in the history and the ODM export.

So the read models are emptied and their follower applies every event again, as
`trialog projections rebuild` does (the feed is unchanged).

Revision ID: 0035
Revises: 0034
"""
import sqlalchemy as sa
from alembic import op

revision = "0035"
down_revision = "0034"
branch_labels = None
depends_on = None

READ_MODELS = ("rm_participants", "rm_visits", "rm_deviations", "rm_scores",
               "rm_reminder_schedule", "rm_queries")


def upgrade() -> None:
    connection = op.get_bind()
    if connection.dialect.name == "postgresql":  # a running follower waits till it commits
        connection.execute(sa.text(
            "SELECT position FROM trialog_positions WHERE name = 'trial' FOR UPDATE"))
    for table in READ_MODELS:
        connection.execute(sa.text(f"DELETE FROM {table}"))  # (names fixed above)
    connection.execute(sa.text("UPDATE trialog_positions SET position = 0 "
                               "WHERE name = 'trial'"))


def downgrade() -> None:
    pass  # the read models are rendered again by whichever release follows the log
