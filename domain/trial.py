"""The trial-level stream: the database lock. While it is locked no participant's data
can change (the command bus checks it in each data command's transaction)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from uuid import NAMESPACE_URL, UUID, uuid5

from domain.chain import ChainedAggregate
from domain.commands import Audit
from domain.errors import InvalidTransition, ValidationFailed


def trial_uuid(study_id: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"trialog:{study_id}:database")


class TrialDatabase(ChainedAggregate):
    """Whether the trial's database is locked, and by whom since when."""

    class Opened(ChainedAggregate.Created):
        study_id: str

        def apply(self, aggregate: Any) -> None:
            aggregate.study_id = self.study_id
            aggregate.locked = None

    class DatabaseLocked(ChainedAggregate.Event):
        def apply(self, aggregate: Any) -> None:
            aggregate.locked = {"locked_at": self.timestamp.isoformat(),
                                "locked_by": self.actor}

    class DatabaseUnlocked(ChainedAggregate.Event):
        def apply(self, aggregate: Any) -> None:
            aggregate.locked = None

    if TYPE_CHECKING:
        study_id: str
        locked: dict[str, Any] | None

    @classmethod
    def open(cls, study_id: str, audit: Audit) -> TrialDatabase:
        return cls._create(cls.Opened, id=trial_uuid(study_id), study_id=study_id,
                           **audit.event_fields())

    def lock(self, audit: Audit) -> None:
        if self.locked is not None:
            raise InvalidTransition(f"the database is locked already, since "
                                    f"{self.locked['locked_at']}", status="locked")
        if not audit.gives_reason:  # why the data stop: an interim analysis, the final one
            raise ValidationFailed({"reason": ["is required for LockDatabase"]})
        self.trigger_event(self.DatabaseLocked, **audit.event_fields())

    def unlock(self, audit: Audit) -> None:
        if self.locked is None:
            raise InvalidTransition("the database is not locked", status="unlocked")
        if not audit.gives_reason:
            raise ValidationFailed({"reason": ["is required for UnlockDatabase"]})
        self.trigger_event(self.DatabaseUnlocked, **audit.event_fields())
