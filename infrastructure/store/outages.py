"""Telling a database that can't be reached (restarting, failing over, overloaded) from an
error of the request or of the data: the first is answered 503 and retried, never
quarantines anyone; the second is a bug or a bad record."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import psycopg
import sqlalchemy.exc
from eventsourcing import persistence as es_persistence

# Every error a database call can raise, through SQLAlchemy, the event store or the driver.
DATABASE_ERRORS = (sqlalchemy.exc.SQLAlchemyError, es_persistence.PersistenceError,
                   psycopg.Error, sqlite3.Error)


def rolled_back_for_another(error: BaseException) -> bool:
    """Whether PostgreSQL rolled the transaction back for another one's sake (a deadlock
    between them, a serialization failure): decided again, it may well go through."""
    return any(isinstance(e, psycopg.Error) and (e.sqlstate or "").startswith("40")
               for e in _chain(error))  # class 40: transaction rollback


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def the_databases(error: BaseException) -> bool:
    """Whether ``error`` is the database's (it failed, or can't be reached), never one
    record's or one command's own."""
    return isinstance(error, DATABASE_ERRORS) or is_unavailable(error)


def is_unavailable(error: BaseException) -> bool:
    """Whether ``error`` says the database can't be reached now (a retry later may work),
    rather than that the statement or the data is wrong."""
    for e in _chain(error):
        if isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated:
            return True
        if isinstance(e, sqlalchemy.exc.TimeoutError):  # no pooled connection came back
            return True
        if isinstance(e, psycopg.OperationalError):  # refused, shut down, lost, timed out
            return True
        if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
            return True
    return False
