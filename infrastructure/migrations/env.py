from alembic import context

from infrastructure.migrations import VERSION_TABLE
from infrastructure.tables import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata,
                  version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
