"""A marshmallow schema's ``load`` without most of marshmallow's bookkeeping, for bodies
that pass it.

A valid command's data takes a straight walk: each field's own ``deserialize`` (its type,
its ``allow_none``, its validators), nested schemas walked the same way, then the schema's
own ``validates_schema`` hooks. Anything else (a field that breaks its rule, a key the
schema doesn't know, a value of the wrong shape) is handed to the schema's own ``load``,
so an error is always marshmallow's, word for word. Loading a screening's data this way
takes about a quarter of the time (the error store, closures and per-field options that
marshmallow sets up for every value are most of a valid body's cost).

Only what the schemas here use is walked; a schema with anything else (load hooks,
``@validates`` methods, ``data_key``, ``unknown`` other than RAISE, a field or schema class
that overrides a step the walk skips, such as a List's ``_deserialize`` or a field's
``_validate``) is loaded by marshmallow alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields
from marshmallow.decorators import POST_LOAD, PRE_LOAD, VALIDATES, VALIDATES_SCHEMA
from marshmallow.error_store import ErrorStore
from marshmallow.utils import is_collection, missing

from domain.protocol import Protocol
from infrastructure.store.schemas import data_schemas

Load = Callable[[Any], Any]
_Walk = Callable[[Any], dict[str, Any]]
_FieldWalk = Callable[[Any, Any], Any]


class _NotStraight(Exception):
    """The body is not plainly valid: marshmallow's own load decides."""


def loader(schema: Schema) -> Load:
    """``schema.load``, equal in result and errors, walked straight when the body is
    valid."""
    walk = _schema_walk(schema)
    if walk is None:
        return schema.load

    def load(data: Any) -> Any:
        try:
            return walk(data)
        except (_NotStraight, ValidationError):
            return schema.load(data)

    return load


def data_loaders(protocol: Protocol) -> dict[str, Load]:
    """The load of each command type's ``data`` schema (see ``data_schemas``)."""
    return {name: loader(schema()) for name, schema in data_schemas(protocol).items()}


def _own(instance: Any, base: type, *methods: str) -> bool:
    """Whether ``instance`` uses ``base``'s own ``methods`` (a subclass that overrides one
    may refuse what the walk, which doesn't call it, would accept)."""
    return all(getattr(type(instance), m) is getattr(base, m) for m in methods)


# The methods a walked field or schema must not override: the walk bypasses them.
_FIELD_STEPS = ("deserialize", "_validate", "_validate_all", "_validate_missing")


def _schema_walk(schema: Schema) -> _Walk | None:
    if (not _own(schema, Schema, "load", "_do_load", "_deserialize",
                 "_invoke_schema_validators")
            or schema.many or schema.partial or schema.unknown != RAISE
            or schema.dict_class is not dict
            or any(schema._hooks[hook] for hook in (PRE_LOAD, POST_LOAD, VALIDATES))):
        return None
    steps: list[tuple[str, _FieldWalk]] = []
    for name, field in schema.load_fields.items():
        if field.data_key is not None or field.attribute is not None:
            return None
        step = _field_walk(field, name)
        if step is None:
            return None
        steps.append((name, step))
    names = frozenset(name for name, _ in steps)
    checks = schema._hooks[VALIDATES_SCHEMA]

    def walk(data: Any) -> dict[str, Any]:
        if type(data) is not dict or not names.issuperset(data):
            raise _NotStraight
        out: dict[str, Any] = {}
        for name, step in steps:
            value = step(data.get(name, missing), data)
            if value is not missing:
                out[name] = value
        if checks:
            errors = ErrorStore()
            for pass_collection in (True, False):
                schema._invoke_schema_validators(
                    error_store=errors, pass_collection=pass_collection, data=out,
                    original_data=data, many=False, partial=None, unknown=RAISE,
                    field_errors=False)
            if errors.errors:
                raise _NotStraight
        return out

    return walk


def _field_walk(field: fields.Field, name: str | None) -> _FieldWalk | None:
    """How one field's value is loaded: by the field itself, but for a nested schema or a
    list, whose items are walked."""
    if not _own(field, fields.Field, *_FIELD_STEPS):
        return None
    if isinstance(field, fields.Nested):
        if not _own(field, fields.Nested, "_deserialize", "_load", "_test_collection"):
            return None
        if field.many or field.only or field.exclude or field.unknown not in (None, RAISE):
            return None
        inner = _schema_walk(field.schema)
        if inner is None:
            return None
        return _present(field, name, lambda value, data: inner(value))
    if isinstance(field, fields.List):
        if not _own(field, fields.List, "_deserialize"):
            return None
        item = _field_walk(field.inner, None)
        if item is None:
            return None

        def items(value: Any, data: Any) -> list[Any]:
            if not is_collection(value):
                raise _NotStraight
            return [item(each, None) for each in value]

        return _present(field, name, items)
    convert = field._deserialize
    return _present(field, name, lambda value, data: convert(value, name, data))


def _present(field: fields.Field, name: str | None,
             convert: Callable[[Any, Any], Any]) -> _FieldWalk | None:
    """Field.deserialize's steps with ``convert`` for its conversion (a nested schema or a
    list walked, a leaf's own ``_deserialize``), and the validators called one by one
    rather than through an And built on every call: missing or null, as the field says;
    otherwise converted, then validated."""
    if field.pre_load or field.post_load:
        return None
    validators = tuple(field.validators)

    def present(value: Any, data: Any) -> Any:
        if value is missing or value is None:
            return field.deserialize(value, name, data)
        out = convert(value, data)
        for validator in validators:
            if validator(out) is False:
                raise _NotStraight
        return out

    return present
