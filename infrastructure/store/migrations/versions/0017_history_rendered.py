"""Each participant's history rendered ahead beside the feed (rm_feed.entry), and rm_feed
indexed by subject.

Revision ID: 0017
Revises: 0016
"""
import sqlalchemy as sa
from alembic import op

from infrastructure.store.migrations import render_feed_again

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("rm_feed", sa.Column("entry", sa.Text, nullable=True))
    op.create_index("ix_rm_feed_subject", "rm_feed", ["subject", "position"])
    render_feed_again()


def downgrade() -> None:
    op.drop_index("ix_rm_feed_subject", table_name="rm_feed")
    op.drop_column("rm_feed", "entry")
    render_feed_again()
