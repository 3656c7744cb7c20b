"""Query ids are a participant's own: the queries read model is keyed by participant and
query (two participants may have queries with the same id). A read model: emptied here,
rebuilt by `trialog projections rebuild` (or from the events by the follower once its
position is reset, which this revision does).

Revision ID: 0013
Revises: 0012
"""
import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def _create(primary_key: tuple[str, ...]) -> None:
    op.create_table(
        "rm_queries",
        sa.Column("query_id", sa.String(36), nullable=False),
        sa.Column("participant_id", sa.String(64), nullable=False, index=True),
        sa.Column("site_id", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("target", sa.JSON, nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("opened_by", sa.String(100), nullable=False),
        sa.Column("thread", sa.JSON, nullable=False),
        sa.PrimaryKeyConstraint(*primary_key),
    )
    op.create_index("ix_rm_queries_status_opened", "rm_queries", ["status", "opened_at"])
    op.create_index("ix_rm_queries_site_status", "rm_queries", ["site_id", "status"])


def upgrade() -> None:
    op.drop_table("rm_queries")
    _create(("participant_id", "query_id"))
    # The trial projection applies every event again, filling the new table.
    op.execute("UPDATE trialog_positions SET position = 0 WHERE name = 'trial'")


def downgrade() -> None:
    op.drop_table("rm_queries")
    _create(("query_id",))
    op.execute("UPDATE trialog_positions SET position = 0 WHERE name = 'trial'")
