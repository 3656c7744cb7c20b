"""The hash chain: every event's digest covers its content and the previous event's digest,
so an edited, deleted, reordered or inserted stored event breaks the chain of its stream."""

from __future__ import annotations

import hashlib
import json
from dataclasses import field
from datetime import date, datetime
from typing import Any
from uuid import UUID

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


def canonical_json(content: dict[str, Any]) -> str:
    """Sorted keys, no spaces, ASCII; dates, datetimes and UUIDs as ISO and dashed text."""
    return _CANONICAL.encode(content)


def compute_digest(event: object) -> str:
    """SHA-256 over the event's topic and every attribute but its own digest."""
    content = {k: v for k, v in vars(event).items() if k != "digest"}
    content["topic"] = get_topic(type(event))
    return hashlib.sha256(canonical_json(content).encode()).hexdigest()


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
