"""POST /v1/commands and /v1/commands/batch: validate, authorise, dispatch."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from flask import Response, g, jsonify, request
from flask_smorest import Blueprint
from marshmallow import ValidationError

from domain.commands import COMMAND_TYPES, SIGNING_COMMANDS
from domain.errors import DomainError
from domain.protocol import Protocol
from infrastructure.api.bodies import TOO_LARGE, json_body
from infrastructure.api.errors import (
    INTERNAL_ERROR,
    ApiError,
    error_response,
    forbidden,
    from_domain,
    invalid,
    unreadable,
)
from infrastructure.api.schemas import (
    BatchAnswer,
    CommandAnswer,
    CommandBatch,
    CommandEnvelope,
    ErrorBody,
    TrialAnswer,
    TrialCommand,
)
from infrastructure.logs import fault_trace
from infrastructure.store.bus import Accepted, Intent
from infrastructure.store.loaders import Load, data_loaders, loader
from infrastructure.store.schemas import flatten
from infrastructure.store.stored import UnreadableRecord

log = logging.getLogger("trialog.commands")
blp = Blueprint("commands", __name__, url_prefix="/v1/commands",
                description="Commands: every fact about a participant, as events")
ERRORS = {400: "malformed JSON", 401: "no or bad token", 403: "role may not issue this",
          413: TOO_LARGE,
          404: "unknown participant", 409: "refused by a rule of the protocol",
          422: "a field breaks its rule",
          503: "the database can't be reached: send it again (the same command_id)"}


def _body(schema: str) -> dict[str, Any]:
    return {"required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/"
                                                                f"{schema}"}}}}


_LOADERS: dict[int, dict[str, Load]] = {}
_ENVELOPE = loader(CommandEnvelope())  # a schema's load keeps no state: one for every request


def _loaders(protocol: Protocol) -> dict[str, Load]:
    if id(protocol) not in _LOADERS:
        _LOADERS[id(protocol)] = data_loaders(protocol)
    return _LOADERS[id(protocol)]


def _validation(messages: Any, prefix: str = "") -> ApiError:
    return invalid(flatten(messages, prefix))


def execute(raw: Any) -> tuple[int, dict[str, Any]]:
    """One command, from its JSON body to the contract's answer (status, body)."""
    from infrastructure.api import runtime

    intent = _intent(raw)
    try:
        accepted = runtime().trialog.bus.dispatch(
            intent.command, command_id=intent.command_id, actor=intent.actor,
            reason=intent.reason, expected_version=intent.expected_version,
            scope=intent.scope)
    except DomainError as e:
        raise from_domain(e) from None
    return _answered(intent, accepted)


def _object(raw: Any) -> dict[str, Any]:
    """A body (or a batch's entry) that is a JSON object; else the 422 that says so."""
    if not isinstance(raw, dict):
        raise _validation({"body": ["must be a JSON object"]})
    return raw


def _intent(raw: Any) -> Intent:
    """The command a JSON body asks for, checked: its fields, and the caller's right to
    issue it (a signature: the signer's password again)."""
    from infrastructure.api import runtime

    _object(raw)
    try:
        envelope = _ENVELOPE(raw)
    except ValidationError as e:
        raise _validation(e.messages) from None
    g.command_id, g.participant_id = envelope["command_id"], envelope["participant_id"]
    principal = g.principal
    if not principal.may_issue(envelope["type"]):
        raise forbidden(principal.name, principal.role, f"issue {envelope['type']}")
    trialog = runtime().trialog
    try:
        data = _loaders(trialog.protocol)[envelope["type"]](envelope["data"])
    except ValidationError as e:
        raise _validation(e.messages, "data") from None
    if COMMAND_TYPES[envelope["type"]] in SIGNING_COMMANDS:
        data = _signer(trialog, data)
    return Intent(COMMAND_TYPES[envelope["type"]](envelope["participant_id"], data),
                  envelope["command_id"], principal.name, envelope.get("reason"),
                  envelope.get("expected_version"), principal.scope)


def _answered(intent: Intent, accepted: Accepted) -> tuple[int, dict[str, Any]]:
    from infrastructure.api import runtime

    if not accepted.replayed:
        runtime().nudge()
    g.position = max(g.get("position") or 0, accepted.body.get("position") or 0) or None
    log.info("command", extra={"command_id": intent.command_id,
                               "participant_id": intent.command.participant_id,
                               "type": intent.command.type_name(), "actor": intent.actor,
                               "replayed": accepted.replayed})
    return (200 if accepted.replayed else 201), accepted.body


def _signer(trialog: Any, data: dict[str, Any]) -> dict[str, Any]:
    """A signature is a person's own act: only from their session, with their password
    again (checked, then dropped: it is never stored, logged or echoed). The data gains
    the signer's login and printed name."""
    from infrastructure.store.people import AccountLocked, LoginFailed, reauthenticate

    principal = g.principal
    if not principal.person:
        raise ApiError(403, "forbidden", f"token {principal.name!r} is a machine token: a "
                                         "signature needs a person's own session")
    password = data.pop("password")
    try:
        printed_name = reauthenticate(trialog.engine, principal.name, password,
                                      request.remote_addr)
    except LoginFailed:
        raise ApiError(401, "reauthentication_failed",
                       "the password is not the signer's current password") from None
    except AccountLocked as e:  # as sign-in answers it, with when to try again
        seconds = max(1, int((e.until - datetime.now(UTC)).total_seconds()))
        raise ApiError(423, "account_locked", f"too many wrong passwords: locked until "
                                              f"{e.until.isoformat(timespec='seconds')}",
                       headers={"Retry-After": str(seconds)}) from None
    return {**data, "signer": principal.name, "printed_name": printed_name}


@blp.route("", methods=["POST"])
@blp.doc(requestBody=_body("Command"))
@blp.response(201, CommandAnswer, description="accepted: the events written")
@blp.alt_response(200, schema=CommandAnswer, description="the same command again: "
                                                         "nothing written")
@blp.alt_response(400, schema=ErrorBody, description=ERRORS[400])
@blp.alt_response(413, schema=ErrorBody, description=ERRORS[413])
@blp.alt_response(401, schema=ErrorBody, description=ERRORS[401])
@blp.alt_response(403, schema=ErrorBody, description=ERRORS[403])
@blp.alt_response(404, schema=ErrorBody, description=ERRORS[404])
@blp.alt_response(409, schema=ErrorBody, description=ERRORS[409])
@blp.alt_response(422, schema=ErrorBody, description=ERRORS[422])
@blp.alt_response(503, schema=ErrorBody, description=ERRORS[503])
def post_command() -> Response:
    """Issue one command."""
    status, body = execute(json_body())
    return error_response(status, body)


@blp.route("/batch", methods=["POST"])
@blp.doc(requestBody=_body("CommandBatch"))
@blp.response(200, BatchAnswer, description="one result per command, in order")
@blp.alt_response(400, schema=ErrorBody, description=ERRORS[400])
@blp.alt_response(413, schema=ErrorBody, description=ERRORS[413])
@blp.alt_response(401, schema=ErrorBody, description=ERRORS[401])
@blp.alt_response(409, schema=ErrorBody, description="database_locked: the database was "
                                                     "locked again and again meanwhile")
@blp.alt_response(422, schema=ErrorBody, description=ERRORS[422])
@blp.alt_response(503, schema=ErrorBody, description=ERRORS[503])
def post_batch() -> Response:
    """Issue commands in order, in one transaction: each is decided on what those before
    it decided, a refused or failed command is answered alone and the others are written
    together. If the database fails, nothing of the batch is written (503: send it
    again)."""
    from infrastructure.api import runtime

    raw = json_body()
    try:
        batch = CommandBatch().load(_object(raw))
    except ValidationError as e:
        raise _validation(e.messages) from None
    results: list[dict[str, Any] | None] = []
    intents: list[tuple[int, Intent]] = []
    for command in batch["commands"]:
        try:
            intents.append((len(results), _intent(command)))
            results.append(None)
        except ApiError as e:
            results.append({"status": e.status, "body": e.body})
    try:  # a database that fails writes nothing of the batch
        outcomes = runtime().trialog.bus.dispatch_all([intent for _, intent in intents])
    except DomainError as e:  # the database locked again and again meanwhile
        raise from_domain(e) from None
    for (index, intent), outcome in zip(intents, outcomes, strict=True):
        if isinstance(outcome, Accepted):
            status, body = _answered(intent, outcome)
        elif isinstance(outcome, DomainError):
            error = from_domain(outcome)
            status, body = error.status, error.body
        elif isinstance(outcome, UnreadableRecord):  # the participant's, not the server's
            log.error("record unreadable", extra={
                "command_id": intent.command_id, "error": str(outcome)})
            status, body = 500, unreadable(outcome, intent.command.participant_id)
        else:  # the server's fault, this command's alone: nothing of it was written
            log.error("command failed", extra={
                "command_id": intent.command_id,
                "participant_id": intent.command.participant_id,
                "type": intent.command.type_name(), "actor": intent.actor,
                "error": fault_trace(outcome)})
            status, body = 500, dict(INTERNAL_ERROR)
        results[index] = {"status": status, "body": body}
    g.command_id = None
    return jsonify({"results": results})



trial_blp = Blueprint("trial_commands", __name__, url_prefix="/v1/trial/commands",
                      description="Commands on the whole trial: the database lock")


@trial_blp.route("", methods=["POST"])
@trial_blp.doc(requestBody=_body("TrialCommand"))
@trial_blp.response(201, TrialAnswer, description="accepted: the event written")
@trial_blp.alt_response(200, schema=TrialAnswer, description="the same command again")
@trial_blp.alt_response(400, schema=ErrorBody, description=ERRORS[400])
@trial_blp.alt_response(413, schema=ErrorBody, description=ERRORS[413])
@trial_blp.alt_response(401, schema=ErrorBody, description=ERRORS[401])
@trial_blp.alt_response(403, schema=ErrorBody, description=ERRORS[403])
@trial_blp.alt_response(409, schema=ErrorBody, description=ERRORS[409])
@trial_blp.alt_response(422, schema=ErrorBody, description=ERRORS[422])
def post_trial_command() -> Response:
    """LockDatabase or UnlockDatabase (data_manager, admin; every site)."""
    from infrastructure.api import runtime

    raw = json_body()
    try:
        command = TrialCommand().load(_object(raw))
    except ValidationError as e:
        raise _validation(e.messages) from None
    g.command_id = command["command_id"]
    principal = g.principal
    if not principal.may_issue(command["type"]):
        raise forbidden(principal.name, principal.role, f"issue {command['type']}")
    if not principal.scope.every_site:
        raise ApiError(403, "forbidden", f"{command['type']} acts on every site: "
                                         f"{principal.name!r} sees only some")
    try:
        accepted = runtime().trialog.bus.dispatch_trial(
            command["type"], command_id=command["command_id"], actor=principal.name,
            reason=command.get("reason"))
    except DomainError as e:
        raise from_domain(e) from None
    if not accepted.replayed:
        runtime().nudge()
    g.position = accepted.body["position"]
    log.info("command", extra={"command_id": command["command_id"], "type": command["type"],
                               "actor": principal.name, "replayed": accepted.replayed})
    return error_response(200 if accepted.replayed else 201, accepted.body)
