"""Real databases: a SQLite file per test, and the shared PostgreSQL `test` database
(unique participant ids per test), or a fresh PostgreSQL database where a test needs the
whole store to itself."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy

from infrastructure.bootstrap import Trialog, bootstrap
from infrastructure.settings import Settings

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
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
    name = f"trialog_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with admin.connect() as c:
            c.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def isolated(isolated_url) -> Iterator[Trialog]:
    app = bootstrap(settings_for(isolated_url), migrate=True)
    yield app
    app.close()
