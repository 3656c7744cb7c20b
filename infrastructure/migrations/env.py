from alembic import context

from infrastructure.tables import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata,
                  version_table="trialog_alembic_version")
with context.begin_transaction():
    context.run_migrations()
