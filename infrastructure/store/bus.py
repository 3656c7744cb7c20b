"""The command bus: one command, one transaction, idempotent by command_id.

A command's events and its idempotency record commit together or not at all. The same
command_id with the same body answers the first response and writes nothing; with another
body it is refused. Without an expected version, write conflicts are retried.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import sqlalchemy.exc
from eventsourcing.persistence import IntegrityError
from eventsourcing_sqlalchemy.datastore import transactions
from sqlalchemy import insert, select
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random

from domain.commands import Audit, Command
from domain.errors import IdempotencyKeyReused
from domain.service import TrialService
from infrastructure.store.stored import position_of
from infrastructure.store.tables import command_records

WRITE_CONFLICTS = (IntegrityError, sqlalchemy.exc.IntegrityError)


@dataclass(frozen=True)
class Accepted:
    """The answer to an accepted command; ``replayed`` when it was a retry."""

    body: dict[str, Any]
    replayed: bool


def utc_now() -> datetime:
    return datetime.now(UTC)


def _plain(value: Any) -> Any:
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    raise TypeError(f"not serialisable: {value!r}")


def _inside_a_transaction() -> bool:
    try:
        transactions.get()
    except LookupError:
        return False
    return True


def fingerprint(command: Command, reason: str | None, expected_version: int | None) -> str:
    body = {"type": command.type_name(), "participant_id": command.participant_id,
            "reason": reason, "expected_version": expected_version, "data": command.data}
    encoded = json.dumps(body, sort_keys=True, separators=(",", ":"), default=_plain)
    return hashlib.sha256(encoded.encode()).hexdigest()


class CommandBus:
    def __init__(self, service: TrialService, clock: Callable[[], datetime] = utc_now,
                 max_attempts: int = 50) -> None:
        self.service = service
        self.clock = clock
        self.max_attempts = max_attempts

    def dispatch(self, command: Command, *, command_id: str, actor: str,
                 reason: str | None = None, expected_version: int | None = None) -> Accepted:
        digest = fingerprint(command, reason, expected_version)
        retrying = Retrying(
            retry=retry_if_exception_type(WRITE_CONFLICTS),
            stop=stop_after_attempt(self.max_attempts),
            wait=wait_random(0, 0.005),
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                return self._attempt(command, command_id, actor, reason, expected_version,
                                     digest)
        raise AssertionError("unreachable")  # pragma: no cover

    def _attempt(self, command: Command, command_id: str, actor: str, reason: str | None,
                 expected_version: int | None, digest: str) -> Accepted:
        # Inside a caller's transaction (a follower of the log flagging a deviation), an
        # attempt gets a savepoint: a write conflict rolls back to it, and the retry runs in
        # a transaction that is still usable (PostgreSQL refuses every statement after an
        # error until a rollback).
        nested = _inside_a_transaction()
        recorder: Any = self.service.recorder
        with recorder.transaction(commit=True) as session:  # noqa: SIM117 - needs session
            with session.begin_nested() if nested else nullcontext():
                return self._decide(session, command, command_id, actor, reason,
                                    expected_version, digest)

    def _decide(self, session: Any, command: Command, command_id: str, actor: str,
                reason: str | None, expected_version: int | None, digest: str) -> Accepted:
        previous = session.execute(
            select(command_records.c.fingerprint, command_records.c.response)
            .where(command_records.c.command_id == command_id)
        ).first()
        if previous is not None:
            if previous.fingerprint != digest:
                raise IdempotencyKeyReused(
                    f"command_id {command_id} was already used for another command"
                )
            return Accepted(self._with_position(session, previous.response), replayed=True)
        audit = Audit(command_id=command_id, actor=actor, recorded_at=self.clock(),
                      reason=reason)
        decision = self.service.decide(command, audit, expected_version)
        answer = self.service.answer(decision)
        body = {"command_id": command_id, "participant_id": answer.participant_id,
                "version": answer.version, "position": None, "events": answer.events}
        # Written before the events: the event store's insert locks its table until
        # commit, so the less done after it, the more writers get through.
        session.execute(insert(command_records).values(
            command_id=command_id, fingerprint=digest,
            participant_id=answer.participant_id, response=json.dumps(body),
            recorded_at=audit.recorded_at,
        ))
        body["position"] = self.service.record(decision).position
        return Accepted(body, replayed=False)

    def _with_position(self, session: Any, response: str) -> dict[str, Any]:
        """The first answer again; its position is that of the event it ended with."""
        body: dict[str, Any] = json.loads(response)
        body["position"] = session.execute(position_of(
            self.service.recorder, body["participant_id"], body["version"])).scalar()
        return body
