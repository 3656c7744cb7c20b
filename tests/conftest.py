"""Real databases: a SQLite file per test, and the shared PostgreSQL `test` database
(unique participant ids per test)."""

from __future__ import annotations

import pytest

from infrastructure.settings import Settings
from tests.databases import PG_SERVER

TEST_KEY = "dHJpYWxvZy10ZXN0LWtleS0zMi1ieXRlcy1sb25nISE="  # 32 bytes, tests only


def settings_for(url: str, **env: str) -> Settings:
    return Settings.from_env({"TRIALOG_DATABASE_URL": url, "TRIALOG_CIPHER_KEY": TEST_KEY,
                              **env})


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'trialog.db'}"
    return f"{PG_SERVER}/test"
