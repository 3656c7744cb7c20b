"""Without contact rights, an event that holds contact details is shown without its command
id as well (audit.history.redact_contact): rm_feed's rendered events and entries hold the
ids, so the feed's follower renders the log again.

Revision ID: 0019
Revises: 0018
"""
from alembic import op

revision = "0019"
down_revision = "0018"
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
