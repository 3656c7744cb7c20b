"""People: accounts with a full name, a role, sites and an Argon2 password hash; sign-in
for a 12-hour session token, the lock after five wrong passwords in a row, and a change of
password (the person's own, or an administrator's reset)."""

from __future__ import annotations

import logging
import secrets
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import sqlalchemy.exc
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection, Engine

from domain.access import Scope
from domain.errors import InvalidTransition
from infrastructure.store.access_seals import seals_for
from infrastructure.store.revocations import revocations_for
from infrastructure.store.schemas import says_something
from infrastructure.store.tables import as_utc, login_failures, user_sessions, users
from infrastructure.store.tokens import (
    SESSION_PREFIX,
    USER_CREATE_ACTOR,
    USER_DISABLE_ACTOR,
    USER_PASSWORD_ACTOR,
    TokenError,
    check_name,
    check_role,
    grant_for_good,
    refuse_for_good,
    scope_of,
    sites_column,
    token_hash,
)

log = logging.getLogger("trialog.sessions")

# Argon2id with OWASP's recommended minimum cost: 2 passes over 19 MiB, one lane. On a
# 2-core machine argon2-cffi's defaults (3 passes over 64 MiB, 4 lanes) took 230 ms a
# verification; this takes a quarter of that. Hashes made with other settings still
# verify, and are made again with these at the next sign-in.
HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
SESSION_HOURS = 12
MAX_FAILURES = 5
LOCK_MINUTES = 15
PASSWORD_LENGTH = (12, 1024)
# A password is kept as the Argon2 hash of its pepper (AccessSeals.pepper: a keyed MAC
# under a key derived from the cipher key), marked so: hashes read from the database
# can't be cracked without the key. A hash from before is kept encrypted (WRAPPED: by
# migration 0027, AccessSeals.wrap), checked as it was made, and replaced by a peppered
# one at the person's next sign-in or signature.
PEPPERED = "peppered"
WRAPPED = "wrapped$"
# Verified against when the login is unknown or disabled, so that every refusal costs the
# same time and says nothing about whether the login exists.
_DECOY = PEPPERED + HASHER.hash(secrets.token_urlsafe(16))


class LoginFailed(Exception):
    """Wrong login or password, or a disabled person: one answer for all (401)."""


class AccountLocked(Exception):
    """Too many wrong passwords in a row (423)."""

    def __init__(self, until: datetime) -> None:
        super().__init__(f"locked until {until.isoformat()}")
        self.until = until


@dataclass(frozen=True)
class Session:
    token: str
    expires_at: datetime
    login: str
    role: str
    scope: Scope


def check_password(password: str) -> None:
    low, high = PASSWORD_LENGTH
    if not low <= len(password) <= high:
        raise TokenError(f"the password must be {low}-{high} characters")


def _in_a_name(c: str) -> bool:
    """Whether a printed name may hold ``c``: not a control, a line or paragraph break, a
    surrogate, a private-use or unassigned code point (the noncharacters no XML export may
    hold among them), nor a format character but the joiners U+200C and U+200D, which are
    parts of names (a bidi override or mark could show the name, and what follows it on a
    line of the audit trail, in another order). No-break spaces are taken."""
    category = unicodedata.category(c)
    if category == "Cf":
        return c in "\u200c\u200d"
    return category not in ("Cc", "Cs", "Co", "Cn", "Zl", "Zp")


def create_user(engine: Engine, login: str, full_name: str, role: str, scope: Scope,
                password: str, reason: str | None = None) -> None:
    check_role(role)
    check_name(login, "--login")
    if (len(full_name) > 200 or not all(map(_in_a_name, full_name))
            or not says_something(full_name)):
        raise TokenError("--name: must be 1-200 characters with a visible one, without "
                         "control or format characters (but the joiners), line breaks or "
                         "noncharacters (the printed name of a signature)")
    check_password(password)
    hashed = _hashed(engine, password)
    sites, name, created_at = sites_column(scope), full_name.strip(), datetime.now(UTC)
    grant_for_good(engine, login, role, scope, created_at, USER_CREATE_ACTOR, "--login",
                   insert(users).values(
                       login=login, full_name=name, role=role, sites=sites,
                       password_hash=hashed, created_at=created_at,
                       seal=seals_for(engine).user(login, name, role, sites, hashed,
                                                   disabled=False)),
                   full_name=name, reason=reason)


def disable_user(engine: Engine, login: str, actor: str = USER_DISABLE_ACTOR,
                 reason: str | None = None) -> None:
    """The person can't sign in any more, and their sessions are refused from the next
    request on: for good, recorded in the access register (see ``store.revocations``),
    their row changed and their sessions ended in the same transaction."""
    with engine.connect() as connection:
        row = connection.execute(select(users, users.c.seal.label("user_seal"))
                                 .where(users.c.login == login)).first()
    if row is None:
        raise TokenError(f"no person has the login {login!r}")
    if not seals_for(engine).user_holds(row):  # sealed again, it would hold as changed
        raise TokenError(f"{login!r}: the person's row fails its seal (changed in the "
                         "database); it is not sealed again")
    if row.disabled_at is not None:
        raise TokenError(f"{login!r} was disabled on {row.disabled_at:%Y-%m-%d}")
    refuse_for_good(
        engine, "DisablePerson", login, actor,
        update(users).where(users.c.login == login, users.c.seal == row.user_seal).values(
            disabled_at=datetime.now(UTC),
            seal=seals_for(engine).user(login, row.full_name, row.role, row.sites,
                                        row.password_hash, disabled=True,
                                        password_set=row.password_set)),
        delete(user_sessions).where(user_sessions.c.login == login),
        meanwhile=f"{login!r}: the person's row changed meanwhile: try again",
        already=f"{login!r} is disabled already", reason=reason)


def sign_in(engine: Engine, login: str, password: str, client: str | None = None,
            now: datetime | None = None) -> Session:
    """A new session for the person, or LoginFailed / AccountLocked; each failure is
    logged with the reason, which the caller is not told."""
    now = now or datetime.now(UTC)
    seals = seals_for(engine)
    person = _password_checked(engine, login, password, client, now)
    token = SESSION_PREFIX + secrets.token_urlsafe(32)
    expires_at = now + timedelta(hours=SESSION_HOURS)
    digest = token_hash(token)
    with engine.begin() as connection:
        connection.execute(delete(login_failures).where(login_failures.c.login == login))
        # Under the password just checked: a change of it committed meanwhile has ended
        # this session before it begins (its count is behind the person's).
        connection.execute(insert(user_sessions).values(
            token_hash=digest, login=login, created_at=now, expires_at=expires_at,
            password_set=person.password_set,
            seal=seals.session(digest, login, expires_at, person.password_set)))
        _rehash_if_due(engine, connection, person, password)
    log.info("signed in", extra={"login": login, "client": client})
    return Session(token, expires_at, login, person.role, scope_of(person.sites))


def change_password(engine: Engine, login: str, current: str, new: str,
                    client: str | None = None, keep_session: str | None = None) -> None:
    """A person's own password changed: the current one checked again (a wrong one counted
    toward the lock, as at sign-in: LoginFailed or AccountLocked), the new one kept
    peppered, and every session of theirs ended but ``keep_session`` (the token hash of
    the one asking)."""
    check_new_password(new, current)
    person = _password_checked(engine, login, current, client, datetime.now(UTC),
                               "password change")
    try:
        _replace_password(engine, person, new, login, keep_session)
    except TokenError:  # the right password, and another change first: not a failure
        with engine.begin() as connection:
            connection.execute(delete(login_failures).where(login_failures.c.login == login))
        raise
    log.info("password changed", extra={"login": login, "client": client})


def reset_password(engine: Engine, login: str, new: str) -> None:
    """An administrator's reset (``trialog user password``): the new password kept
    peppered, the lock lifted, and every session of the person's ended."""
    check_password(new)
    person = _person(engine, login, from_before_a_change=True)
    if person is None:
        raise TokenError(f"no person has the login {login!r} (or the row fails its seal)")
    if person.disabled_at is not None:
        raise TokenError(f"{login!r} was disabled on {person.disabled_at:%Y-%m-%d}")
    _replace_password(engine, person, new, USER_PASSWORD_ACTOR, keep_session=None)
    log.info("password reset", extra={"login": login})


def check_new_password(new: str, current: str) -> None:
    """The rules of a new password: the length of any, and not the current one."""
    check_password(new)
    if new == current:
        raise TokenError("the new password must differ from the current one")


def _replace_password(engine: Engine, person: Any, new: str, actor: str,
                      keep_session: str | None) -> None:
    """The change recorded in the access register (the person's ``password_set``-th, so a
    row of theirs from before it is refused) and, in the same transaction, the person's
    row given the new password's hash, counted and sealed again (unless it changed
    meanwhile), the failures counted forgotten, the other sessions ended (a console
    cookie stands on one)."""
    hashed = _hashed(engine, new)
    login = person.login
    # The next change: after the row's and the register's (a reset of a row put back
    # from before a change counts on from the register's).
    revocations = revocations_for(engine)
    generation = max(person.password_set, revocations.password_changes(login)) + 1
    meanwhile = f"{login!r}: the person's row changed meanwhile: try again"

    def keep(session: Any) -> None:
        replaced = session.execute(update(users).where(
            users.c.login == login, users.c.seal == person.user_seal).values(
            password_hash=hashed, password_set=generation, seal=seals_for(engine).user(
                login, person.full_name, person.role, person.sites, hashed,
                disabled=False, password_set=generation))).rowcount
        if replaced != 1:
            raise TokenError(meanwhile)
        session.execute(delete(login_failures).where(login_failures.c.login == login))
        ended = user_sessions.c.login == login
        if keep_session is not None:
            ended &= user_sessions.c.token_hash != keep_session
            kept = session.execute(select(user_sessions.c.expires_at).where(
                user_sessions.c.token_hash == keep_session,
                user_sessions.c.login == login)).scalar()
            if kept is not None:  # goes on, under the new password
                session.execute(update(user_sessions).where(
                    user_sessions.c.token_hash == keep_session).values(
                    password_set=generation, seal=seals_for(engine).session(
                        keep_session, login, kept, generation)))
        session.execute(delete(user_sessions).where(ended))

    try:
        revocations.change_password(login, generation, actor, keep)
    except InvalidTransition:  # the register counts otherwise: another change meanwhile
        raise TokenError(meanwhile) from None


def _password_checked(engine: Engine, login: str, password: str, client: str | None,
                      now: datetime, doing: str | None = None) -> Any:
    """The person's row when ``password`` is theirs, the attempt counted first; else
    LoginFailed (the reason logged, ``doing`` before it) or AccountLocked."""
    _reserve(engine, login, now, client)
    person = _person(engine, login)
    reason = _check(engine, person, password)
    if reason is not None:
        _failed(engine, login, f"{doing}: {reason}" if doing else reason, client, now)
    return person


def _person(engine: Engine, login: str, from_before_a_change: bool = False) -> Any | None:
    """The person's row; None when there is none, when its seal fails (someone changed it
    without the key: a password hash put there signs no one in), or when the access
    register refuses them (a disabled person's row put back; unless
    ``from_before_a_change``, a row from before a change of their password)."""
    revocations = revocations_for(engine)
    with engine.connect() as connection:
        person = connection.execute(select(users, users.c.seal.label("user_seal"),
                                           revocations.version_column)
                                    .where(users.c.login == login)).first()
    if person is not None and not seals_for(engine).user_holds(person):
        log.warning("a person's row fails its seal: refused", extra={"login": login})
        return None
    if (person is not None and person.disabled_at is None  # a disabled row is refused as it is
            and revocations.refuses(login, person.register_version,
                                    None if from_before_a_change else person.password_set)):
        return None
    return person


def _rehash_if_due(engine: Engine, connection: Connection, person: Any,
                   password: str) -> None:
    """A hash made before the pepper, or with other settings, made again from the
    password just checked (unless the row changed meanwhile, a disable say)."""
    if not _needs_rehash(person.password_hash):
        return
    hashed = _hashed(engine, password)
    connection.execute(update(users).where(
        users.c.login == person.login, users.c.seal == person.user_seal).values(
        password_hash=hashed, seal=seals_for(engine).user(
            person.login, person.full_name, person.role, person.sites, hashed,
            disabled=False, password_set=person.password_set)))


def _hashed(engine: Engine, password: str) -> str:
    return PEPPERED + HASHER.hash(seals_for(engine).pepper(password))


def _matches(engine: Engine, login: str, stored: str, password: str) -> bool:
    seals = seals_for(engine)
    try:
        if stored.startswith(PEPPERED):
            return HASHER.verify(stored[len(PEPPERED):], seals.pepper(password))
        if stored.startswith(WRAPPED):  # made before the pepper, encrypted since
            older = seals.unwrap(login, stored[len(WRAPPED):])
            return older is not None and HASHER.verify(older, password)
        return HASHER.verify(stored, password)  # made before the pepper, as it was
    except (VerificationError, InvalidHashError):
        return False


def _needs_rehash(stored: str) -> bool:
    """Made before the pepper, or with other Argon2 settings."""
    return (not stored.startswith(PEPPERED)
            or HASHER.check_needs_rehash(stored[len(PEPPERED):]))


def _check(engine: Engine, person: object | None, password: str) -> str | None:
    """Why the sign-in fails (for the log), or None."""
    matches = _matches(engine, getattr(person, "login", ""),
                       getattr(person, "password_hash", None) or _DECOY, password)
    if person is None:
        return "unknown_login"
    if not matches:
        return "wrong_password"
    return "disabled" if getattr(person, "disabled_at", None) is not None else None


def _reserve(engine: Engine, login: str, now: datetime, client: str | None) -> None:
    """Counts this attempt as a failure before its password is checked (a success clears
    the count), under the row's lock: however many attempts arrive at once, at most
    five are checked before the login locks. AccountLocked while it is locked."""
    with engine.begin() as connection:
        failures = _increment(connection, login, now)
        locked = connection.execute(select(login_failures.c.locked_until)
                                    .where(login_failures.c.login == login)).scalar()
        if locked is not None and as_utc(locked) > now:
            # Attempts while locked don't count toward the next lock.
            connection.execute(update(login_failures).where(login_failures.c.login == login)
                               .values(failures=login_failures.c.failures - 1))
            until = as_utc(locked)
        elif failures > MAX_FAILURES:  # attempts in flight used the allowance up
            until = now + timedelta(minutes=LOCK_MINUTES)
            connection.execute(update(login_failures).where(login_failures.c.login == login)
                               .values(failures=0, locked_until=until))
        else:
            return
    _log_failure(login, "locked", client)
    raise AccountLocked(until)


def _failed(engine: Engine, login: str, reason: str, client: str | None,
            now: datetime) -> NoReturn:
    """The attempt failed: its reserved count stays; the fifth in a row locks the login
    for 15 minutes."""
    _log_failure(login, reason, client)
    with engine.begin() as connection:
        failures = connection.execute(select(login_failures.c.failures)
                                      .where(login_failures.c.login == login)).scalar()
        if failures is None or failures < MAX_FAILURES:
            raise LoginFailed
        until = now + timedelta(minutes=LOCK_MINUTES)
        connection.execute(update(login_failures).where(login_failures.c.login == login)
                           .values(failures=0, locked_until=until))
    log.warning("login locked", extra={"login": login, "locked_until": until.isoformat()})
    raise AccountLocked(until)


def _increment(connection: Connection, login: str, now: datetime) -> int:
    changed = connection.execute(
        update(login_failures).where(login_failures.c.login == login)
        .values(failures=login_failures.c.failures + 1, last_failed_at=now))
    if changed.rowcount == 0:
        try:
            with connection.begin_nested():
                connection.execute(insert(login_failures).values(
                    login=login, failures=1, last_failed_at=now, locked_until=None))
        except sqlalchemy.exc.IntegrityError:  # a concurrent first failure inserted it
            return _increment(connection, login, now)
    failures: int = connection.execute(select(login_failures.c.failures)
                                       .where(login_failures.c.login == login)).scalar_one()
    return failures


def _log_failure(login: str, reason: str, client: str | None) -> None:
    log.warning("login failed", extra={"login": login, "reason": reason, "client": client})


def reauthenticate(engine: Engine, login: str, password: str,
                   client: str | None = None) -> str:
    """The person's printed name when ``password`` is their current one (a signature's
    re-authentication); LoginFailed otherwise, counted toward the lock like a sign-in,
    or AccountLocked."""
    person = _password_checked(engine, login, password, client, datetime.now(UTC),
                               "signature")
    with engine.begin() as connection:
        connection.execute(delete(login_failures).where(login_failures.c.login == login))
        _rehash_if_due(engine, connection, person, password)
    name: str = person.full_name
    return name
