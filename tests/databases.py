"""Throwaway PostgreSQL databases, for tests and benchmarks that need a whole store."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy
import sqlalchemy.exc

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
# The database the tests share: `test`; under pytest-xdist (`make test`) one per process
# and run (`test_gw0_1a2b3c4d`), so that what a test does to the whole database (locking
# it, fuzzing it with an admin token) meets only the tests of its own process, one at a
# time, and dropped as the process ends: a database kept from run to run grew with each,
# and the checks of a whole store (a deep verify, the generated requests) slowed with it.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID", "")[:8]
SHARED_DATABASE = f"test_{_WORKER}_{_RUN}" if _WORKER else "test"
SHARED_URL = f"{PG_SERVER}/{SHARED_DATABASE}"


def ensure_shared_database() -> None:
    """Creates this process's shared database when it is missing (`make test` creates
    `test`; a process of pytest-xdist creates its own)."""
    try:
        create_database(SHARED_DATABASE)
    except sqlalchemy.exc.ProgrammingError:  # there already, or made meanwhile by another run
        pass


def drop_shared_database() -> None:
    """Drops this process's shared database (under pytest-xdist; `test` is kept)."""
    if SHARED_DATABASE != "test":
        drop_database(SHARED_DATABASE)


def create_database(name: str, server: str = PG_SERVER, template: str | None = None) -> None:
    """Creates a database, a copy of ``template`` if one is named."""
    copied = f' TEMPLATE "{template}"' if template else ""
    _as_admin(server, f'CREATE DATABASE "{name}"{copied}')


def drop_database(name: str, server: str = PG_SERVER) -> None:
    """Drops a database if it is there, closing its connections."""
    _as_admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _as_admin(server: str, statement: str) -> None:
    admin = sqlalchemy.create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(sqlalchemy.text(statement))
    finally:
        admin.dispose()


@contextmanager
def fresh_postgres_database(prefix: str, server: str = PG_SERVER,
                            template: str | None = None) -> Iterator[str]:
    """Creates a database (a copy of ``template`` if one is named), yields its name, and
    drops it (closing its connections)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    create_database(name, server, template)
    try:
        yield name
    finally:
        drop_database(name, server)
