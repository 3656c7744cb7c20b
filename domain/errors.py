"""Named domain errors; each carries the code the API answers with."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """A command refused by a rule of the domain."""

    code = "domain_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidTransition(DomainError):
    code = "invalid_transition"


class NotEligible(DomainError):
    code = "not_eligible"


class VersionConflict(DomainError):
    code = "version_conflict"


class IdempotencyKeyReused(DomainError):
    code = "idempotency_key_reused"

    @classmethod
    def of(cls, command_id: str) -> IdempotencyKeyReused:
        return cls(f"command_id {command_id} was already used for another command")


class CommandRecordAltered(DomainError):
    """A retry whose command's record (its fingerprint and first answer) fails its seal:
    changed outside trialog, it can't be answered, nor the command decided again."""

    code = "command_record_altered"

    @classmethod
    def of(cls, command_id: str) -> CommandRecordAltered:
        return cls(f"the record of command_id {command_id} fails its seal (it was changed "
                   "outside trialog): its first answer can't be given; trialog audit verify "
                   "reports it")


class ParticipantNotFound(DomainError):
    code = "not_found"


class SiteNotAllowed(DomainError):
    """A participant screened at a site outside the caller's scope."""

    code = "site_not_allowed"


class ParticipantIdUnavailable(DomainError):
    """The id is taken by a participant the caller can't see (only possible when the
    protocol gives the sites no participant id prefixes)."""

    code = "participant_id_unavailable"


class ValidationFailed(DomainError):
    """A value broke a field rule; ``fields`` maps dotted paths to messages."""

    code = "validation_failed"

    def __init__(self, fields: dict[str, list[str]]) -> None:
        first = next(iter(fields.items()))
        super().__init__(f"{first[0]}: {first[1][0]}", fields=fields)
        self.fields = fields


class ProtocolError(ValueError):
    """The protocol file is malformed; the message names the key."""


class Locked(DomainError):
    """The visit or casebook is locked: its data can't change until it is unlocked."""

    code = "locked"


class DatabaseLocked(DomainError):
    """The trial database is locked: no participant's data can change."""

    code = "database_locked"
