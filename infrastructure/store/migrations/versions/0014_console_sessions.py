"""The console's sessions (idle timeout, sign-out) and the key of its form cookies.

Revision ID: 0014
Revises: 0013
"""
import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "trialog_console_sessions",
        sa.Column("cookie_hash", sa.String(64), primary_key=True),
        sa.Column("session_hash", sa.String(64), nullable=False, index=True),
        sa.Column("login", sa.String(100), nullable=False, index=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "trialog_console_keys",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("secret", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("trialog_console_keys")
    op.drop_table("trialog_console_sessions")
