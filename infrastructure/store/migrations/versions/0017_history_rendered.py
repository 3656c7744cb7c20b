"""Each participant's history rendered ahead beside the feed (rm_feed.entry), and rm_feed
indexed by subject.

Revision ID: 0017
Revises: 0016
"""
import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("rm_feed", sa.Column("entry", sa.Text, nullable=True))
    op.create_index("ix_rm_feed_subject", "rm_feed", ["subject", "position"])
    _render_again()


def _render_again() -> None:
    """Every row gets its entry: the feed's follower renders the log again from its first
    event (rm_feed must hold a prefix of the log, so it starts empty)."""
    op.execute("DELETE FROM rm_feed")
    op.execute("DELETE FROM trialog_positions WHERE name = 'feed'")


def downgrade() -> None:
    op.drop_index("ix_rm_feed_subject", table_name="rm_feed")
    op.drop_column("rm_feed", "entry")
    _render_again()
