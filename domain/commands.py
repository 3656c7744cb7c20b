"""Commands (imperative) and the audit context every command carries."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class Audit:
    """Who issued a command, when the server recorded it, and why."""

    command_id: str
    actor: str
    recorded_at: datetime
    reason: str | None = None

    @property
    def gives_reason(self) -> bool:
        """Whether a reason was given that says something (not white space alone)."""
        return bool(self.reason and self.reason.strip())

    def event_fields(self) -> dict[str, Any]:
        return {
            "command_id": self.command_id,
            "actor": self.actor,
            "reason": self.reason,
            "timestamp": self.recorded_at,
        }


@dataclass(frozen=True)
class Command:
    """A validated command: ``data`` holds typed values (dates as ``date``)."""

    participant_id: str
    data: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__


class ScreenParticipant(Command):
    pass


class RecordConsent(Command):
    pass


class RandomizeParticipant(Command):
    pass


class RecordBloodSample(Command):
    pass


class RecordDose(Command):
    pass


class CompleteVisit(Command):
    pass


class ReportMedication(Command):
    pass


class WithdrawParticipant(Command):
    pass


class CorrectData(Command):
    pass


class ResolveDeviation(Command):
    pass


class FlagDeviation(Command):
    """Issued by the deviation monitor, not by clients."""


class RecordReminderSent(Command):
    """Issued by the reminder worker, not by clients."""


class RecordVisitMissed(Command):
    """Issued by the deviation monitor when a visit window closes."""


class RaiseQuery(Command):
    pass


class RespondToQuery(Command):
    pass


class CloseQuery(Command):
    pass


class ReopenQuery(Command):
    pass


class CancelQuery(Command):
    pass


class VerifySource(Command):
    pass


class SignVisit(Command):
    """``data`` carries the signer's login and printed name (set by the server from the
    person's session), never the password."""


class SignCasebook(Command):
    """As SignVisit, for the whole casebook."""


class LockVisit(Command):
    pass


class UnlockVisit(Command):
    pass


class LockCasebook(Command):
    pass


class UnlockCasebook(Command):
    pass


# Commands that change a participant's data: refused while the database is locked.
DATA_COMMANDS = frozenset({
    ScreenParticipant, RecordConsent, RandomizeParticipant, RecordBloodSample, RecordDose,
    CompleteVisit, ReportMedication, WithdrawParticipant, CorrectData,
    RecordVisitMissed,  # the mark is the visit's record
})
SIGNING_COMMANDS = frozenset({SignVisit, SignCasebook})
TRIAL_COMMANDS = ("LockDatabase", "UnlockDatabase")

COMMAND_TYPES: dict[str, type[Command]] = {
    c.__name__: c
    for c in (
        ScreenParticipant, RecordConsent, RandomizeParticipant, RecordBloodSample, RecordDose,
        CompleteVisit, ReportMedication, WithdrawParticipant, CorrectData, ResolveDeviation,
        RaiseQuery, RespondToQuery, CloseQuery, ReopenQuery, CancelQuery, VerifySource,
        SignVisit, SignCasebook, LockVisit, UnlockVisit, LockCasebook, UnlockCasebook,
    )
}
