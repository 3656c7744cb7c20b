"""marshmallow schemas of the HTTP API: the answers and the error body, and the OpenAPI
document of every command type (the command envelope and their ``data`` schemas are the
store's, in ``infrastructure.store.schemas``, which `trialog import` loads without the
web stack)."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, pre_load, validate

from domain.commands import TRIAL_COMMANDS
from domain.protocol import Protocol
from infrastructure.store.schemas import CommandEnvelope, UUIDString, data_schemas, text


class Parameters(Schema):
    """A query string's arguments, each given once: a second value was dropped unseen
    (`?status=open&status=closed` answered the open queries alone, as if the list were
    whole), as a misspelt name would be."""

    @pre_load
    def given_once(self, data: Any, **kwargs: Any) -> Any:
        values = getattr(data, "getlist", None)
        if values is None:
            return data
        lists = getattr(data, "multiple_keys", ())
        known = {field.data_key or name for name, field in self.fields.items()}
        repeated = {name: [f"given {count} times: give one value"] for name in data
                    if name in known and name not in lists
                    and (count := len(values(name))) > 1}
        if repeated:  # named with the unknown ones, which the load would have named
            raise ValidationError({**repeated, **{name: [self.error_messages["unknown"]]
                                                  for name in data if name not in known}})
        return data


class TrialCommand(Schema):
    command_id = UUIDString(required=True)
    type = fields.String(required=True, validate=validate.OneOf(TRIAL_COMMANDS))
    reason = text(1, 2000, allow_none=True,
                  metadata={"description": "why the database is locked or unlocked "
                                           "(required)"})


class TrialAnswer(Schema):
    command_id = fields.String(required=True)
    study_id = fields.String(required=True)
    version = fields.Integer(required=True)
    position = fields.Integer(required=True)
    events = fields.List(fields.Dict(), required=True)


MAX_BATCH = 1000  # commands in one batch


class CommandBatch(Schema):
    # Each entry is checked as its command (a result of its own: one that is no object
    # does not stop the others); the list as a whole only for its length.
    commands = fields.List(fields.Raw(allow_none=True), required=True,
                           validate=validate.Length(min=1, max=MAX_BATCH))


class EventSummary(Schema):
    type = fields.String(required=True)
    version = fields.Integer(required=True)
    recorded_at = fields.String(required=True)


class CommandAnswer(Schema):
    command_id = fields.String(required=True)
    participant_id = fields.String(required=True)
    version = fields.Integer(required=True)
    position = fields.Integer(required=True, allow_none=True, metadata={
        "description": "the log position of the last event written; null when the command "
                       "wrote none (a deviation already flagged), and then null again when "
                       "the command is sent again"})
    events = fields.List(fields.Nested(EventSummary), required=True)
    eligible = fields.Boolean(metadata={
        "description": "ScreenParticipant: whether the person met every criterion"})
    failed_criteria = fields.List(fields.String(), metadata={
        "description": "ScreenParticipant: the criteria not met (empty when eligible)"})
    arm = fields.String(metadata={"description": "RandomizeParticipant: the arm drawn"})


class BatchResult(Schema):
    status = fields.Integer(required=True, metadata={
        "description": "as POST /v1/commands would answer this command: 201 written, 200 "
                       "the same command again, 4xx refused (nothing of it written), 500 a "
                       "fault of the server on this command alone (nothing of it written)"})
    body = fields.Dict(required=True, metadata={
        "description": "a Command answer for 200 and 201, an error body otherwise"})


class BatchAnswer(Schema):
    results = fields.List(fields.Nested(BatchResult), required=True)


class ErrorBody(Schema):
    error = fields.String(required=True)
    message = fields.String(required=True)
    fields_ = fields.Dict(data_key="fields", keys=fields.String(),
                          values=fields.List(fields.String()))
    failed_criteria = fields.List(fields.String())
    expected_version = fields.Integer()
    actual_version = fields.Integer()
    status = fields.String(metadata={
        "description": "the state a refused transition started from (invalid_transition)"})


def document_commands(spec: Any, protocol: Protocol) -> None:
    """Adds to the OpenAPI document one envelope per command type, each with its own
    ``data`` schema, and ``Command`` as the choice between them by ``type``."""
    spec.components.schema("CommandEnvelope", schema=CommandEnvelope)
    envelope = spec.components.schemas["CommandEnvelope"]
    choices = []
    for name, data_schema in data_schemas(protocol).items():
        spec.components.schema(f"{name}Data", schema=data_schema)
        properties = {**envelope["properties"],
                      "type": {"type": "string", "enum": [name]},
                      "data": {"$ref": f"#/components/schemas/{name}Data"}}
        spec.components.schema(f"{name}Command", {
            "type": "object", "properties": properties,
            "required": envelope["required"], "additionalProperties": False})
        choices.append({"$ref": f"#/components/schemas/{name}Command"})
    spec.components.schema("Command", {"oneOf": choices,
                                       "discriminator": {"propertyName": "type"}})
    spec.components.schema("CommandBatch", {
        "type": "object", "required": ["commands"], "additionalProperties": False,
        "properties": {"commands": {"type": "array", "minItems": 1, "maxItems": 1000,
                                    "items": {"$ref": "#/components/schemas/Command"}}}})
    spec.components.schema("TrialCommand", schema=TrialCommand)
