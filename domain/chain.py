"""The hash chain: every event's digest covers its content and the previous event's digest,
so an edited, deleted, reordered or inserted stored event breaks the chain of its stream."""

from __future__ import annotations

import hashlib
import json
from dataclasses import field
from datetime import date, datetime
from typing import Any
from uuid import UUID

import orjson
from eventsourcing.domain import Aggregate
from eventsourcing.utils import get_topic

GENESIS = ""


def _scalar(value: Any) -> str:
    """The JSON text of the values JSON has no type for."""
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} can't be part of a digest")


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=_scalar)

# The canonical text is json's (above): every digest recorded so far was taken over it, so
# it can never change by a byte. orjson writes the same text several times faster for most
# contents, but not for all: some floats (1e-05 as 0.00001; NaN), a character past ASCII
# (json escapes it), DEL (json escapes it too), and any type it knows and json does not (an
# enum, a dataclass, a subclass). So orjson writes only contents made of the types below
# and of floats it writes as json does, and its text is kept only if it is ASCII without
# DEL; anything else is json's.
LEAVES: frozenset[type] = frozenset({str, int, bool, type(None), date, datetime, UUID})
# Dates and datetimes go to ``default`` (json's text of them is its call); nothing else
# but plain types reaches orjson (``_plain``).
_ORJSON = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME


def _plain(value: Any, leaves: frozenset[type]) -> bool:
    """Whether ``value`` holds only string-keyed dicts, lists, tuples, ``leaves`` and
    floats orjson writes as json does."""
    kind = type(value)
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or not _plain(item, leaves):
                return False
        return True
    if kind is list or kind is tuple:
        for item in value:
            if not _plain(item, leaves):
                return False
        return True
    if kind is float:
        return orjson.dumps(value) == float.__repr__(value).encode()
    return kind in leaves


def canonical_bytes(content: dict[str, Any], default: Any = _scalar,
                    leaves: frozenset[type] = LEAVES) -> bytes:
    """``content`` as json writes it with sorted keys, no spaces, ASCII and ``default`` for
    what JSON has no type for, byte for byte: by orjson where that is the same text, when
    ``content`` is made of ``leaves`` in dicts, lists and tuples. ``leaves`` is a subset of
    LEAVES: JSON's own types and those of them ``default`` writes as ``_scalar`` does."""
    try:
        plain = _plain(content, leaves)
    except RecursionError:  # nested past the walk's depth: json's own limit decides
        plain = False
    if plain:
        try:
            fast = orjson.dumps(content, default=default, option=_ORJSON)
        except orjson.JSONEncodeError:  # an integer past 64 bits, a value default refuses
            pass
        else:
            if fast.isascii() and b"\x7f" not in fast:
                return fast
    if default is _scalar:
        return _CANONICAL.encode(content).encode()
    return json.dumps(content, sort_keys=True, separators=(",", ":"),
                      default=default).encode()


def canonical_json(content: dict[str, Any]) -> str:
    """Sorted keys, no spaces, ASCII; dates, datetimes and UUIDs as ISO and dashed text."""
    return canonical_bytes(content).decode()


def compute_digest(event: object) -> str:
    """SHA-256 over the event's topic and every attribute but its own digest."""
    content = {k: v for k, v in vars(event).items() if k != "digest"}
    content["topic"] = get_topic(type(event))
    return hashlib.sha256(canonical_bytes(content)).hexdigest()


class ChainedAggregate(Aggregate):
    """An aggregate whose events carry audit fields and are chained by digest."""

    # Not annotated: annotations on an aggregate class become constructor fields.
    chain_head = GENESIS

    class Event(Aggregate.Event):
        command_id: str = field(kw_only=True)
        actor: str = field(kw_only=True)
        reason: str | None = field(kw_only=True, default=None)
        previous_digest: str = field(kw_only=True, default=GENESIS)
        digest: str = field(kw_only=True, default="")

        def __post_init__(self) -> None:
            super().__post_init__()
            if not self.digest:
                object.__setattr__(self, "digest", compute_digest(self))

        @property
        def recorded_at(self) -> datetime:
            return self.timestamp

        def mutate(self, aggregate: Any) -> Any:
            aggregate = super().mutate(aggregate)
            aggregate.chain_head = self.digest
            return aggregate

    class Created(Event, Aggregate.Created):
        pass

    def trigger_event(self, event_class: type[Any], **kwargs: Any) -> None:
        super().trigger_event(event_class, previous_digest=self.chain_head, **kwargs)
