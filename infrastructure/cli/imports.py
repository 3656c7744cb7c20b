"""`trialog import FILE`: NDJSON commands, one command body a line as POST /v1/commands
takes it, applied in order under the same rules, many per transaction. A refused command
leaves no trace and is reported with its line number; running the file
again writes nothing new (command ids)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import orjson
from marshmallow import ValidationError

from domain.commands import COMMAND_TYPES, SIGNING_COMMANDS
from domain.errors import DomainError
from infrastructure.api.schemas import CommandEnvelope
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.bus import Accepted, Intent
from infrastructure.store.loaders import Load, data_loaders, loader
from infrastructure.store.schemas import flatten

CHUNK = 500  # commands per transaction


@dataclass
class Report:
    accepted: int = 0
    repeated: int = 0
    refused: list[tuple[int, str]] = field(default_factory=list)


def _refusal(fields: dict[str, list[str]]) -> str:
    return "validation_failed: " + "; ".join(f"{k}: {v[0]}" for k, v in fields.items())


def _chunks(lines: Iterable[bytes]) -> Iterator[list[tuple[int, bytes]]]:
    chunk: list[tuple[int, bytes]] = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            chunk.append((number, line))
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run(t: Trialog, lines: Iterable[bytes], actor: str) -> Report:
    report = Report()
    envelope = loader(CommandEnvelope())
    schemas = data_loaders(t.protocol)
    for chunk in _chunks(lines):
        intents: list[tuple[int, Intent]] = []
        for number, line in chunk:
            intent = _intent(line, actor, envelope, schemas)
            if isinstance(intent, str):
                report.refused.append((number, intent))
            else:
                intents.append((number, intent))
        outcomes = t.bus.dispatch_all([intent for _, intent in intents], alone=False)
        for (number, _), outcome in zip(intents, outcomes, strict=True):
            if isinstance(outcome, DomainError):
                report.refused.append((number, f"{outcome.code}: {outcome.message}"))
            elif not isinstance(outcome, Accepted):
                raise outcome
            elif outcome.replayed:
                report.repeated += 1
            else:
                report.accepted += 1
    report.refused.sort()
    return report


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
