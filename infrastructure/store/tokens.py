"""API tokens and the role table of the contract: who may issue which command, who may
read what, and who sees contact details."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy.exc
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine

from domain.commands import COMMAND_TYPES
from infrastructure.store.tables import tokens

SERVICE_COMMANDS = frozenset({
    "ScreenParticipant", "RecordConsent", "RandomizeParticipant", "RecordBloodSample",
    "RecordDose", "CompleteVisit", "ReportMedication", "WithdrawParticipant",
})
READS = frozenset({"participants", "history", "visits", "deviations", "summary", "audit",
                   "exports"})
SERVICE_READS = frozenset({"participants", "history", "visits", "deviations", "summary"})

COMMANDS_BY_ROLE: dict[str, frozenset[str]] = {
    "service": SERVICE_COMMANDS,
    "coordinator": SERVICE_COMMANDS | {"CorrectData"},
    "monitor": frozenset({"ResolveDeviation"}),
    "auditor": frozenset(),
    "admin": frozenset(COMMAND_TYPES),
}
READS_BY_ROLE: dict[str, frozenset[str]] = {
    "service": SERVICE_READS, "coordinator": READS, "monitor": READS,
    # The accounting of disclosures of contact details: auditors and admins only.
    "auditor": READS | {"access_log"}, "admin": READS | {"access_log"},
}
CONTACT_ROLES = frozenset({"coordinator", "admin"})
ROLES = tuple(COMMANDS_BY_ROLE)


class TokenError(ValueError):
    """A token can't be created; the message says why."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name (the ``actor`` of their events) and role."""

    name: str
    role: str

    def may_issue(self, command_type: str) -> bool:
        return command_type in COMMANDS_BY_ROLE[self.role]

    def may_read(self, what: str) -> bool:
        return what in READS_BY_ROLE[self.role]

    @property
    def sees_contact(self) -> bool:
        return self.role in CONTACT_ROLES


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(engine: Engine, name: str, role: str) -> str:
    """A new token for ``name``; only its hash is stored."""
    if role not in COMMANDS_BY_ROLE:
        raise TokenError(f"--role: must be one of {', '.join(ROLES)}")
    if not name.strip() or len(name) > 100:
        raise TokenError("--name: must be 1-100 characters")
    token = "tlg_" + secrets.token_urlsafe(32)
    try:
        with engine.begin() as connection:
            connection.execute(insert(tokens).values(
                name=name, role=role, token_hash=token_hash(token),
                created_at=datetime.now(UTC),
            ))
    except sqlalchemy.exc.IntegrityError:
        raise TokenError(f"--name: a token named {name!r} already exists") from None
    return token


def revoke_token(engine: Engine, name: str) -> None:
    """Revokes the token named ``name``; it is refused from the next request on."""
    with engine.begin() as connection:
        row = connection.execute(select(tokens.c.revoked_at)
                                 .where(tokens.c.name == name)).first()
        if row is None:
            raise TokenError(f"no token is named {name!r}")
        if row.revoked_at is not None:
            raise TokenError(f"the token {name!r} was revoked on {row.revoked_at:%Y-%m-%d}")
        connection.execute(update(tokens).where(tokens.c.name == name)
                           .values(revoked_at=datetime.now(UTC)))


class Authenticator:
    """Looks a token up by its hash on every request, so a revocation acts on the next
    one (no cache outlives a request)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __call__(self, token: str) -> Principal | None:
        with self.engine.connect() as connection:
            row = connection.execute(
                select(tokens.c.name, tokens.c.role).where(
                    tokens.c.token_hash == token_hash(token), tokens.c.revoked_at.is_(None))
            ).first()
        return Principal(row.name, row.role) if row is not None else None
