"""Sites on tokens, and people: accounts, their sessions, failed logins.

Tokens that exist before this revision keep working for every site: their ``sites`` is
NULL, which means every site.

Revision ID: 0010
Revises: 0009
"""
import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trialog_tokens") as batch:
        batch.add_column(sa.Column("sites", sa.Text, nullable=True))
    op.create_table(
        "trialog_users",
        sa.Column("login", sa.String(100), primary_key=True),
        sa.Column("full_name", sa.String(200), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("sites", sa.Text, nullable=True),
        sa.Column("password_hash", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "trialog_user_sessions",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("login", sa.String(100), nullable=False, index=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "trialog_login_failures",
        sa.Column("login", sa.String(100), primary_key=True),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("last_failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("trialog_login_failures")
    op.drop_table("trialog_user_sessions")
    op.drop_table("trialog_users")
    with op.batch_alter_table("trialog_tokens") as batch:
        batch.drop_column("sites")
