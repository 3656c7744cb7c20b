"""The event feed's pages rendered ahead (rm_feed).

Revision ID: 0016
Revises: 0015
"""
import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rm_feed",
        sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("site", sa.String(64), nullable=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("body", sa.Text, nullable=True),
        sa.Column("contact", sa.LargeBinary, nullable=True),
    )
    _forget_the_followers_position()


def _forget_the_followers_position() -> None:
    """rm_feed must hold a prefix of the log: its follower starts again from the first
    event whenever the table is made (or dropped)."""
    op.execute("DELETE FROM trialog_positions WHERE name = 'feed'")


def downgrade() -> None:
    op.drop_table("rm_feed")
    _forget_the_followers_position()
