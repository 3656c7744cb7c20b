"""POST /v1/commands and /v1/commands/batch: validate, authorise, dispatch."""

from __future__ import annotations

import logging
from typing import Any

from flask import Response, g, jsonify, request
from flask_smorest import Blueprint
from marshmallow import Schema, ValidationError

from domain.commands import COMMAND_TYPES
from domain.errors import DomainError
from domain.protocol import Protocol
from infrastructure.api.errors import (
    UNAVAILABLE,
    ApiError,
    error_response,
    forbidden,
    from_domain,
    invalid,
)
from infrastructure.api.schemas import (
    BatchAnswer,
    CommandAnswer,
    CommandBatch,
    CommandEnvelope,
    ErrorBody,
)
from infrastructure.store.outages import DATABASE_ERRORS, is_unavailable
from infrastructure.store.schemas import data_schemas, flatten

log = logging.getLogger("trialog.commands")
blp = Blueprint("commands", __name__, url_prefix="/v1/commands",
                description="Commands: every fact about a participant, as events")
ERRORS = {400: "malformed JSON", 401: "no or bad token", 403: "role may not issue this",
          404: "unknown participant", 409: "refused by a rule of the protocol",
          422: "a field breaks its rule"}


def _body(schema: str) -> dict[str, Any]:
    return {"required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/"
                                                                f"{schema}"}}}}


_SCHEMAS: dict[int, dict[str, Schema]] = {}


def _schemas(protocol: Protocol) -> dict[str, Schema]:
    if id(protocol) not in _SCHEMAS:
        _SCHEMAS[id(protocol)] = {n: s() for n, s in data_schemas(protocol).items()}
    return _SCHEMAS[id(protocol)]


def _json_body() -> Any:
    body = request.get_json(silent=True)
    if body is None:
        raise ApiError(400, "malformed_json", "the body must be a JSON object")
    return body


def _validation(messages: Any, prefix: str = "") -> ApiError:
    return invalid(flatten(messages, prefix))


def execute(raw: Any) -> tuple[int, dict[str, Any]]:
    """One command, from its JSON body to the contract's answer (status, body)."""
    from infrastructure.api import runtime

    if not isinstance(raw, dict):
        raise _validation({"body": ["must be a JSON object"]})
    try:
        envelope = CommandEnvelope().load(raw)
    except ValidationError as e:
        raise _validation(e.messages) from None
    g.command_id, g.participant_id = envelope["command_id"], envelope["participant_id"]
    principal = g.principal
    if not principal.may_issue(envelope["type"]):
        raise forbidden(principal.name, principal.role, f"issue {envelope['type']}")
    trialog = runtime().trialog
    try:
        data = _schemas(trialog.protocol)[envelope["type"]].load(envelope["data"])
    except ValidationError as e:
        raise _validation(e.messages, "data") from None
    command = COMMAND_TYPES[envelope["type"]](envelope["participant_id"], data)
    try:
        accepted = trialog.bus.dispatch(
            command, command_id=envelope["command_id"], actor=principal.name,
            reason=envelope.get("reason"), expected_version=envelope.get("expected_version"),
        )
    except DomainError as e:
        raise from_domain(e) from None
    if not accepted.replayed:
        runtime().nudge()
    g.position = max(g.get("position") or 0, accepted.body.get("position") or 0) or None
    log.info("command", extra={"command_id": envelope["command_id"],
                               "participant_id": envelope["participant_id"],
                               "type": envelope["type"], "actor": principal.name,
                               "replayed": accepted.replayed})
    return (200 if accepted.replayed else 201), accepted.body


@blp.route("", methods=["POST"])
@blp.doc(requestBody=_body("Command"))
@blp.response(201, CommandAnswer, description="accepted: the events written")
@blp.alt_response(200, schema=CommandAnswer, description="the same command again: "
                                                         "nothing written")
@blp.alt_response(400, schema=ErrorBody, description=ERRORS[400])
@blp.alt_response(401, schema=ErrorBody, description=ERRORS[401])
@blp.alt_response(403, schema=ErrorBody, description=ERRORS[403])
@blp.alt_response(404, schema=ErrorBody, description=ERRORS[404])
@blp.alt_response(409, schema=ErrorBody, description=ERRORS[409])
@blp.alt_response(422, schema=ErrorBody, description=ERRORS[422])
def post_command() -> Response:
    """Issue one command."""
    status, body = execute(_json_body())
    return error_response(status, body)


@blp.route("/batch", methods=["POST"])
@blp.doc(requestBody=_body("CommandBatch"))
@blp.response(200, BatchAnswer, description="one result per command, in order")
@blp.alt_response(400, schema=ErrorBody, description=ERRORS[400])
@blp.alt_response(401, schema=ErrorBody, description=ERRORS[401])
@blp.alt_response(422, schema=ErrorBody, description=ERRORS[422])
def post_batch() -> Response:
    """Issue commands in order, each in its own transaction."""
    raw = _json_body()
    try:
        batch = CommandBatch().load(raw if isinstance(raw, dict) else {})
    except ValidationError as e:
        raise _validation(e.messages) from None
    results = []
    for command in batch["commands"]:
        try:
            status, body = execute(command)
        except ApiError as e:
            status, body = e.status, e.body
        except DATABASE_ERRORS as e:
            if not is_unavailable(e):
                raise
            # This command was not stored; those before it were, and are answered.
            status, body = 503, dict(UNAVAILABLE)
        results.append({"status": status, "body": body})
    g.command_id = None
    return jsonify({"results": results})

