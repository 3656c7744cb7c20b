"""The rule a correction's new value must pass: that of the field it corrects.

A ``CorrectData`` names a captured event and a dotted path inside its data. The new value is
loaded by the same marshmallow field that loaded the original command's value (type, range,
choices, date, e-mail shape, no control characters), and the corrected record must still
pass the rules that tie fields together (one receptor status given). Every error is on
``data.value``.
"""

from __future__ import annotations

import copy
from datetime import date, datetime
from typing import Any

from marshmallow import Schema, ValidationError, fields

from domain.errors import ValidationFailed
from domain.participant import CAPTURED_BY, place
from domain.protocol import Protocol
from infrastructure.store.schemas import data_schemas, flatten


def as_json(value: Any) -> Any:
    """Recorded data as the JSON a command carried (dates as ISO text)."""
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_json(v) for v in value]
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    return value


def field_at(schema: Schema, path: str) -> fields.Field | None:
    """The marshmallow field a dotted path names in a command's data; None if undefined."""
    field: fields.Field | None = None
    current: Schema | None = schema
    for key in path.split("."):
        if current is None:
            return None
        field = current.fields.get(key)
        if field is None:
            return None
        current = field.schema if isinstance(field, fields.Nested) else None
    return field


# The refusal of a correction naming no field of its event's command (the contract names
# `data.value` for it; the console marks the field typed, finding it by these words).
NOT_A_FIELD = "is not a field of"


class CorrectionRules:
    """Validates corrections against the data schemas of one protocol."""

    def __init__(self, protocol: Protocol) -> None:
        self.schemas = {name: schema() for name, schema in data_schemas(protocol).items()}

    def defines(self, event_type: str, path: str) -> bool:
        """Whether ``path`` names a field of the data of ``event_type``'s command (a
        query may ask about one a record left out)."""
        command = CAPTURED_BY.get(event_type)
        schema = self.schemas.get(command) if command else None
        return schema is not None and field_at(schema, path) is not None

    def __call__(self, event_type: str, path: str, value: Any, recorded: Any) -> Any:
        command = CAPTURED_BY.get(event_type)
        schema = self.schemas[command] if command else None
        field = field_at(schema, path) if schema is not None else None
        if schema is None or field is None:
            raise ValidationFailed({"data.value": [
                f"{path!r} {NOT_A_FIELD} {command or event_type}"]})
        # null for a field the command may leave out takes the answer back (an item
        # answered by mistake); a required field can't be emptied.
        removes = value is None and not field.required and not field.allow_none
        try:
            loaded = None if removes else field.deserialize(value)
        except ValidationError as e:
            raise ValidationFailed({"data.value": _messages(e.messages, path)}) from None
        self._check_record(schema, path, value, recorded, removes)
        return loaded

    @staticmethod
    def _check_record(schema: Schema, path: str, value: Any, recorded: Any,
                      removes: bool) -> None:
        """The rules across fields, for the record as corrected; an error the record
        already had (a field added to the schema since) is not the correction's."""
        before = as_json(recorded)
        after = copy.deepcopy(before)
        place(after, path, value)
        if removes:  # checked as the command would send it: without the field
            *parents, last = path.split(".")
            node = after
            for key in parents:
                node = node[key]
            del node[last]
        new = set(_errors(schema, after).items()) - set(_errors(schema, before).items())
        if new:
            raise ValidationFailed({"data.value": [f"{p}: {m}" for p, m in sorted(new)]})


def _errors(schema: Schema, data: Any) -> dict[str, str]:
    try:
        schema.load(data)
    except ValidationError as e:
        return {path: "; ".join(messages) for path, messages in flatten(e.messages).items()}
    return {}


def _messages(messages: Any, field: str) -> list[str]:
    """A corrected value's refusals, each naming the field (its dotted path) it is for."""
    return [f"{path}: {'; '.join(m)}" for path, m in flatten(messages, field).items()]
