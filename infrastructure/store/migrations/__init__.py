"""Alembic migrations of Trialog's own tables. Alembic is imported when a migration or a
revision is asked for, not by every process that imports this (an API or import process on
PostgreSQL never migrates, and a process starting on a SQLite file already at the newest
revision only compares it with ``head``; alembic and the migrations are a tenth of a
second of a start-up)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

HERE = Path(__file__).resolve().parent
VERSION_TABLE = "trialog_alembic_version"
# How long a process starting on SQLite waits for another's migration (or table creation)
# before it fails: a migration holds the file's write lock while it runs, longer than
# SQLite's default wait of 5 s on a loaded machine.
SQLITE_TURN_MS = 60_000


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Creates or migrates the tables to ``revision``."""
    sqlite = engine.dialect.name == "sqlite"
    if sqlite and revision == "head" and _at_head(engine):
        return  # no write lock taken (below) where there is nothing to do

    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(HERE))
    # On SQLite one process migrates at a time: the write lock is taken before the
    # revision is read, not at the first write, when two processes starting together on a
    # new file had both read that it had no tables and the second failed creating them.
    with sqlite_turn(engine) if sqlite else engine.begin() as connection:
        config.attributes["connection"] = connection
        config.attributes["engine"] = engine  # its seals (migrations 0024-0028)
        command.upgrade(config, revision)


@contextmanager
def sqlite_turn(engine: Engine) -> Iterator[Connection]:
    """A transaction on a SQLite file that holds the file's write lock from its start,
    waiting up to SQLITE_TURN_MS for it (the connection's own wait is put back after).
    The file is switched to WAL first, with the same wait: on a new file that is the
    turn's first process, and every process's switch after it finds it done (a switch
    needs the file to itself, and waiting 5 s behind the others' turns it could fail)."""
    with engine.connect() as connection:
        before = connection.exec_driver_sql("PRAGMA busy_timeout").scalar()
        connection.exec_driver_sql(f"PRAGMA busy_timeout = {SQLITE_TURN_MS}")
        _switch_to_wal(connection)
        connection.commit()
        try:
            with connection.begin():
                connection.exec_driver_sql("BEGIN IMMEDIATE")
                yield connection
        finally:
            connection.exec_driver_sql(f"PRAGMA busy_timeout = {int(before)}")
            connection.commit()


def _switch_to_wal(connection: Connection) -> None:
    """The file in WAL mode. The switch needs the file to itself, and SQLite answers
    "database is locked" at once, without its busy wait, when another process holds the
    file as this one asks: asked again until the turn's wait is up (a file in WAL mode
    already is not switched again)."""
    from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_random

    def _busy(error: BaseException) -> bool:
        return isinstance(error, OperationalError) and "database is locked" in str(error)

    for attempt in Retrying(retry=retry_if_exception(_busy),
                            stop=stop_after_delay(SQLITE_TURN_MS / 1000),
                            wait=wait_random(0.01, 0.1), reraise=True,
                            before_sleep=lambda _: connection.rollback()):
        with attempt:
            if connection.exec_driver_sql("PRAGMA journal_mode").scalar() != "wal":
                connection.exec_driver_sql("PRAGMA journal_mode = WAL")


def head() -> str:
    """The newest migration's revision. The migrations are one line, each file named after
    its revision (``0029_password_changes.py`` is revision "0029"; a test holds them to
    it), so the head is read off the file names, with no need to import Alembic and every
    migration as a process starts."""
    return max(_known())


@functools.cache
def _known() -> frozenset[str]:
    """Every migration's revision (read once: a process's migrations don't change)."""
    return frozenset(path.name.partition("_")[0]
                     for path in (HERE / "versions").glob("[0-9]*_*.py"))


def _at_head(engine: Engine) -> bool:
    """Whether the database's own tables are at the newest migration already."""
    with engine.connect() as connection:
        return _revisions(connection) == [head()]


def later(url: str) -> str | None:
    """The database's revision when this release doesn't know it: a later release migrated
    it, and this one would show and write what that one's migrations changed (an access
    register it can't read refuses every caller; texts masked since written whole). None
    for a known revision, no tables, or a database that can't be reached now (its
    outage is answered as such)."""
    current = _revisions_at(url)
    return next((revision for revision in current or () if revision not in _known()), None)


def behind_at(url: str) -> bool:
    """``behind`` for a database named by its URL, asked before a process makes anything
    there (the library makes its event tables as it starts); False when it can't be
    reached now (what the process meets next says so)."""
    current = _revisions_at(url)
    return current is not None and _older(current)


def _revisions_at(url: str) -> list[str] | None:
    """The revisions of the database a URL names; None when it can't be reached now."""
    engine = create_engine(url, connect_args=(
        {"connect_timeout": 10} if url.startswith("postgresql") else {}))
    try:
        with engine.connect() as connection:
            return _revisions(connection)
    except SQLAlchemyError:  # what the process would meet next says it, as ever
        return None
    finally:
        engine.dispose()


def later_refusal(revision: str) -> str:
    return (f"the database was migrated by a later release (revision {revision}, which "
            "this one doesn't know): run that release")


def behind(engine: Engine) -> bool:
    """Whether the database has none of Trialog's tables, or older ones than this release
    needs (a revision newer than this release knows is not behind: see ``later``)."""
    with engine.connect() as connection:
        return _older(_revisions(connection))


def _older(current: list[str]) -> bool:
    """Whether revisions are none, or older than this release needs."""
    older = _known() - {head()}
    return not current or any(revision in older for revision in current)


def _revisions(connection: Connection) -> list[str]:
    """The revisions the version table holds (none when there is no table)."""
    if not inspect(connection).has_table(VERSION_TABLE):
        return []
    return [row[0] for row in connection.execute(
        text(f"SELECT version_num FROM {VERSION_TABLE}")).all()]


def tables_and_revision(url: str) -> tuple[set[str], str | None]:
    """The tables a database has and the revision its own tables are at."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            revisions = _revisions(connection)
            return set(inspect(connection).get_table_names()), (
                revisions[0] if revisions else None)
    finally:
        engine.dispose()
