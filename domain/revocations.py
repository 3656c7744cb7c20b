"""The trial's register of access: each access granted (a machine token made, a person
given a login, each with a role and sites), and who may no longer call, for good: machine
tokens revoked and people disabled, and each change of a person's password (after which
no earlier password of theirs is taken). The access tables hold a copy (a row's ``revoked_at``,
``disabled_at``, ``password_set``),
and a copy in a database can be put back as it was, seal and all, by someone with write
access to it; the register's events can't be taken back unseen (the hash chain, and the
commands' records beside it, which audit verify compares)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import NAMESPACE_URL, UUID, uuid5

from domain.chain import ChainedAggregate
from domain.commands import Audit
from domain.errors import InvalidTransition

REVOCATIONS = ("RevokeToken", "DisablePerson")


def register_uuid(study_id: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"trialog:{study_id}:access")


class AccessRegister(ChainedAggregate):
    """The names (token names and logins: one namespace) granted access, with what was
    granted, and those refused from now on."""

    class RegisterOpened(ChainedAggregate.Created):
        study_id: str

        def apply(self, aggregate: Any) -> None:
            aggregate.study_id = self.study_id
            aggregate.refused = []

    class TokenGranted(ChainedAggregate.Event):
        """A machine token made for ``name`` at ``granted_at``, with its role and sites
        (None: every site)."""

        name: str
        role: str
        sites: list[str] | None
        granted_at: datetime

        def apply(self, aggregate: Any) -> None:
            _granted(aggregate, self.name)

    class PersonGranted(ChainedAggregate.Event):
        """A person given the login ``login`` at ``granted_at``, with their full name, role
        and sites (None: every site)."""

        login: str
        full_name: str
        role: str
        sites: list[str] | None
        granted_at: datetime

        def apply(self, aggregate: Any) -> None:
            _granted(aggregate, self.login)

    class TokenRevoked(ChainedAggregate.Event):
        name: str

        def apply(self, aggregate: Any) -> None:
            aggregate.refused.append(self.name)

    class PersonDisabled(ChainedAggregate.Event):
        login: str

        def apply(self, aggregate: Any) -> None:
            aggregate.refused.append(self.login)

    class PasswordChanged(ChainedAggregate.Event):
        """The person's password changed, by them or reset: the ``generation``-th change;
        a row of theirs from before (a lower generation) is refused."""

        login: str
        generation: int

        def apply(self, aggregate: Any) -> None:
            aggregate.passwords = {**aggregate.password_generations, self.login: self.generation}

    if TYPE_CHECKING:
        study_id: str
        refused: list[str]
        granted: list[str]
        passwords: dict[str, int]

    @property
    def names_granted(self) -> list[str]:
        """The token names and logins granted, in the order granted."""
        return getattr(self, "granted", [])  # none in a register stored before grants

    @property
    def password_generations(self) -> dict[str, int]:
        """Each person whose password was ever changed, and how many times."""
        return getattr(self, "passwords", {})  # none in a register stored before them

    @classmethod
    def open(cls, study_id: str, audit: Audit) -> AccessRegister:
        return cls._create(cls.RegisterOpened, id=register_uuid(study_id), study_id=study_id,
                           **audit.event_fields())

    def grant(self, name: str, role: str, sites: list[str] | None, audit: Audit,
              full_name: str | None = None, granted_at: datetime | None = None) -> None:
        """Access granted to ``name`` at ``granted_at`` (None: as recorded; earlier for a
        grant made before the register recorded grants): a machine token, or a person
        (``full_name`` given). A name is granted once."""
        if name in self.names_granted:
            raise InvalidTransition(f"{name!r} was granted access already")
        at = audit.recorded_at if granted_at is None else granted_at
        if full_name is None:
            self.trigger_event(self.TokenGranted, name=name, role=role, sites=sites,
                               granted_at=at, **audit.event_fields())
        else:
            self.trigger_event(self.PersonGranted, login=name, full_name=full_name,
                               role=role, sites=sites, granted_at=at, **audit.event_fields())

    def password_changed(self, login: str, generation: int, audit: Audit) -> None:
        """The ``generation``-th change of ``login``'s password (one more than the last)."""
        if login in self.refused:
            raise InvalidTransition(f"{login!r} is refused")
        last = self.password_generations.get(login, 0)
        if generation != last + 1:
            raise InvalidTransition(f"{login!r}'s password has been changed {last} times: "
                                    f"this change is number {last + 1}, not {generation}")
        self.trigger_event(self.PasswordChanged, login=login, generation=generation,
                           **audit.event_fields())

    def revoke(self, type_name: str, name: str, audit: Audit) -> None:
        """RevokeToken or DisablePerson of ``name``: refused from now on."""
        if name in self.refused:
            raise InvalidTransition(f"{name!r} is refused already")
        if type_name == "RevokeToken":
            self.trigger_event(self.TokenRevoked, name=name, **audit.event_fields())
        else:
            self.trigger_event(self.PersonDisabled, login=name, **audit.event_fields())


def _granted(register: AccessRegister, name: str) -> None:
    register.granted = register.names_granted  # none in a register stored before grants
    register.granted.append(name)


def holders(events: Iterable[Any], as_of: datetime | None = None) -> list[dict[str, Any]]:
    """Who the register's ``events`` (in order) granted access or refused, as recorded up
    to ``as_of`` (None: all of them; a grant counts from when it was made, which for one
    made before the register recorded grants is before it was recorded), in the order
    access was granted (a name refused with no grant recorded, a row that failed its
    seal say, last, with no role, sites or grant): the name, a token or a person (their
    full name), the role and sites granted (None: every site), when, by whom and why;
    when, by whom and why the access ended (a token revoked, a person disabled), and how
    many times a person's password was changed."""
    found: dict[str, dict[str, Any]] = {}

    def holder(name: str, kind: str) -> dict[str, Any]:
        return found.setdefault(name, {
            "name": name, "kind": kind, "full_name": None, "role": None, "sites": None,
            "granted_at": None, "granted_by": None, "grant_reason": None, "ended_at": None,
            "ended_by": None, "end_reason": None, "password_changes": 0})

    for event in events:
        if isinstance(event, AccessRegister.TokenGranted | AccessRegister.PersonGranted):
            if as_of is not None and event.granted_at > as_of:
                continue
        elif as_of is not None and event.timestamp > as_of:
            continue
        if isinstance(event, AccessRegister.TokenGranted):
            _grant(holder(event.name, "token"), event)
        elif isinstance(event, AccessRegister.PersonGranted):
            _grant(holder(event.login, "person"), event, event.full_name)
        elif isinstance(event, AccessRegister.TokenRevoked):
            _end(holder(event.name, "token"), event)
        elif isinstance(event, AccessRegister.PersonDisabled):
            _end(holder(event.login, "person"), event)
        elif isinstance(event, AccessRegister.PasswordChanged):
            holder(event.login, "person")["password_changes"] = event.generation
    return sorted(found.values(), key=lambda h: (h["granted_at"] is None,
                                                 h["granted_at"] or datetime.min))


def _grant(holder: dict[str, Any], event: Any, full_name: str | None = None) -> None:
    holder.update(full_name=full_name, role=event.role, sites=event.sites,
                  granted_at=event.granted_at, granted_by=event.actor,
                  grant_reason=event.reason)


def _end(holder: dict[str, Any], event: Any) -> None:
    holder.update(ended_at=event.timestamp, ended_by=event.actor, end_reason=event.reason)
