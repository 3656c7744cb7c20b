"""Real databases: a SQLite file per test, and the shared PostgreSQL `test` database, one per
process under pytest-xdist (unique participant ids per test)."""

from __future__ import annotations

import atexit
import functools
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
import sqlalchemy.exc

from infrastructure.store.settings import Settings
from tests.databases import (
    PG_SERVER,
    SHARED_URL,
    create_database,
    drop_database,
    drop_shared_database,
    ensure_shared_database,
    fresh_postgres_database,
)

TEST_KEY = "dHJpYWxvZy10ZXN0LWtleS0zMi1ieXRlcy1sb25nISE="  # 32 bytes, tests only
# The seed the tests drew with when it was derived from TEST_KEY, so that the allocation
# blocks already begun in the shared PostgreSQL database carry on as they were.
TEST_SEED = "base64:+2eRkg3jYMc+arXzEzUgqmrwT5LerNUnrNBlpvV01ao="
TEST_PSEUDONYM_KEY = "trialog-test-pseudonym-key"
# The three secrets PostgreSQL requires; the environment of a test's `trialog` process.
TEST_SECRETS = {"TRIALOG_CIPHER_KEY": TEST_KEY, "TRIALOG_ALLOCATION_SEED": TEST_SEED,
                "TRIALOG_PSEUDONYM_KEY": TEST_PSEUDONYM_KEY}


def pytest_configure(config: pytest.Config) -> None:
    """A process of pytest-xdist creates its own shared database (see SHARED_DATABASE) if
    PostgreSQL is up; without PostgreSQL, the tests that need it fail on their own (the
    unit tests need no database)."""
    if not hasattr(config, "workerinput"):
        return
    try:
        ensure_shared_database()
    except sqlalchemy.exc.OperationalError:
        pass


def pytest_unconfigure(config: pytest.Config) -> None:
    """A process of pytest-xdist drops its shared database as it ends (each run starts on
    an empty one)."""
    if not hasattr(config, "workerinput"):
        return
    try:
        drop_shared_database()
    except sqlalchemy.exc.OperationalError:
        pass


def settings_for(url: str, **env: str) -> Settings:
    return Settings.from_env({"TRIALOG_DATABASE_URL": url, **TEST_SECRETS, **env})


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        file = tmp_path / "trialog.db"
        if "trialog" in request.fixturenames:  # the application's fixture migrates it
            _copy_migrated_sqlite_file(file)
        return f"sqlite:///{file}"
    return SHARED_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def isolated_url(request, tmp_path) -> Iterator[str]:
    """A database no other test writes to (nor follows: another test's server would move
    its read models meanwhile): empty, or for the ``isolated`` application (which migrates
    it) a copy of one migrated already."""
    migrated = "isolated" in request.fixturenames
    if request.param == "sqlite":
        file = tmp_path / "isolated.db"
        if migrated:
            _copy_migrated_sqlite_file(file)
        yield f"sqlite:///{file}"
        return
    template = migrated_postgres_template() if migrated else None
    with fresh_postgres_database("trialog", template=template) as name:
        yield f"{PG_SERVER}/{name}"


# A store migrated once per test process, copied for each test that would migrate a new
# one: the same tables and rows (a new store holds only its revision), without running
# every migration again for each test.

@functools.cache
def _migrated_sqlite_file() -> Path:
    from infrastructure.store.bootstrap import bootstrap

    folder = Path(tempfile.mkdtemp(prefix="trialog-template-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    file = folder / "template.db"
    app = bootstrap(settings_for(f"sqlite:///{file}"), migrate=True)
    app.close()
    app.engine.dispose()
    return file


def _copy_migrated_sqlite_file(file: Path) -> None:
    """The template's tables and rows, in a file in SQLite's default journal mode, as a
    new file is: the application switches it to WAL, as it must a new one."""
    source = sqlite3.connect(_migrated_sqlite_file())
    target = sqlite3.connect(file)
    try:
        source.backup(target)
        target.execute("PRAGMA journal_mode = DELETE")
    finally:
        target.close()
        source.close()


@functools.cache
def migrated_postgres_template() -> str:
    from infrastructure.store.bootstrap import bootstrap

    name = f"trialog_template_{uuid.uuid4().hex[:12]}"
    create_database(name)
    atexit.register(drop_database, name)
    app = bootstrap(settings_for(f"{PG_SERVER}/{name}"), migrate=True)
    app.close()
    app.engine.dispose()  # a template is copied only with no one connected to it
    return name
