"""The application on a real database, or on a fresh one where a test needs the whole store
to itself."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from infrastructure.store.bootstrap import Trialog, bootstrap
from tests.conftest import settings_for


@pytest.fixture
def trialog(database_url) -> Iterator[Trialog]:
    app = bootstrap(settings_for(database_url), migrate=True)
    yield app
    app.close()


@pytest.fixture
def isolated(isolated_url) -> Iterator[Trialog]:
    app = bootstrap(settings_for(isolated_url), migrate=True)
    yield app
    app.close()
