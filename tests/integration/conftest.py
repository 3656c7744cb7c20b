"""Real databases: a SQLite file per test, and the shared PostgreSQL `test` database
(unique participant ids per test), or a fresh PostgreSQL database where a test needs the
whole store to itself."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from infrastructure.bootstrap import Trialog, bootstrap
from infrastructure.settings import Settings
from tests.databases import PG_SERVER, fresh_postgres_database

TEST_KEY = "dHJpYWxvZy10ZXN0LWtleS0zMi1ieXRlcy1sb25nISE="  # 32 bytes, tests only


def settings_for(url: str) -> Settings:
    return Settings.from_env({"TRIALOG_DATABASE_URL": url, "TRIALOG_CIPHER_KEY": TEST_KEY})


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'trialog.db'}"
    return f"{PG_SERVER}/test"


@pytest.fixture
def trialog(database_url) -> Iterator[Trialog]:
    app = bootstrap(settings_for(database_url), migrate=True)
    yield app
    app.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def isolated_url(request, tmp_path) -> Iterator[str]:
    """A database no other test writes to."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'isolated.db'}"
        return
    with fresh_postgres_database("trialog") as name:
        yield f"{PG_SERVER}/{name}"


@pytest.fixture
def isolated(isolated_url) -> Iterator[Trialog]:
    app = bootstrap(settings_for(isolated_url), migrate=True)
    yield app
    app.close()
