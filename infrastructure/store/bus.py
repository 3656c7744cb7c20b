"""The command bus: idempotent by command_id, each command in a transaction.

A command's events and its idempotency record commit together or not at all. The same
command_id with the same body answers the first response and writes nothing; with another
body it is refused. Without an expected version, write conflicts are retried.

Many commands together (a bulk import, a chunk of reminders, and a group: the commands that
arrive while another thread of the process is committing): decided one after another on
the same participants in memory, then written in one transaction with one statement per
table, each answered only after that transaction commits. A refused command is answered
alone and leaves no trace. A command that arrives alone runs alone, as it would without
grouping.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any
from uuid import UUID

import orjson
import sqlalchemy.exc
from eventsourcing.persistence import IntegrityError
from eventsourcing.utils import get_topic
from eventsourcing_sqlalchemy.datastore import transactions
from sqlalchemy import bindparam, insert, literal, select, true, update
from tenacity import (
    Retrying,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random,
)

from domain.access import EVERY_SITE, Scope
from domain.chain import LEAVES, canonical_bytes
from domain.commands import DATA_COMMANDS, Audit, Command, ScreenParticipant
from domain.errors import (
    CommandRecordAltered,
    DatabaseLocked,
    DomainError,
    IdempotencyKeyReused,
    ParticipantIdUnavailable,
    ParticipantNotFound,
)
from domain.participant import Participant, participant_uuid
from domain.service import TrialService
from domain.trial import TrialDatabase, trial_uuid
from infrastructure.store.access_seals import AccessSeals, seals_for
from infrastructure.store.outages import (
    DATABASE_ERRORS,
    is_unavailable,
    rolled_back_for_another,
    the_databases,
)
from infrastructure.store.stored import (
    UnreadableRecord,
    as_bytes,
    events_table,
    load_apart,
    load_participants,
    plain_stream,
    positions_of,
    sealed_topic,
)
from infrastructure.store.tables import (
    any_of,
    as_utc,
    command_records,
    database_lock,
    insert_rows,
)

WRITE_CONFLICTS = (IntegrityError, sqlalchemy.exc.IntegrityError)

log = logging.getLogger("trialog.bus")

# A command's record as a retry reads it: the columns its seal covers, and the seal.
SEALED_RECORD = (command_records.c.command_id, command_records.c.fingerprint,
                  command_records.c.participant_id, command_records.c.response,
                  command_records.c.recorded_at, command_records.c.seal)


@dataclass(frozen=True)
class Intent:
    """A command to dispatch, with what the bus needs besides (see CommandBus.dispatch)."""

    command: Command
    command_id: str
    actor: str
    reason: str | None = None
    expected_version: int | None = None
    scope: Scope = EVERY_SITE


class _LockedMeanwhile(DatabaseLocked):
    """The database was locked while these commands were being written: they are decided
    again (and refused, if it stays locked)."""


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


# A fingerprint is json's text of the command (recorded fingerprints can't change): dates
# as ISO text, and nothing else JSON has no type for.
_FINGERPRINTED = LEAVES - {UUID}


def _a_command_s_fault(error: BaseException) -> bool:
    """Whether a group's failure may be one of its commands' own: a value the database
    refuses (a DataError), or a fault of the program; not the database's own (the whole
    transaction's), nor a rule's (the database locked again and again meanwhile)."""
    if not isinstance(error, Exception) or is_unavailable(error):
        return False
    if isinstance(error, sqlalchemy.exc.DataError):
        return True
    return not isinstance(error, (DomainError, *DATABASE_ERRORS))


def _inside_a_transaction() -> bool:
    try:
        transactions.get()
    except LookupError:
        return False
    return True


def fingerprint(command: Command, reason: str | None, expected_version: int | None) -> str:
    body = {"type": command.type_name(), "participant_id": command.participant_id,
            "reason": reason, "expected_version": expected_version, "data": command.data}
    return hashlib.sha256(canonical_bytes(body, _plain, _FINGERPRINTED)).hexdigest()


LOCKED_TOPIC = get_topic(TrialDatabase.DatabaseLocked)


def _locked(row: Any, mapper: Any) -> DatabaseLocked | None:
    """The refusal the database lock means, if it is locked: by the bus's copy of it, or
    by the trial's record, whose newest event is a lock (the copy, written in the same
    transaction, says who and when; the record holds when the copy was edited). The
    record's event is taken for what its sealed state says it is, not its topic column
    (which anyone with access to the database could change); one it can't read locks."""
    if row is not None and row.locked_at is not None:
        return DatabaseLocked(
            f"the database is locked (by {row.locked_by} at "
            f"{as_utc(row.locked_at).isoformat()}): no participant's data can change")
    if row is None or row.trial_state is None:
        return None
    try:
        sealed = sealed_topic(mapper, as_bytes(row.trial_state)) or row.trial_topic
    except Exception:  # noqa: BLE001 - an unreadable record: the lock can't be known
        sealed = LOCKED_TOPIC
    if sealed == LOCKED_TOPIC:
        return DatabaseLocked("the database is locked: no participant's data can change")
    return None


class _Waiting:
    """A command waiting for its group's transaction, and then its outcome."""

    __slots__ = ("accepted", "done", "error", "intent")

    def __init__(self, intent: Intent) -> None:
        self.intent = intent
        self.done = False
        self.accepted: Accepted | None = None
        self.error: BaseException | None = None

    def outcome(self) -> Accepted:
        if self.error is not None:
            raise self.error
        assert self.accepted is not None
        return self.accepted


class CommandBus:
    def __init__(self, service: TrialService, clock: Callable[[], datetime] = utc_now,
                 max_attempts: int = 50, max_group: int = 64) -> None:
        self.service = service
        self.study_id = service.protocol.study_id
        self.clock = clock
        self.max_attempts = max_attempts
        self.max_group = max_group
        self._turn = threading.Condition()
        self._waiting: list[_Waiting] = []
        self._committing = False
        self.groups = 0  # transactions of more than one command (for tests and reports)
        self._sqlite = service.recorder.datastore.engine.dialect.name == "sqlite"
        # Statements built once (the values bound when run).
        self._insert_record = insert(command_records)
        self._previous = select(*SEALED_RECORD).where(any_of(command_records.c.command_id,
                                                              not self._sqlite))
        # The lock's copy and the trial's newest event (NULLs when there are none), read
        # once, joined to one row.
        events = events_table(service.recorder)
        newest = (select(events.c.topic.label("trial_topic"),
                         events.c.state.label("trial_state"))
                  .where(events.c.originator_id == trial_uuid(self.study_id))
                  .order_by(events.c.originator_version.desc()).limit(1).subquery())
        one = select(literal(1).label("one")).subquery()
        lock = (database_lock.c.locked_at, database_lock.c.locked_by, newest.c.trial_topic,
                newest.c.trial_state)
        self._lock_row = (
            select(*lock)
            .select_from(one.outerjoin(database_lock,
                                       database_lock.c.study_id == self.study_id)
                         .outerjoin(newest, true())))
        # One statement for a command's idempotency record (NULLs when there is none) and
        # the database lock; built once, the command id bound when run.
        self._record_and_lock = (
            select(*SEALED_RECORD, *lock)
            .select_from(one.outerjoin(command_records, command_records.c.command_id
                                       == bindparam("command_id"))
                         .outerjoin(database_lock,
                                    database_lock.c.study_id == self.study_id)
                         .outerjoin(newest, true())))

    @functools.cached_property
    def seals(self) -> AccessSeals:
        """The seals of the commands' records (registered for the engine by bootstrap)."""
        return seals_for(self.service.recorder.datastore.engine)  # type: ignore[attr-defined]

    def dispatch(self, command: Command, *, command_id: str, actor: str,
                 reason: str | None = None, expected_version: int | None = None,
                 scope: Scope = EVERY_SITE) -> Accepted:
        """Decides and records the command, in a transaction of its own or in its group's
        (see the module's docstring); inside a caller's transaction, in that one. Outside
        ``scope`` a participant does not exist: the answer is an unknown id's, also for a
        retry."""
        intent = Intent(command, command_id, actor, reason, expected_version, scope)
        if _inside_a_transaction() or self._sqlite:
            # SQLite serialises writers anyway: a group there would gain nothing.
            return self._dispatch_now(intent)
        return self._in_group(_Waiting(intent))

    def _in_group(self, mine: _Waiting) -> Accepted:
        """Waits while another thread commits, then commits what has queued meanwhile
        (this command among it) unless a thread that got there first did."""
        with self._turn:
            self._waiting.append(mine)
        while True:
            with self._turn:
                while self._committing and not mine.done:
                    self._turn.wait()
                if mine.done:
                    return mine.outcome()
                self._committing = True
                group = self._waiting[:self.max_group]
                del self._waiting[:self.max_group]
            try:
                self._commit(group)
            finally:
                with self._turn:
                    for waiting in group:
                        waiting.done = True
                    self._committing = False
                    self._turn.notify_all()

    def _commit(self, group: list[_Waiting]) -> None:
        """The group's commands together (see dispatch_all); alone, as is. A group whose
        transaction fails by one command's own fault (a value the database refuses, events
        that can't be written: see ``_a_command_s_fault``) is tried again one command at a
        time, so that the fault is that command's alone, not every client's in its
        group."""
        try:
            if len(group) == 1:
                group[0].accepted = self._dispatch_now(group[0].intent)
                return
            outcomes = self.dispatch_all([waiting.intent for waiting in group])
            self.groups += 1
        except BaseException as error:  # noqa: BLE001 - handed to each command's thread
            if len(group) > 1 and _a_command_s_fault(error):
                for waiting in group:
                    try:
                        waiting.accepted = self._dispatch_now(waiting.intent)
                    except Exception as own:  # noqa: BLE001 - handed to its thread
                        waiting.error = own
                return
            for waiting in group:
                waiting.error = error
            return
        for waiting, outcome in zip(group, outcomes, strict=True):
            if isinstance(outcome, Accepted):
                waiting.accepted = outcome
            else:
                waiting.error = outcome

    def _dispatch_now(self, intent: Intent) -> Accepted:
        digest = fingerprint(intent.command, intent.reason, intent.expected_version)
        for attempt in self._retrying():
            with attempt:
                return self._attempt(intent, digest)
        raise AssertionError("unreachable")  # pragma: no cover

    def _retrying(self, *also: type[Exception]) -> Retrying:
        # A deadlock: two batches wrote the same command ids in opposite orders (two
        # imports, or two clients' batches, of the same commands at once).
        return Retrying(retry=retry_if_exception_type((*WRITE_CONFLICTS, *also))
                        | retry_if_exception(rolled_back_for_another),
                        stop=stop_after_attempt(self.max_attempts),
                        wait=wait_random(0, 0.005), reraise=True)

    def _attempt(self, intent: Intent, digest: str) -> Accepted:
        # Inside a caller's transaction (a follower of the log flagging a deviation), an
        # attempt gets a savepoint: a write conflict rolls back to it, and the retry runs in
        # a transaction that is still usable (PostgreSQL refuses every statement after an
        # error until a rollback).
        nested = _inside_a_transaction()
        recorder: Any = self.service.recorder
        with recorder.transaction(commit=True) as session:  # noqa: SIM117 - needs session
            with session.begin_nested() if nested else nullcontext():
                return self._decide(session, intent, digest)

    def _decide(self, session: Any, intent: Intent, digest: str) -> Accepted:
        command, command_id = intent.command, intent.command_id
        found = session.execute(self._record_and_lock, {"command_id": command_id}).one()
        if found.command_id is not None:
            return self._replayed(session, intent, digest, found)
        audit = Audit(command_id=command_id, actor=intent.actor, recorded_at=self.clock(),
                      reason=intent.reason)
        changes_data = type(command) in DATA_COMMANDS
        locked = _locked(found, self.service.mapper)
        if changes_data and locked is not None:
            raise locked
        try:
            loaded, new = load_participants(self.service, session, {command.participant_id})
        except Exception as error:  # a record that can't be read, or replayed
            if the_databases(error):
                raise
            seen = self._as_seen(intent, error)
            if seen is error:
                raise
            raise seen from None
        with self.service.together(loaded, new):  # read in one query, not the library's two
            try:
                decision = self.service.decide(command, audit, intent.expected_version,
                                               intent.scope)
            except DomainError:
                again = self._recorded_meanwhile(session, command_id)
                if again is None:
                    raise
                return self._replayed(session, intent, digest, again)
        answer = self.service.answer(decision)
        body = self._body(command_id, answer)
        # Written before the events: the event store's insert locks its table until
        # commit, so the less done after it, the more writers get through.
        session.execute(self._insert_record, [self._record(command_id, digest, audit, body)])
        body["position"] = self.service.record(decision).position
        if changes_data:
            # Again now that the events are written: on PostgreSQL a LockDatabase that
            # committed meanwhile is seen here (the event table's lock is held until this
            # transaction ends), and this command is refused rather than land after it.
            self._refuse_if_database_locked(session)
        return Accepted(body, replayed=False)

    def _recorded_meanwhile(self, session: Any, command_id: str) -> Any | None:
        """The record of a command refused here that another process committed since its
        record was looked for (a retry racing its first copy: on PostgreSQL each statement
        sees what committed before it, so the participant read after the look-up can hold
        that copy's events, which this one's rule then refuses). Its first answer is owed,
        not the refusal."""
        found = session.execute(self._record_and_lock, {"command_id": command_id}).one()
        return found if found.command_id is not None else None

    def _replayed(self, session: Any, intent: Intent, digest: str, previous: Any) -> Accepted:
        """The same command_id again: the first answer, if it is the same command."""
        self._same_command(intent, digest, previous.fingerprint, previous)
        return Accepted(self._with_position(session, previous.response), replayed=True)

    def _same_command(self, intent: Intent, digest: str, recorded: str,
                      record: Any = None) -> None:
        """Refuses a command_id used before for another command, and a retry whose
        ``record`` (as read from the table) fails its seal."""
        if intent.scope.sites is not None:
            # Refused as the command would be with an unused id, before anything is said
            # about the id: a participant outside the scope stays unknown.
            self.service.target(intent.command, intent.scope)
        if record is not None:
            self._check_seal(record)
        if recorded != digest:
            raise IdempotencyKeyReused.of(intent.command_id)

    def _check_seal(self, record: Any) -> None:
        """A record changed outside trialog (its answer, its fingerprint, whose it is) or
        made up there is answered to no retry: neither its answer nor a new decision."""
        if not self.seals.command_holds(record):
            log.warning("the record of command %s fails its seal: its retry is refused",
                        record.command_id)
            raise CommandRecordAltered.of(record.command_id)

    @staticmethod
    def _body(command_id: str, answer: Any) -> dict[str, Any]:
        return {"command_id": command_id, "participant_id": answer.participant_id,
                "version": answer.version, "position": None, "events": answer.events,
                **answer.decided}

    def _record(self, command_id: str, digest: str, audit: Audit, body: dict[str, Any],
                response: str | None = None, key: str | None = None) -> dict[str, Any]:
        """The idempotency record, sealed: the first answer, its position found when
        replayed. ``key``: whose it is, if not the participant's of the answer."""
        participant_id = key or body["participant_id"]
        response = response if response is not None else orjson.dumps(body).decode()
        return {"command_id": command_id, "fingerprint": digest,
                "participant_id": participant_id, "response": response,
                "recorded_at": audit.recorded_at,
                "seal": self.seals.command(command_id, digest, participant_id, response,
                                           audit.recorded_at)}

    def dispatch_all(self, intents: list[Intent], loaded: Iterable[Participant] = (),
                     alone: bool = True) -> list[Accepted | Exception]:
        """The commands in order, decided together and written in one transaction (see
        the module's docstring): for each, its answer or why it was refused (a DomainError,
        or an unexpected error of its own). ``loaded``: participants the caller has just
        read, used instead of reading them again (if another writer moved one on, the
        insert conflicts and everything is decided again from the store). The whole fails
        when the transaction does (the database is unavailable), and, unless ``alone``,
        when a command fails otherwise than by a rule (a DomainError): then nothing is
        written."""
        if not intents:
            return []
        digests = [fingerprint(i.command, i.reason, i.expected_version) for i in intents]
        given = list(loaded)
        recorder: Any = self.service.recorder
        nested = _inside_a_transaction()
        for attempt in self._retrying(_LockedMeanwhile):
            with attempt:
                seeded, given = given, []  # a retry reads the store
                with recorder.transaction(commit=True) as session:  # noqa: SIM117
                    with session.begin_nested() if nested else nullcontext():
                        return self._decide_all(session, intents, digests, seeded, alone)
        raise AssertionError("unreachable")  # pragma: no cover

    def _decide_all(self, session: Any, intents: list[Intent], digests: list[str],
                    seeded: list[Participant], alone: bool) -> list[Accepted | Exception]:
        previous = {row.command_id: row for row in session.execute(
            self._previous, {"ids": list({i.command_id for i in intents})})}
        changes_data = any(type(i.command) in DATA_COMMANDS for i in intents)
        locked = self._database_locked(session) if changes_data else None
        outcomes: list[Accepted | Exception | None] = [None] * len(intents)
        bodies: dict[int, tuple[dict[str, Any], list[Any]]] = {}
        replayed: dict[int, dict[str, Any]] = {}  # first answers, their positions to find
        first: dict[str, int] = {}  # command_id: the index that recorded it in this batch
        records = []
        given = {p.participant_id for p in seeded}
        loaded, new, unloadable = load_apart(self.service, session, {
            i.command.participant_id for i in intents
            if i.command_id not in previous and i.command.participant_id not in given})
        with self.service.together([*loaded, *seeded], new) as together:
            for index, (intent, digest) in enumerate(zip(intents, digests, strict=True)):
                try:
                    if intent.command_id in previous:
                        recorded = previous[intent.command_id]
                        self._same_command(intent, digest, recorded.fingerprint, recorded)
                        replayed[index] = json.loads(recorded.response)
                        continue
                    if intent.command_id in first:  # its body is complete once written
                        self._same_command(intent, digest, digests[first[intent.command_id]])
                        outcomes[index] = None
                        continue
                    if locked is not None and type(intent.command) in DATA_COMMANDS:
                        raise locked
                    if intent.command.participant_id in unloadable:
                        raise self._as_seen(intent, unloadable[intent.command.participant_id])
                    audit = Audit(command_id=intent.command_id, actor=intent.actor,
                                  recorded_at=self.clock(), reason=intent.reason)
                    answer, events = together.decide(intent.command, audit,
                                                      intent.expected_version, intent.scope)
                except Exception as error:
                    # The database's errors are the whole transaction's (on PostgreSQL it
                    # refuses every statement after one), never one command's.
                    if (the_databases(error)
                            or not (alone or isinstance(error, DomainError))):
                        raise
                    outcomes[index] = error
                    continue
                body = self._body(intent.command_id, answer)
                bodies[index] = (body, events)
                records.append(self._record(intent.command_id, digest, audit, body))
                first[intent.command_id] = index
            self._replay_recorded_meanwhile(session, intents, digests, outcomes, replayed,
                                            set(previous))
            # Before the inserts: the event table's lock is held from the save to commit.
            self._find_positions(session, list(replayed.values()))
            if records:
                # On PostgreSQL as arrays, in binary (see insert_rows).
                insert_rows(session, command_records, records)
                positions = together.save()
                meanwhile = (self._database_locked(session) if any(
                    type(intents[i].command) in DATA_COMMANDS for i in bodies) else None)
                if meanwhile is not None:
                    raise _LockedMeanwhile(meanwhile.message)
        for index, (body, events) in bodies.items():
            body["position"] = max((positions[(e.originator_id, e.originator_version)]
                                    for e in events), default=None)
            outcomes[index] = Accepted(body, replayed=False)
        for index, body in replayed.items():
            outcomes[index] = Accepted(body, replayed=True)
        for index, intent in enumerate(intents):
            if outcomes[index] is None:
                body = bodies[first[intent.command_id]][0]
                outcomes[index] = Accepted(dict(body), replayed=True)
        return [outcome for outcome in outcomes if outcome is not None]  # each is, now

    def _as_seen(self, intent: Intent, error: Exception) -> Exception:
        """A participant whose record can't be loaded, as the caller may know of it: as
        the service refuses one outside the caller's sites (its site read off its first
        event, as a read finds it; one whose first event can't be read, for callers of
        every site only), so that no command tells it exists; else ``error``."""
        if intent.scope.every_site:
            return error
        participant_id = intent.command.participant_id
        try:
            first = plain_stream(self.service, participant_uuid(participant_id), lte=1)
        except UnreadableRecord:
            first = []
        if first and intent.scope.admits(first[0][2]["data"]["site_id"]):
            return error
        if isinstance(intent.command, ScreenParticipant):
            return ParticipantIdUnavailable(f"participant_id {participant_id} is already in "
                                            "use; choose another")
        return ParticipantNotFound(f"participant {participant_id} not found")

    def _replay_recorded_meanwhile(self, session: Any, intents: list[Intent],
                                   digests: list[str], outcomes: list[Any],
                                   replayed: dict[int, dict[str, Any]],
                                   looked_up: set[str]) -> None:
        """The commands of a group refused here whose record another process committed
        since the group's records were looked up (see ``_recorded_meanwhile``): their first
        answers instead."""
        refused = {intents[i].command_id for i, outcome in enumerate(outcomes)
                   if isinstance(outcome, DomainError)} - looked_up
        if not refused:
            return
        found = {row.command_id: row
                 for row in session.execute(self._previous, {"ids": list(refused)})}
        for index, intent in enumerate(intents):
            row = found.get(intent.command_id)
            if row is None or not isinstance(outcomes[index], DomainError):
                continue
            try:
                self._same_command(intent, digests[index], row.fingerprint, row)
            except DomainError as error:
                outcomes[index] = error
                continue
            outcomes[index] = None
            replayed[index] = json.loads(row.response)

    def _refuse_if_database_locked(self, session: Any) -> None:
        locked = self._database_locked(session)
        if locked is not None:
            raise locked

    def _database_locked(self, session: Any) -> DatabaseLocked | None:
        return _locked(session.execute(self._lock_row).first(), self.service.mapper)

    def dispatch_trial(self, type_name: str, *, command_id: str, actor: str,
                       reason: str | None = None) -> Accepted:
        """LockDatabase or UnlockDatabase, idempotent by command_id like every command; the
        bus's copy of the lock is written in the same transaction as the event."""
        return self._dispatch_whole(
            {"type": type_name, "reason": reason}, f"trial:{self.study_id}", command_id,
            actor, reason, lambda audit: self.service.decide_trial(type_name, audit),
            self._keep_lock)

    def dispatch_revocation(self, type_name: str, name: str, *, command_id: str, actor: str,
                            keep: Callable[[Any], None], reason: str | None = None
                            ) -> Accepted:
        """RevokeToken or DisablePerson of ``name`` in the access register (see
        ``domain.revocations``), idempotent by command_id; ``keep`` writes the access
        tables' copy in the same transaction, on the session it is given."""
        return self._dispatch_whole(
            {"type": type_name, "name": name, "reason": reason}, f"access:{self.study_id}",
            command_id, actor, reason,
            lambda audit: self.service.decide_revocation(type_name, name, audit),
            lambda session, *_: keep(session))

    def dispatch_grant(self, name: str, role: str, sites: list[str] | None,
                       granted_at: datetime, *, command_id: str, actor: str,
                       keep: Callable[[Any], None], full_name: str | None = None,
                       reason: str | None = None) -> Accepted:
        """Access granted to ``name`` at ``granted_at`` in the access register: a machine
        token, or a person (``full_name`` given); ``keep`` writes the access table's row
        in the same transaction."""
        return self._dispatch_whole(
            {"type": "GrantAccess", "name": name, "role": role, "sites": sites,
             "full_name": full_name, "granted_at": granted_at.isoformat(), "reason": reason},
            f"access:{self.study_id}", command_id, actor, reason,
            lambda audit: self.service.decide_grant(name, role, sites, audit, full_name,
                                                    granted_at),
            lambda session, *_: keep(session))

    def dispatch_password_change(self, login: str, generation: int, *, command_id: str,
                                 actor: str, keep: Callable[[Any], None]) -> Accepted:
        """The ``generation``-th change of ``login``'s password in the access register;
        ``keep`` writes the person's row in the same transaction."""
        return self._dispatch_whole(
            {"type": "ChangePassword", "name": login, "generation": generation},
            f"access:{self.study_id}", command_id, actor, None,
            lambda audit: self.service.decide_password_change(login, generation, audit),
            lambda session, *_: keep(session))

    def _dispatch_whole(self, fingerprinted: dict[str, Any], key: str, command_id: str,
                        actor: str, reason: str | None, decide: Callable[[Audit], Any],
                        keep: Callable[[Any, Any, Audit, int], None]) -> Accepted:
        """A command on a trial-wide stream (the database lock, the access register):
        decided on the aggregate ``decide`` gives, saved with its record (``key``: whose
        it is) and what ``keep`` writes beside it, in one transaction."""
        encoded = json.dumps(fingerprinted, sort_keys=True)
        digest = hashlib.sha256(encoded.encode()).hexdigest()
        recorder: Any = self.service.recorder
        for attempt in self._retrying():
            with attempt, recorder.transaction(commit=True) as session:
                previous = session.execute(
                    select(*SEALED_RECORD)
                    .where(command_records.c.command_id == command_id)).first()
                if previous is not None:
                    self._check_seal(previous)
                    if previous.fingerprint != digest:
                        raise IdempotencyKeyReused.of(command_id)
                    return Accepted(json.loads(previous.response), replayed=True)
                audit = Audit(command_id=command_id, actor=actor, recorded_at=self.clock(),
                              reason=reason)
                aggregate = decide(audit)
                events = [{"type": type(e).__name__, "version": e.originator_version,
                           "recorded_at": e.timestamp.isoformat()}
                          for e in aggregate.pending_events]
                recordings = self.service.save(aggregate)
                position = max(r.notification.id for r in recordings)
                body = {"command_id": command_id, "study_id": self.study_id,
                        "version": aggregate.version, "position": position,
                        "events": events}
                session.execute(self._insert_record, [self._record(
                    command_id, digest, audit, body, json.dumps(body), key)])
                keep(session, aggregate, audit, position)
                return Accepted(body, replayed=False)
        raise AssertionError("unreachable")  # pragma: no cover

    def _keep_lock(self, session: Any, database: Any, audit: Audit, position: int) -> None:
        values = ({"locked_at": audit.recorded_at, "locked_by": audit.actor,
                   "position": position} if database.locked is not None
                  else {"locked_at": None, "locked_by": None, "position": position})
        changed = session.execute(update(database_lock)
                                  .where(database_lock.c.study_id == self.study_id)
                                  .values(**values))
        if changed.rowcount == 0:
            session.execute(insert(database_lock).values(study_id=self.study_id, **values))

    def _find_positions(self, session: Any, answers: list[dict[str, Any]]) -> None:
        """Each first answer's position, that of the event it ended with: one query for
        them all. An answer that wrote no event keeps none (its version is an earlier
        command's event)."""
        answers = [body for body in answers if body.get("events")]
        if not answers:
            return
        wanted = {(body["participant_id"], body["version"]) for body in answers}
        found = {(row.originator_id, row.originator_version): row.id
                 for row in session.execute(positions_of(self.service.recorder,
                                                         list(wanted)))}
        for body in answers:
            body["position"] = found.get((participant_uuid(body["participant_id"]),
                                          body["version"]))

    def _with_position(self, session: Any, response: str) -> dict[str, Any]:
        """The first answer again; its position is that of the event it ended with."""
        body: dict[str, Any] = json.loads(response)
        self._find_positions(session, [body])
        return body
