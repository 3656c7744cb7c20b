"""Without contact rights, an event that holds contact details is shown without its command
id as well (audit.history.redact_contact): rm_feed's rendered events and entries hold the
ids, so the feed's follower renders the log again.

Revision ID: 0019
Revises: 0018
"""
from infrastructure.store.migrations import render_feed_again

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    render_feed_again()


def downgrade() -> None:
    render_feed_again()
