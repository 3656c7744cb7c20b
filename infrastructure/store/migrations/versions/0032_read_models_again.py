"""The read models and the feed rendered again by this release's rules:

- an '@' in a free text that is no address ("120/80@10.30", "1000mcg@day") was masked as
  one: in rm_queries' threads and rm_deviations' resolutions (0031 rewrote those already
  stored, which only the events can undo), and in rm_feed, with the event's command id
  withheld;
- a blood sample recorded after its visit was verified leaves the visit changed since
  verified, which read models written before don't say;
- rm_feed rendered by a release that masked fewer free texts holds some of them whole.

So the read models and rm_feed are emptied and their followers apply every event again,
as `trialog projections rebuild` does.

Revision ID: 0032
Revises: 0031
"""
import sqlalchemy as sa
from alembic import op

revision = "0032"
down_revision = "0031"
branch_labels = None
depends_on = None

READ_MODELS = ("rm_participants", "rm_visits", "rm_deviations", "rm_scores",
               "rm_reminder_schedule", "rm_queries")


def upgrade() -> None:
    connection = op.get_bind()
    if connection.dialect.name == "postgresql":  # a running follower waits till it commits
        connection.execute(sa.text(
            "SELECT position FROM trialog_positions WHERE name IN ('feed', 'trial') "
            "ORDER BY name FOR UPDATE"))
    for table in (*READ_MODELS, "rm_feed"):
        connection.execute(sa.text(f"DELETE FROM {table}"))  # (names fixed above)
    connection.execute(sa.text("UPDATE trialog_positions SET position = 0 "
                               "WHERE name IN ('feed', 'trial')"))


def downgrade() -> None:
    pass  # the read models are rendered again by whichever release follows the log
