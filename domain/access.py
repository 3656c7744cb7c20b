"""Which sites a caller may see and act on. Outside its scope a participant does not exist
for the caller: the service loads participants through this check, and every read model
query filters by it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Scope:
    """A set of site ids, or every site (``sites`` is None)."""

    sites: frozenset[str] | None = None

    @classmethod
    def of(cls, sites: Iterable[str] | None) -> Scope:
        return cls(None if sites is None else frozenset(sites))

    @property
    def every_site(self) -> bool:
        return self.sites is None

    def admits(self, site_id: str) -> bool:
        return self.sites is None or site_id in self.sites

    def as_list(self) -> list[str] | None:
        """The sites as JSON: a sorted list, or None for every site."""
        return None if self.sites is None else sorted(self.sites)


EVERY_SITE = Scope()
