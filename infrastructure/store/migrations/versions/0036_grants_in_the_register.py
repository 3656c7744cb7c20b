"""The access register records each access granted (`TokenGranted`, `PersonGranted`: a
machine token made, a person given a login, with the role and sites), beside the
revocations, disables and changes of password it held. No table changes: the grants made
before are recorded in the register after the upgrade (`trialog db upgrade`, and every
start on SQLite), from the rows that hold their seals. This revision marks that a release
before it can't read the register any more: it would refuse every caller.

Revision ID: 0036
Revises: 0035
"""
import sqlalchemy as sa
from alembic import op

revision = "0036"
down_revision = "0035"
branch_labels = None
depends_on = None

GRANTS = ("domain.revocations:AccessRegister.TokenGranted",
          "domain.revocations:AccessRegister.PersonGranted")


def upgrade() -> None:
    pass  # the grants are events: recorded by the application, which holds the key


def downgrade() -> None:
    """Refused once a grant is in the register: a release before this one can't read it."""
    granted = op.get_bind().execute(
        sa.text("SELECT count(*) FROM trialog_events WHERE topic IN :topics")
        .bindparams(sa.bindparam("topics", expanding=True)), {"topics": list(GRANTS)}
    ).scalar()
    if granted:
        raise RuntimeError(f"the access register records {granted} grants since revision "
                           "0036: a release before it can't read them")
