"""`trialog import FILE`: NDJSON commands, one command body a line as POST /v1/commands
takes it, applied in order under the same rules, many per transaction. A refused command
leaves no trace and is reported with its line number; running the file
again writes nothing new (command ids).

With ``--jobs N`` (PostgreSQL), N processes share the file by site: each reads every line
and applies those of its sites' participants, in the file's order. A site's participants
draw on one allocation sequence (randomization is stratified by site), so a site's lines
are never split between processes, which would make them conflict on it; a site is known
from a participant id by the protocol's prefixes. A line whose participant id names no site
(or that is not a command) goes to one process by its id, where it is refused as it would
be alone. A command id on lines of two processes is its first line's: the other process
refuses its own lines with that id, as one process would once the first line is written,
whichever process writes first.
"""

from __future__ import annotations

import signal
import uuid
import zlib
from codecs import BOM_UTF8
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import repeat
from multiprocessing import get_context
from typing import Any, BinaryIO

import orjson
from marshmallow import ValidationError

from domain.commands import COMMAND_TYPES, SIGNING_COMMANDS
from domain.errors import DomainError, IdempotencyKeyReused
from domain.protocol import Protocol
from infrastructure.heap import freeze_startup
from infrastructure.logs import fault_at
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.bus import Accepted, Intent
from infrastructure.store.loaders import Load, data_loaders, loader
from infrastructure.store.outages import DATABASE_ERRORS
from infrastructure.store.schemas import MAX_BODY, CommandEnvelope, flatten, json_fault
from infrastructure.store.settings import Settings
from infrastructure.store.stored import UnreadableRecord

CHUNK = 500  # commands per transaction
MAX_LINE = MAX_BODY  # a line's bytes at most: the API's largest body


class _TooLong(bytes):
    """In place of a line longer than MAX_LINE, which is never held whole."""


def capped_lines(file: BinaryIO) -> Iterator[bytes]:
    """The file's lines, each read at most MAX_LINE bytes at a time: a longer one is
    passed over to its end and given as a _TooLong (refused, its number kept). A byte
    order mark before the first is skipped (RFC 8259 lets a reader skip it, as the API
    does)."""
    first = True
    while line := file.readline(MAX_LINE + 1):
        whole = len(line) <= MAX_LINE or line.endswith(b"\n")  # (the mark counted)
        if first:
            line, first = line.removeprefix(BOM_UTF8), False
        if whole:
            yield line
            continue
        while (rest := file.readline(MAX_LINE)) and not rest.endswith(b"\n"):
            pass
        yield _TooLong(b"-")


@dataclass
class Report:
    accepted: int = 0
    repeated: int = 0
    refused: list[tuple[int, str]] = field(default_factory=list)
    failed: str | None = None  # why a process stopped before the end of its lines

    def add(self, other: Report) -> None:
        self.accepted += other.accepted
        self.repeated += other.repeated
        self.refused.extend(other.refused)
        self.failed = self.failed or other.failed


def _refusal(fields: dict[str, list[str]]) -> str:
    return "validation_failed: " + "; ".join(f"{k}: {v[0]}" for k, v in fields.items())


def _chunks(lines: Iterable[bytes], part: int, route: Route | None
            ) -> Iterator[list[tuple[int, bytes, bool]]]:
    """The lines of process ``part`` (every line when there is one process: no ``route``),
    CHUNK at a time, with their numbers in the file and whether the first line with their
    command id is another process's. To know it, each process keeps every command id of
    the file it has read, with the process of its first line (about 100 bytes a line)."""
    chunk: list[tuple[int, bytes, bool]] = []
    first: dict[int, int] = {}  # command id (as an integer) -> the process of its first line
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if route is None:
            chunk.append((number, line, False))
        else:
            owner, command_id = route(line)
            if command_id is not None:
                owner_of_id = first.setdefault(command_id, owner)
            if owner == part:
                chunk.append((number, line, command_id is not None and owner_of_id != part))
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# Which process applies a line, and the line's command id as the integer of its UUID (None:
# it has none, or not a UUID: the line is refused for it before its id counts).
Route = Callable[[bytes], tuple[int, int | None]]


def router(protocol: Protocol, parts: int) -> Route:
    """Which of ``parts`` processes applies a line: its participant's site's (the sites
    taken in turn), else one chosen by its participant id, else the first; with the
    line's command id (see Route)."""
    prefixes = [(site.participant_prefix, index) for index, site in enumerate(protocol.sites)]

    def route(line: bytes) -> tuple[int, int | None]:
        try:
            raw = orjson.loads(line)
        except orjson.JSONDecodeError:
            return 0, None
        if not isinstance(raw, dict):
            return 0, None
        command_id = _uuid_int(raw.get("command_id"))
        participant_id = raw.get("participant_id")
        if not isinstance(participant_id, str):
            return 0, command_id
        for prefix, index in prefixes:
            if participant_id.startswith(prefix):
                return index % parts, command_id
        return zlib.crc32(participant_id.encode()) % parts, command_id

    return route


def _uuid_int(value: Any) -> int | None:
    """A command id as the command bus keys it (any spelling of the same UUID is the same
    id), as an integer; None if it is not a UUID's text."""
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value).int
    except ValueError:
        return None


def run(t: Trialog, lines: Iterable[bytes], actor: str, part: int = 0,
        parts: int = 1) -> Report:
    """Applies the lines (those of process ``part`` of ``parts``: see router). A database
    that fails stops it: the report then says why, and what the transactions before
    that one wrote and refused."""
    report = Report()
    try:
        _apply(t, lines, actor, part, parts, report)
    except DATABASE_ERRORS as e:
        report.failed = database_failure(e)
    report.refused.sort()
    return report


def _apply(t: Trialog, lines: Iterable[bytes], actor: str, part: int, parts: int,
           report: Report) -> None:
    envelope = loader(CommandEnvelope())
    schemas = data_loaders(t.protocol)
    route = router(t.protocol, parts) if parts > 1 else None
    for chunk in _chunks(lines, part, route):
        intents: list[tuple[int, Intent]] = []
        refused: list[tuple[int, str]] = []  # the report's once the chunk's transaction is
        for number, line, taken in chunk:
            intent = _intent(line, actor, envelope, schemas)
            if taken and not isinstance(intent, str):
                intent = _reused(intent.command_id)
            if isinstance(intent, str):
                refused.append((number, intent))
            else:
                intents.append((number, intent))
        outcomes = t.bus.dispatch_all([intent for _, intent in intents])
        report.refused += refused
        for (number, _), outcome in zip(intents, outcomes, strict=True):
            if isinstance(outcome, DomainError):
                report.refused.append((number, f"{outcome.code}: {outcome.message}"))
            elif not isinstance(outcome, Accepted):  # a fault of this line's alone
                report.refused.append((number, _failure(outcome)))
            elif outcome.replayed:
                report.repeated += 1
            else:
                report.accepted += 1


def _reused(command_id: str) -> str:
    """The refusal of a line whose command id is first carried by another process's line:
    the bus's own, as one process gives it once that first line is written (lines of two
    processes are two participants', so never the same command)."""
    error = IdempotencyKeyReused.of(command_id)
    return f"{error.code}: {error.message}"


def _failure(error: Exception) -> str:
    """A command that failed otherwise than by a rule: its participant's record the store
    can't give (the event named), or a fault of the program (its kind and where, see
    fault_at); nothing of it was written."""
    if isinstance(error, UnreadableRecord):
        return f"record_unreadable: {error.of(error.participant_id or 'a participant')}"
    return f"internal_error: {fault_at(error)}"


def jobs_refusal(settings: Settings, protocol: Protocol, jobs: int) -> str | None:
    """Why the import can't run in ``jobs`` processes, if it can't."""
    if jobs < 1:
        return "--jobs: must be at least 1"
    if jobs == 1:
        return None
    if settings.is_sqlite:
        return "--jobs: SQLite takes one writer at a time; use --jobs 1"
    if not all(site.participant_prefix for site in protocol.sites):
        return ("--jobs: the protocol's sites have no participant_prefix, so a line's site "
                "is not known from its participant id; use --jobs 1")
    if jobs > len(protocol.sites):
        return (f"--jobs: at most {len(protocol.sites)}, one process a site (the "
                f"protocol has {len(protocol.sites)} sites)")
    return None


def database_failure(error: BaseException) -> str:
    """The failure an import reports: the error's kind and the first line of its text
    (the error itself may not pickle from a process to another)."""
    text = str(error).strip().splitlines()
    return f"the database failed ({type(error).__name__}: {text[0] if text else ''})"


def run_in_processes(settings: Settings, path: str, actor: str, jobs: int) -> Report:
    """The file applied by ``jobs`` processes (see the module's docstring), each with its
    own connections; its report is theirs together. A process whose database fails stops
    there (its transaction is not written); the others go on."""
    # Forked before this process opens any connection: each child makes its own. Its
    # modules frozen first (see infrastructure.heap): the children share them untouched by
    # their collections, and this process's own exit no longer scans them (0.2 s of the
    # import's wall time before, 0.02 s after).
    freeze_startup()
    pool = ProcessPoolExecutor(jobs, mp_context=get_context("fork"),
                               initializer=signal.signal,
                               initargs=(signal.SIGINT, signal.SIG_IGN))
    try:
        parts = list(pool.map(run_file, repeat(settings), repeat(path), repeat(actor),
                              range(jobs), repeat(jobs)))
    except BrokenProcessPool as e:  # one was killed (out of memory, a signal)
        return Report(failed=f"a process of the import was stopped ({e})")
    except KeyboardInterrupt:
        # Ctrl-C reaches every process of the terminal's group: the children ignore it
        # (each printed a traceback) and are stopped here, their transactions rolled back.
        for process in getattr(pool, "_processes", {}).values():
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        pool.shutdown()  # (done already when interrupted)
    report = Report()
    for part in parts:
        report.add(part)
    report.refused.sort()
    return report


def run_file(settings: Settings, path: str, actor: str, part: int = 0,
             parts: int = 1) -> Report:
    """The file's lines (those of process ``part`` of ``parts``), applied with this
    process's own connections; a database failure is the report's, not raised."""
    from infrastructure.store.bootstrap import bootstrap

    t = None
    try:
        t = bootstrap(settings)  # migrated first on SQLite only, as every command does
        freeze_startup()  # the process's own application, kept until it ends
        with open(path, "rb") as file:
            return run(t, capped_lines(file), actor, part, parts)
    except DATABASE_ERRORS as e:
        return Report(failed=database_failure(e))
    finally:
        if t is not None:
            t.close()


def _intent(line: bytes, actor: str, envelope_load: Load,
            schemas: dict[str, Load]) -> Intent | str:
    """The line's command, or why it is refused before it reaches the bus."""
    if isinstance(line, _TooLong):
        return (f"body_too_large: the line is longer than {MAX_LINE // 2**20} MiB (the "
                "API takes no larger body)")
    try:
        raw = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        hint = (" (each command is one JSON object on one line)"
                if e.msg == "unexpected end of data" else "")
        return f"malformed_json: {json_fault(e, 'line')}{hint}"
    if not isinstance(raw, dict):
        return "validation_failed: body: must be a JSON object"
    try:
        envelope = envelope_load(raw)
    except ValidationError as e:
        return _refusal(flatten(e.messages))
    try:
        data = schemas[envelope["type"]](envelope["data"])
    except ValidationError as e:
        return _refusal(flatten(e.messages, "data"))
    command_type = COMMAND_TYPES[envelope["type"]]
    if command_type in SIGNING_COMMANDS:
        return (f"forbidden: {envelope['type']} needs a person's own session and password; "
                "it can't be imported")
    return Intent(command_type(envelope["participant_id"], data), envelope["command_id"],
                  actor, envelope.get("reason"), envelope.get("expected_version"))
