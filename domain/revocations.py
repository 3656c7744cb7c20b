"""The trial's register of who may no longer call, for good: machine tokens revoked and
people disabled. The access tables hold a copy (a row's ``revoked_at``, ``disabled_at``),
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
    """The names (token names and logins: one namespace) refused from now on."""

    class RegisterOpened(ChainedAggregate.Created):
        study_id: str

        def apply(self, aggregate: Any) -> None:
            aggregate.study_id = self.study_id
            aggregate.refused = []

    class TokenRevoked(ChainedAggregate.Event):
        name: str

        def apply(self, aggregate: Any) -> None:
            aggregate.refused.append(self.name)

    class PersonDisabled(ChainedAggregate.Event):
        login: str

        def apply(self, aggregate: Any) -> None:
            aggregate.refused.append(self.login)

    if TYPE_CHECKING:
        study_id: str
        refused: list[str]

    @classmethod
    def open(cls, study_id: str, audit: Audit) -> AccessRegister:
        return cls._create(cls.RegisterOpened, id=register_uuid(study_id), study_id=study_id,
                           **audit.event_fields())

    def revoke(self, type_name: str, name: str, audit: Audit) -> None:
        """RevokeToken or DisablePerson of ``name``: refused from now on."""
        if name in self.refused:
            raise InvalidTransition(f"{name!r} is refused already")
        if type_name == "RevokeToken":
            self.trigger_event(self.TokenRevoked, name=name, **audit.event_fields())
        else:
            self.trigger_event(self.PersonDisabled, login=name, **audit.event_fields())
