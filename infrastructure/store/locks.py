"""PostgreSQL session locks by name: held by one connection until released or until the
connection ends (a process that dies lets go), for work that must not run twice at once
and must not hold a transaction open while it talks to another system."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy.exc
from sqlalchemy import text
from sqlalchemy.engine import Connection


def lock_key(name: str) -> int:
    digest = hashlib.blake2b(name.encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


def try_lock(connection: Connection, name: str) -> bool:
    """Takes the lock named ``name`` for the connection's session; False when another
    session holds it."""
    return bool(connection.scalar(text("SELECT pg_try_advisory_lock(:key)"),
                                  {"key": lock_key(name)}))


@contextmanager
def held(connection: Connection, name: str) -> Iterator[bool]:
    """``try_lock``, and the lock let go on the way out when it was taken."""
    if not try_lock(connection, name):
        yield False
        return
    try:
        yield True
    finally:
        release(connection, name)


def try_locks(connection: Connection, names: list[str]) -> list[str]:
    """``try_lock`` for each name, in one statement: the names whose locks it took."""
    if not names:
        return []
    keys = [lock_key(name) for name in names]
    taken = connection.execute(text(
        "SELECT k.ord FROM unnest(CAST(:keys AS bigint[])) WITH ORDINALITY AS k(key, ord) "
        "WHERE pg_try_advisory_lock(k.key) ORDER BY k.ord"), {"keys": keys}).scalars()
    return [names[i - 1] for i in taken]


def release(connection: Connection, *names: str) -> None:
    """Lets the locks go, in one statement; a connection that can't say so is dropped (a
    closed session holds no lock)."""
    if not names or connection.invalidated:  # a connection dropped holds no lock
        return
    try:
        connection.execute(text("SELECT pg_advisory_unlock(k) FROM unnest(CAST(:keys AS "
                                "bigint[])) AS k"), {"keys": [lock_key(n) for n in names]})
    except sqlalchemy.exc.DBAPIError:
        connection.invalidate()
