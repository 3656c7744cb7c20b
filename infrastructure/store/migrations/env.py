from alembic import context

from infrastructure.store.migrations import VERSION_TABLE
from infrastructure.store.tables import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata,
                  version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
