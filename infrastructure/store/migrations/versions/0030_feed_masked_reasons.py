"""Without contact rights, an address quoted in a reason is shown masked
(audit.history.redact_contact): rm_feed's events and entries rendered before hold it
whole, so the feed's follower renders the log again from the first row whose text holds
an address (rm_feed keeps a prefix of the log: the rows from there on are deleted).

Revision ID: 0030
Revises: 0029
"""
import sqlalchemy as sa
from alembic import op

revision = "0030"
down_revision = "0029"
branch_labels = None
depends_on = None


def upgrade() -> None:
    connection = op.get_bind()
    if connection.dialect.name == "postgresql":  # a running follower waits till it commits
        connection.execute(sa.text(
            "SELECT position FROM trialog_positions WHERE name = 'feed' FOR UPDATE"))
    first = connection.execute(sa.text(
        "SELECT min(position) FROM rm_feed WHERE body LIKE '%@%' OR entry LIKE '%@%'"
    )).scalar()
    if first is None:
        return
    connection.execute(sa.text("DELETE FROM rm_feed WHERE position >= :first"),
                       {"first": first})
    connection.execute(sa.text("UPDATE trialog_positions SET position = :before "
                               "WHERE name = 'feed' AND position >= :first"),
                       {"before": first - 1, "first": first})


def downgrade() -> None:
    pass  # the rows rendered since are masked: an earlier release shows them as they are
