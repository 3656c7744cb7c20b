"""The feed's and the histories' digests keyed (Trialog.veil_digest): rm_feed's rendered
events and entries hold plain ones, so the feed's follower renders the log again.

Revision ID: 0018
Revises: 0017
"""
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    _render_again()


def _render_again() -> None:
    """rm_feed must hold a prefix of the log, so it starts empty, from the first event."""
    op.execute("DELETE FROM rm_feed")
    op.execute("DELETE FROM trialog_positions WHERE name = 'feed'")


def downgrade() -> None:
    _render_again()
