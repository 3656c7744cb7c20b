"""Session locks by name on PostgreSQL: many taken in one statement, only those no other
session holds, in the order asked; released together."""

import uuid

from sqlalchemy import create_engine

from infrastructure.store import locks
from tests.databases import SHARED_URL


def test_many_locks_are_taken_together_except_those_another_session_holds():
    engine = create_engine(SHARED_URL)
    names = [f"test:lock:{uuid.uuid4()}" for _ in range(4)]
    try:
        with engine.connect() as mine, engine.connect() as other:
            assert locks.try_lock(other, names[2])
            assert locks.try_locks(mine, names) == [names[0], names[1], names[3]]
            assert locks.try_locks(other, [names[0], names[1]]) == []  # held by mine
            locks.release(mine, names[0], names[1], names[3])
            assert locks.try_locks(other, [names[0], names[3]]) == [names[0], names[3]]
            assert locks.try_locks(mine, names) == [names[1]]
    finally:
        engine.dispose()
