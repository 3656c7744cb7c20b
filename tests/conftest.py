"""Real databases: a SQLite file per test, and the shared PostgreSQL `test` database, one per
process under pytest-xdist (unique participant ids per test)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy.exc

from infrastructure.store.settings import Settings
from tests.databases import (
    PG_SERVER,
    SHARED_URL,
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


def settings_for(url: str, **env: str) -> Settings:
    return Settings.from_env({"TRIALOG_DATABASE_URL": url, **TEST_SECRETS, **env})


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'trialog.db'}"
    return SHARED_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def isolated_url(request, tmp_path) -> Iterator[str]:
    """A database no other test writes to (nor follows: another test's server would move
    its read models meanwhile)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'isolated.db'}"
        return
    with fresh_postgres_database("trialog") as name:
        yield f"{PG_SERVER}/{name}"
