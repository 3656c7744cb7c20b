"""The trial's register of access: each access granted (a machine token made, a person
given a login, each with a role and sites), and who may no longer call, for good: machine
tokens revoked and people disabled, and each change of a person's password (after which
no earlier password of theirs is taken). The access tables hold a copy (a row's ``revoked_at``,
``disabled_at``, ``password_set``),
and a copy in a database can be put back as it was, seal and all, by someone with write
access to it; the register's events can't be taken back unseen (the hash chain, and the
commands' records beside it, which audit verify compares)."""

from __future__ import annotations

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
        """A machine token made for ``name``, with its role and sites (None: every
        site)."""

        name: str
        role: str
        sites: list[str] | None

        def apply(self, aggregate: Any) -> None:
            _granted(aggregate, self.name)

    class PersonGranted(ChainedAggregate.Event):
        """A person given the login ``login``, with their full name, role and sites (None:
        every site)."""

        login: str
        full_name: str
        role: str
        sites: list[str] | None

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
              full_name: str | None = None) -> None:
        """Access granted to ``name``: a machine token, or a person (``full_name``
        given). A name is granted once."""
        if name in self.names_granted:
            raise InvalidTransition(f"{name!r} was granted access already")
        if full_name is None:
            self.trigger_event(self.TokenGranted, name=name, role=role, sites=sites,
                               **audit.event_fields())
        else:
            self.trigger_event(self.PersonGranted, login=name, full_name=full_name,
                               role=role, sites=sites, **audit.event_fields())

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
