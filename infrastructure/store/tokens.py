"""Who may call: machine tokens, the role table of the contract (who may issue which
command, read what, see contact details) and the sites each caller may see."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy.exc
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection, Engine

from domain.access import EVERY_SITE, Scope
from domain.commands import COMMAND_TYPES
from domain.errors import InvalidTransition
from domain.protocol import Protocol
from infrastructure.store.access_seals import seals_for
from infrastructure.store.revocations import UPGRADE_ACTOR, revocations_for
from infrastructure.store.schemas import says_something
from infrastructure.store.tables import tokens, user_sessions, users

SERVICE_COMMANDS = frozenset({
    "ScreenParticipant", "RecordConsent", "RandomizeParticipant", "RecordBloodSample",
    "RecordDose", "CompleteVisit", "ReportMedication", "WithdrawParticipant",
})
COORDINATOR_COMMANDS = SERVICE_COMMANDS | {"CorrectData", "RespondToQuery"}
SIGNING_COMMANDS = frozenset({"SignVisit", "SignCasebook"})
MONITOR_COMMANDS = frozenset({"ResolveDeviation", "RaiseQuery", "CloseQuery", "ReopenQuery",
                              "CancelQuery", "VerifySource"})
LOCK_COMMANDS = frozenset({"LockVisit", "UnlockVisit", "LockCasebook", "UnlockCasebook",
                           "LockDatabase", "UnlockDatabase"})
READS = frozenset({"participants", "history", "visits", "deviations", "queries", "summary",
                   "audit", "exports", "feed"})
SERVICE_READS = frozenset({"participants", "history", "visits", "deviations", "queries",
                           "summary", "feed"})

# Command types this service does not have yet are in the table already, so that each
# arrives with its roles decided by the contract.
COMMANDS_BY_ROLE: dict[str, frozenset[str]] = {
    "service": SERVICE_COMMANDS,
    "coordinator": COORDINATOR_COMMANDS,
    "investigator": COORDINATOR_COMMANDS | SIGNING_COMMANDS,
    "monitor": MONITOR_COMMANDS,
    "data_manager": MONITOR_COMMANDS | LOCK_COMMANDS,
    "auditor": frozenset(),
    # An admin may not sign.
    "admin": (frozenset(COMMAND_TYPES) | {"LockDatabase", "UnlockDatabase"}) - SIGNING_COMMANDS,
}
READS_BY_ROLE: dict[str, frozenset[str]] = {
    "service": SERVICE_READS, "coordinator": READS, "investigator": READS, "monitor": READS,
    "data_manager": READS,
    # The accounting of disclosures of contact details and the access register: auditors
    # and admins only.
    "auditor": READS | {"access_log", "access_register"},
    "admin": READS | {"access_log", "access_register", "webhooks"},
}
CONTACT_ROLES = frozenset({"coordinator", "investigator", "admin"})
ROLES = tuple(COMMANDS_BY_ROLE)
# Roles that see every site unless given sites; every other role must be given a scope.
ALL_SITES_BY_DEFAULT = frozenset({"admin", "auditor"})

MACHINE_PREFIX = "tlg_"
log = logging.getLogger("trialog.access")
SESSION_PREFIX = "tls_"


class TokenError(ValueError):
    """A token or a person can't be created or changed; the message says why."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the name that becomes the ``actor`` of their events (a token's name
    or a person's login), the role, the sites, and whether a person stands behind it."""

    name: str
    role: str
    scope: Scope = EVERY_SITE
    person: bool = False

    def may_issue(self, command_type: str) -> bool:
        return command_type in COMMANDS_BY_ROLE[self.role]

    def may_read(self, what: str) -> bool:
        return what in READS_BY_ROLE[self.role]

    @property
    def sees_contact(self) -> bool:
        return self.role in CONTACT_ROLES

    @property
    def kind(self) -> str:
        return "person" if self.person else "token"


def check_role(role: str) -> None:
    if role not in COMMANDS_BY_ROLE:
        raise TokenError(f"--role: must be one of {', '.join(ROLES)}")


def scope_for(protocol: Protocol, role: str, sites: Sequence[str], all_sites: bool) -> Scope:
    """The scope given at creation (``--site`` ... or ``--all-sites``), checked: required
    for every role but admin and auditor, and only the protocol's sites."""
    check_role(role)
    if sites and all_sites:
        raise TokenError("give --site or --all-sites, not both")
    if all_sites:
        return EVERY_SITE
    if not sites:
        if role in ALL_SITES_BY_DEFAULT:
            return EVERY_SITE
        raise TokenError(f"--site or --all-sites is required for role {role} "
                         f"(the protocol's sites: {', '.join(protocol.site_ids)})")
    unknown = [s for s in sites if protocol.site(s) is None]
    if unknown:
        raise TokenError(f"--site: unknown site {unknown[0]!r}; the protocol's sites are "
                         f"{', '.join(protocol.site_ids)}")
    return Scope.of(sites)


def sites_column(scope: Scope) -> str | None:
    sites = scope.as_list()
    return None if sites is None else json.dumps(sites)


def scope_of(column: str | None) -> Scope:
    return EVERY_SITE if column is None else Scope.of(json.loads(column))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def name_is_free(connection: Connection, name: str) -> bool:
    """Token names and logins are both actors of events: one namespace."""
    return (connection.execute(select(tokens.c.name).where(tokens.c.name == name)).first()
            is None and
            connection.execute(select(users.c.login).where(users.c.login == name)).first()
            is None)


# The actors Trialog writes events as itself: the deviation monitor, the reminder worker,
# an import's default, the demo's screening app, and the command line's steps on the
# access register. No token, person or operator takes their names (compared in a form
# that case, width and dashes don't change), so that the audit trail never shows a
# person's act as the system's.
TOKEN_CREATE_ACTOR = "trialog token create"
TOKEN_REVOKE_ACTOR = "trialog token revoke"
USER_CREATE_ACTOR = "trialog user create"
USER_DISABLE_ACTOR = "trialog user disable"
USER_PASSWORD_ACTOR = "trialog user password"
SYSTEM_ACTORS = frozenset({"deviation-monitor", "reminder-worker", "import",
                           "demo-screening-app", TOKEN_CREATE_ACTOR, TOKEN_REVOKE_ACTOR,
                           USER_CREATE_ACTOR, USER_DISABLE_ACTOR, USER_PASSWORD_ACTOR,
                           UPGRADE_ACTOR})


_DASH_LIKE = frozenset("\u2212\u2043\u02d7")  # a minus sign, a hyphen bullet, a modifier minus


def _compared(name: str) -> str:
    """A name as its reader tells it from another: compatibility forms folded (full-width
    letters), case folded, every dash a hyphen-minus and each run of spaces one space."""
    folded = " ".join(unicodedata.normalize("NFKC", name).casefold().split())
    return "".join("-" if unicodedata.category(c) == "Pd" or c in _DASH_LIKE else c
                   for c in folded)


_RESERVED = {_compared(name): name for name in SYSTEM_ACTORS}


def check_name(name: str, option: str, own: frozenset[str] = frozenset()) -> None:
    """A name events carry as their actor: 1-100 printable characters (no line break or
    control character to forge a line of the audit trail), no surrounding spaces, one of
    them visible, and none of the system's own actors' names (but ``own``)."""
    if not 1 <= len(name) <= 100 or name != name.strip() or not name.isprintable():
        raise TokenError(f"{option}: must be 1-100 printable characters, without "
                         "surrounding spaces")
    if not says_something(name):
        raise TokenError(f"{option}: must hold a visible character (white space and "
                         "invisible characters alone name no one)")
    reserved = _RESERVED.get(_compared(name))
    if reserved is not None and name not in own:
        shown = "" if reserved == name else f" (as {reserved!r})"
        raise TokenError(f"{option}: {name!r}{shown} is a name Trialog writes its own "
                         f"events under ({', '.join(sorted(SYSTEM_ACTORS))}): choose "
                         "another")


def create_token(engine: Engine, name: str, role: str, scope: Scope | None = None,
                 reason: str | None = None) -> str:
    """A new machine token for ``name``; only its hash is stored, and the grant is
    recorded in the access register (with ``reason``). ``scope`` is required for every
    role but admin and auditor (fail-closed)."""
    check_role(role)
    check_name(name, "--name")
    if scope is None:
        if role not in ALL_SITES_BY_DEFAULT:
            raise TokenError(f"--site or --all-sites is required for role {role}")
        scope = EVERY_SITE
    token = MACHINE_PREFIX + secrets.token_urlsafe(32)
    digest, sites = token_hash(token), sites_column(scope)
    seal = seals_for(engine).token(name, role, digest, sites, revoked=False)
    created_at = datetime.now(UTC)
    grant_for_good(engine, name, role, scope, created_at, TOKEN_CREATE_ACTOR, "--name",
                   insert(tokens).values(name=name, role=role, token_hash=digest,
                                         sites=sites, created_at=created_at, seal=seal),
                   reason=reason)
    return token


def grant_for_good(engine: Engine, name: str, role: str, scope: Scope, created_at: datetime,
                   actor: str, option: str, row: Any, full_name: str | None = None,
                   reason: str | None = None) -> None:
    """Records access granted to ``name`` (a machine token, or a person: ``full_name``
    given) at ``created_at`` in the access register, with ``row``, the access table's
    insert (made at that time), in the same transaction. TokenError naming ``option``
    when the name is taken."""
    taken = f"{option}: a token or person named {name!r} already exists"

    def keep(session: Any) -> None:
        if not name_is_free(session, name):
            raise TokenError(taken)
        session.execute(row)

    try:
        revocations_for(engine).grant(name, role, scope.as_list(), created_at, actor, keep,
                                      full_name=full_name, reason=reason)
    except InvalidTransition:
        raise TokenError(taken) from None
    except sqlalchemy.exc.IntegrityError:  # each try met another's write: none was made
        raise TokenError(f"{option}: {name!r} was not created: the access register or "
                         "the access tables kept changing meanwhile; try again") from None


def revoke_token(engine: Engine, name: str, actor: str = TOKEN_REVOKE_ACTOR,
                 reason: str | None = None) -> None:
    """Revokes the token named ``name`` for good: recorded in the access register (see
    ``store.revocations``), its row changed in the same transaction. It is refused from
    the next request on."""
    with engine.connect() as connection:
        row = connection.execute(select(tokens).where(tokens.c.name == name)).first()
    if row is None:
        raise TokenError(f"no token is named {name!r}")
    if not seals_for(engine).token_holds(row):  # sealed again, it would hold as changed
        raise TokenError(f"the token {name!r}'s row fails its seal (changed in the "
                         "database); it is not sealed again")
    if row.revoked_at is not None:
        raise TokenError(f"the token {name!r} was revoked on {row.revoked_at:%Y-%m-%d}")
    refuse_for_good(
        engine, "RevokeToken", name, actor,
        update(tokens).where(tokens.c.name == name, tokens.c.seal == row.seal).values(
            revoked_at=datetime.now(UTC),
            seal=seals_for(engine).token(name, row.role, row.token_hash, row.sites,
                                         revoked=True)),
        meanwhile=f"the token {name!r} changed meanwhile: try again",
        already=f"the token {name!r} is revoked already", reason=reason)


def refuse_for_good(engine: Engine, type_name: str, name: str, actor: str, change: Any,
                    *after: Any, meanwhile: str, already: str,
                    reason: str | None = None) -> None:
    """Records RevokeToken or DisablePerson of ``name`` in the access register, with the
    access table's copy in the same transaction: ``change``, the row's update, made on
    the row as it was read (its seal), else TokenError ``meanwhile``; then ``after``.
    TokenError ``already`` when the register refuses ``name`` already."""

    def keep(session: Any) -> None:
        if session.execute(change).rowcount != 1:
            raise TokenError(meanwhile)
        for statement in after:
            session.execute(statement)

    try:
        revocations_for(engine).revoke(type_name, name, actor, keep, reason)
    except InvalidTransition:
        raise TokenError(already) from None


# A person's sign-in session and the person, with what their seals cover and the seals
# (see AccessSeals.session_and_person_hold).
SEALED_SESSION = (users.c.login, users.c.role, users.c.sites, users.c.full_name,
                  users.c.password_hash, users.c.disabled_at, users.c.password_set,
                  users.c.seal.label("user_seal"),
                  user_sessions.c.token_hash, user_sessions.c.expires_at,
                  user_sessions.c.password_set.label("session_password_set"),
                  user_sessions.c.seal.label("session_seal"))


class Authenticator:
    """Looks a bearer token up by its hash on every request, so a revocation, a disabled
    person or an expired session acts on the next one (no cache outlives a request but
    the access register's names, kept per version: each look-up reads its version)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seals = seals_for(engine)
        self.revocations = revocations_for(engine)
        version = self.revocations.version_column
        # Built once: building a statement and its cache key on every request cost a
        # third of the look-up's Python.
        self._person = (select(*SEALED_SESSION, version)
                        .join(user_sessions, user_sessions.c.login == users.c.login)
                        .where(user_sessions.c.token_hash == bindparam("digest"),
                               user_sessions.c.expires_at > bindparam("now"),
                               users.c.disabled_at.is_(None)))
        self._machine = select(tokens.c.name, tokens.c.role, tokens.c.sites,
                               tokens.c.token_hash, tokens.c.revoked_at, tokens.c.seal,
                               version).where(tokens.c.token_hash == bindparam("digest"),
                                              tokens.c.revoked_at.is_(None))

    def __call__(self, token: str) -> Principal | None:
        digest = token_hash(token)
        # One statement, no transaction around it: no BEGIN and no ROLLBACK to wait for.
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            if token.startswith(SESSION_PREFIX):
                person = connection.execute(self._person, {
                    "digest": digest, "now": datetime.now(UTC)}).first()
                if person is None or not self.seals.session_and_person_hold(person):
                    return _refused(person)
                if not session_stands(person, self.revocations):
                    return None
                return Principal(person.login, person.role, scope_of(person.sites), True)
            row = connection.execute(self._machine, {"digest": digest}).first()
        if row is None or not self.seals.token_holds(row):
            return _refused(row)
        if self.revocations.refuses(row.name, row.register_version):
            return None
        return Principal(row.name, row.role, scope_of(row.sites))


def session_stands(row: Any, revocations: Any) -> bool:
    """Whether a person's session (its row read with its person's, SEALED_SESSION, and the
    access register's version), its seals checked, still stands: begun under the person's
    current password (one begun under an older one ended at the change), and the person
    not refused by the register (``Revocations.refuses``)."""
    return bool(row.session_password_set == row.password_set) and not revocations.refuses(
        row.login, row.register_version, row.password_set)


def _refused(row: Any) -> None:
    """No one: a row whose seal fails is logged (someone changed it without the key)."""
    if row is not None:
        log.warning("a token's or session's row fails its seal: refused",
                    extra={"holder": getattr(row, "name", None) or getattr(row, "login", None)})
