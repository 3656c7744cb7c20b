"""The read models rendered again by this release's rules: a visit whose data a correction
moved to another visit keeps its source verification (changed since verified), its
signature (invalidated) and its lock in the participant's state; read models written
before list only the visits completed or missed, and show such a visit not verified and
unsigned (as the CSV export, which reads them, did).

So the read models are emptied and their follower applies every event again, as
`trialog projections rebuild` does (the feed is unchanged).

Revision ID: 0033
Revises: 0032
"""
import sqlalchemy as sa
from alembic import op

revision = "0033"
down_revision = "0032"
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
