"""Read models (participants, visits, deviations, scores) and follower positions.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SCORES = ("bpi_severity", "bpi_interference", "fact_pwb", "fact_swb", "fact_ewb", "fact_fwb",
          "fact_es", "fact_toi")


def upgrade() -> None:
    op.create_table(
        "rm_participants",
        sa.Column("participant_id", sa.String(64), primary_key=True),
        sa.Column("site_id", sa.String(32), nullable=False, index=True),
        sa.Column("status", sa.String(32), nullable=False, index=True),
        sa.Column("arm", sa.String(32), nullable=True, index=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("language", sa.String(8), nullable=False),
        sa.Column("eligible", sa.Boolean, nullable=False),
        sa.Column("failed_criteria", sa.JSON, nullable=False),
        sa.Column("screened_on", sa.Date, nullable=False),
        sa.Column("registered_on", sa.Date, nullable=True),
        sa.Column("scores", sa.JSON, nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "rm_visits",
        sa.Column("participant_id", sa.String(64), primary_key=True),
        sa.Column("code", sa.String(32), primary_key=True),
        sa.Column("sequence", sa.Integer, nullable=False),
        sa.Column("target", sa.Date, nullable=False),
        sa.Column("window_start", sa.Date, nullable=False, index=True),
        sa.Column("window_end", sa.Date, nullable=False),
        sa.Column("completed_on", sa.Date, nullable=True),
        sa.Column("missed", sa.Boolean, nullable=False),
    )
    op.create_table(
        "rm_deviations",
        sa.Column("deviation_id", sa.String(36), primary_key=True),
        sa.Column("participant_id", sa.String(64), nullable=False, index=True),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("evidence", sa.JSON, nullable=False),
        sa.Column("detected_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolution", sa.Text, nullable=True),
    )
    op.create_table(
        "rm_scores",
        sa.Column("participant_id", sa.String(64), primary_key=True),
        sa.Column("visit", sa.String(32), primary_key=True),
        sa.Column("arm", sa.String(32), nullable=True),
        sa.Column("bpi_average", sa.Float, nullable=True),
        *(sa.Column(name, sa.Float, nullable=True) for name in SCORES),
    )
    op.create_table(
        "trialog_positions",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    for table in ("trialog_positions", "rm_scores", "rm_deviations", "rm_visits",
                  "rm_participants"):
        op.drop_table(table)
