"""rm_feed's rows carry seals, keyed MACs binding their texts to their position and
stream (audit.feed.FeedSeals): a row edited or moved without the key is read from the
store. Rows rendered before hold none, so the feed's follower renders the log again (reads
meanwhile come from the store, as for any position it has not reached).

Revision ID: 0023
Revises: 0022
"""
import sqlalchemy as sa
from alembic import op

revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None


def upgrade() -> None:
    _render_again()
    with op.batch_alter_table("rm_feed") as table:  # SQLite: a plain ADD COLUMN
        table.add_column(sa.Column("seals", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    _render_again()
    with op.batch_alter_table("rm_feed") as table:
        table.drop_column("seals")


def _render_again() -> None:
    """rm_feed must hold a prefix of the log, so it starts empty, from the first event."""
    op.execute("DELETE FROM rm_feed")
    op.execute("DELETE FROM trialog_positions WHERE name = 'feed'")
