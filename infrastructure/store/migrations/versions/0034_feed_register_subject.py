"""rm_feed rendered again: the access register's events (tokens revoked, people disabled)
had the study's id as their CloudEvent `subject`, as the trial's own stream (the database
lock) has, so two chains of digests and versions shared one subject; they are now
`access/<study>`. The feed's follower writes every row again (the read models are
unchanged), as `trialog projections rebuild` does for it.

Revision ID: 0034
Revises: 0033
"""
import sqlalchemy as sa
from alembic import op

revision = "0034"
down_revision = "0033"
branch_labels = None
depends_on = None


def upgrade() -> None:
    connection = op.get_bind()
    if connection.dialect.name == "postgresql":  # a running follower waits till it commits
        connection.execute(sa.text(
            "SELECT position FROM trialog_positions WHERE name = 'feed' FOR UPDATE"))
    connection.execute(sa.text("DELETE FROM rm_feed"))
    connection.execute(sa.text("UPDATE trialog_positions SET position = 0 WHERE name = 'feed'"))


def downgrade() -> None:
    pass  # rm_feed is rendered again by whichever release follows the log
