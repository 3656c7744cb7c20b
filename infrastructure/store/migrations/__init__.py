"""Alembic migrations of Trialog's own tables. Alembic is imported when a migration or a
revision is asked for, not by every process that imports this (an API or import process on
PostgreSQL never migrates; alembic is a tenth of a second of its start-up)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import Engine

HERE = Path(__file__).resolve().parent
VERSION_TABLE = "trialog_alembic_version"


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Creates or migrates the tables to ``revision``."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(HERE))
    if engine.dialect.name == "sqlite" and revision == "head" and _at_head(engine, config):
        return  # no write lock taken (below) where there is nothing to do
    with engine.begin() as connection:
        if connection.dialect.name == "sqlite":
            # One process migrates at a time: the write lock is taken before the revision
            # is read (waiting for another's migration as for any writer), not at the first
            # write, when two processes starting together on a new file had both read that
            # it had no tables and the second failed creating them.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def _at_head(engine: Engine, config: Any) -> bool:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    with engine.connect() as connection:
        current = MigrationContext.configure(
            connection, opts={"version_table": VERSION_TABLE}).get_current_revision()
    return current is not None and current == ScriptDirectory.from_config(config).get_current_head()


def tables_and_revision(url: str) -> tuple[set[str], str | None]:
    """The tables a database has and the revision its own tables are at."""
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            revision = MigrationContext.configure(
                connection, opts={"version_table": VERSION_TABLE}).get_current_revision()
            return set(inspect(connection).get_table_names()), revision
    finally:
        engine.dispose()
