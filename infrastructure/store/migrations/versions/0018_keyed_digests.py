"""The feed's and the histories' digests keyed (Trialog.veil_digest): rm_feed's rendered
events and entries hold plain ones, so the feed's follower renders the log again.

Revision ID: 0018
Revises: 0017
"""
from infrastructure.store.migrations import render_feed_again

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    render_feed_again()


def downgrade() -> None:
    render_feed_again()
