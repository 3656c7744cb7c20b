"""A participant's row keeps the day it left the study: the clock scan looks at one who
left only for a window that closed before that day and was neither done nor marked missed
(the others are cancelled, never missed). Rows written before it hold none until the
participant's next event or a rebuild, and are looked at by every scan meanwhile.

Revision ID: 0022
Revises: 0021
"""
import sqlalchemy as sa
from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rm_participants") as table:  # SQLite: a plain ADD COLUMN
        table.add_column(sa.Column("left_on", sa.Date(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rm_participants") as table:
        table.drop_column("left_on")
