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
be alone.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import repeat
from multiprocessing import get_context

import orjson
from marshmallow import ValidationError

from domain.commands import COMMAND_TYPES, SIGNING_COMMANDS
from domain.errors import DomainError
from domain.protocol import Protocol
from infrastructure.logs import fault_at
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.bus import Accepted, Intent
from infrastructure.store.loaders import Load, data_loaders, loader
from infrastructure.store.outages import DATABASE_ERRORS
from infrastructure.store.schemas import CommandEnvelope, flatten
from infrastructure.store.settings import Settings

CHUNK = 500  # commands per transaction


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


def _chunks(lines: Iterable[bytes], part: int, belongs: Callable[[bytes], int] | None
            ) -> Iterator[list[tuple[int, bytes]]]:
    """The lines of process ``part`` (every line when there is one process: no
    ``belongs``), CHUNK at a time, with their numbers in the file."""
    chunk: list[tuple[int, bytes]] = []
    for number, line in enumerate(lines, 1):
        if line.strip() and (belongs is None or belongs(line) == part):
            chunk.append((number, line))
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def part_of(protocol: Protocol, parts: int) -> Callable[[bytes], int]:
    """Which of ``parts`` processes applies a line: its participant's site's (the sites
    taken in turn), else one chosen by its participant id, else the first."""
    prefixes = [(site.participant_prefix, index) for index, site in enumerate(protocol.sites)]

    def part(line: bytes) -> int:
        try:
            participant_id = orjson.loads(line).get("participant_id")
        except (orjson.JSONDecodeError, AttributeError):  # not JSON, not an object
            return 0
        if not isinstance(participant_id, str):
            return 0
        for prefix, index in prefixes:
            if participant_id.startswith(prefix):
                return index % parts
        return zlib.crc32(participant_id.encode()) % parts

    return part


def run(t: Trialog, lines: Iterable[bytes], actor: str, part: int = 0,
        parts: int = 1) -> Report:
    """Applies the lines (those of process ``part`` of ``parts``: see part_of)."""
    report = Report()
    envelope = loader(CommandEnvelope())
    schemas = data_loaders(t.protocol)
    belongs = part_of(t.protocol, parts) if parts > 1 else None
    for chunk in _chunks(lines, part, belongs):
        intents: list[tuple[int, Intent]] = []
        for number, line in chunk:
            intent = _intent(line, actor, envelope, schemas)
            if isinstance(intent, str):
                report.refused.append((number, intent))
            else:
                intents.append((number, intent))
        outcomes = t.bus.dispatch_all([intent for _, intent in intents])
        for (number, _), outcome in zip(intents, outcomes, strict=True):
            if isinstance(outcome, DomainError):
                report.refused.append((number, f"{outcome.code}: {outcome.message}"))
            elif not isinstance(outcome, Accepted):  # a fault of this line's alone
                report.refused.append((number, _failure(outcome)))
            elif outcome.replayed:
                report.repeated += 1
            else:
                report.accepted += 1
    report.refused.sort()
    return report


def _failure(error: Exception) -> str:
    """A command that failed otherwise than by a rule (a fault of the program): its kind
    and where (see fault_at); nothing of it was written."""
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
    # Forked before this process opens any connection: each child makes its own.
    try:
        with ProcessPoolExecutor(jobs, mp_context=get_context("fork")) as pool:
            parts = list(pool.map(run_file, repeat(settings), repeat(path), repeat(actor),
                                  range(jobs), repeat(jobs)))
    except BrokenProcessPool as e:  # one was killed (out of memory, a signal)
        return Report(failed=f"a process of the import was stopped ({e})")
    report = Report()
    for part in parts:
        report.add(part)
    report.refused.sort()
    return report


def run_file(settings: Settings, path: str, actor: str, part: int = 0,
             parts: int = 1) -> Report:
    """The file's lines (those of process ``part`` of ``parts``), applied with this
    process's own connections; a database failure is the report's, not raised."""
    from infrastructure.heap import freeze_startup
    from infrastructure.store.bootstrap import bootstrap

    t = None
    try:
        t = bootstrap(settings)  # migrated first on SQLite only, as every command does
        freeze_startup()  # the process's own application, kept until it ends
        with open(path, "rb") as lines:
            return run(t, lines, actor, part, parts)
    except DATABASE_ERRORS as e:
        return Report(failed=database_failure(e))
    finally:
        if t is not None:
            t.close()


def _malformed(error: orjson.JSONDecodeError) -> str:
    """Why a line is not JSON, and where in the line (the decoder's own line and column
    count from the start of the line it was given, not from the file's)."""
    if error.msg.startswith("str is not valid UTF-8"):
        return "malformed_json: the line is not valid UTF-8"
    if error.msg == "unexpected end of data":
        return ("malformed_json: the line ends before its JSON value does (each command "
                "is one JSON object on one line)")
    return f"malformed_json: {error.msg} at character {error.pos + 1} of the line"


def _intent(line: bytes, actor: str, envelope_load: Load,
            schemas: dict[str, Load]) -> Intent | str:
    """The line's command, or why it is refused before it reaches the bus."""
    try:
        raw = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        return _malformed(e)
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
