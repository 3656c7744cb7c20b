"""Alembic migrations of Trialog's own tables."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

HERE = Path(__file__).resolve().parent


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Creates or migrates the tables to ``revision``."""
    config = Config()
    config.set_main_option("script_location", str(HERE))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
