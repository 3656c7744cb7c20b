"""The raw library's side of every comparison."""

from __future__ import annotations

from eventsourcing.domain import Aggregate


class Ping(Aggregate):
    """The raw library's single-event aggregate (the baseline of the command figures)."""
