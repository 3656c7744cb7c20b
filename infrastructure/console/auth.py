"""Who is using the console: a person signs in with the API's sign-in (the same lockout and
logging), and holds a session cookie of the console's own. The cookie is HttpOnly,
SameSite=Lax, Secure when the page came over HTTPS; the session ends on sign-out, after
IDLE_MINUTES without a request, when the sign-in session expires, and on the next request
after the person is disabled.

A second cookie, signed with a key kept in the database, holds the CSRF secret of the
forms (Flask-WTF) and the one-time messages shown after a form."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy.exc
from flask import Flask, Request, request
from flask.sessions import SecureCookieSessionInterface
from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Engine

from infrastructure.console.tables import console_keys, console_sessions
from infrastructure.store.access_seals import seals_for
from infrastructure.store.macs import same_seal
from infrastructure.store.people import sign_in
from infrastructure.store.revocations import revocations_for
from infrastructure.store.tables import as_utc, user_sessions, users
from infrastructure.store.tokens import (
    SEALED_SESSION,
    Principal,
    scope_of,
    session_stands,
    token_hash,
)

PREFIX = "/console"
COOKIE = "trialog_console"
FORM_COOKIE = "trialog_console_form"
IDLE_MINUTES = 30
# A session's last use is written at most this often (a page view need not write).
TOUCH_SECONDS = 60
log = logging.getLogger("trialog.console")


def is_console(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


@dataclass(frozen=True)
class Person:
    principal: Principal
    full_name: str


class IdleTimeout(Exception):
    """The session went unused for longer than the idle timeout; it is ended."""


def start(engine: Engine, login: str, password: str, client: str | None) -> str:
    """Signs the person in (LoginFailed or AccountLocked as the API's sign-in raises
    them); the new console cookie's value."""
    session = sign_in(engine, login, password, client=client)
    cookie = secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    cookie_hash, session_hash = token_hash(cookie), token_hash(session.token)
    with engine.begin() as connection:
        connection.execute(insert(console_sessions).values(
            cookie_hash=cookie_hash, session_hash=session_hash, login=session.login,
            created_at=now, last_seen_at=now,
            seal=seals_for(engine).console(cookie_hash, session_hash, session.login, now)))
    return cookie


def person(engine: Engine, cookie: str, now: datetime | None = None) -> Person | None:
    """The person holding ``cookie``; None when it is no session (signed out, expired,
    disabled); IdleTimeout when it went unused too long (the session is then ended)."""
    now = now or datetime.now(UTC)
    digest = token_hash(cookie)
    revocations = revocations_for(engine)
    with engine.connect() as connection:
        row = connection.execute(
            select(*SEALED_SESSION, console_sessions.c.cookie_hash, console_sessions.c.session_hash,
                   console_sessions.c.login.label("console_login"),
                   console_sessions.c.seal.label("console_seal"),
                   console_sessions.c.last_seen_at, revocations.version_column)
            .join(user_sessions, user_sessions.c.token_hash == console_sessions.c.session_hash)
            .join(users, users.c.login == user_sessions.c.login)
            .where(console_sessions.c.cookie_hash == digest,
                   user_sessions.c.expires_at > now, users.c.disabled_at.is_(None))
        ).first()
    if row is None:
        return None
    seals = seals_for(engine)
    if not (seals.session_and_person_hold(row)
            and same_seal(row.console_seal, seals.console(
                row.cookie_hash, row.session_hash, row.console_login, row.last_seen_at))
            and row.console_login == row.login):
        log.warning("a console session's row fails its seal: refused")
        return None
    if not session_stands(row, revocations):
        return None
    idle = now - as_utc(row.last_seen_at)
    if idle > timedelta(minutes=IDLE_MINUTES):
        end(engine, cookie)
        raise IdleTimeout
    if idle > timedelta(seconds=TOUCH_SECONDS):
        with engine.begin() as connection:
            connection.execute(update(console_sessions).where(
                console_sessions.c.cookie_hash == digest,
                console_sessions.c.seal == row.console_seal,  # not a row changed meanwhile
            ).values(last_seen_at=now, seal=seals.console(
                row.cookie_hash, row.session_hash, row.console_login, now)))
    return Person(Principal(row.login, row.role, scope_of(row.sites), True), row.full_name)


def session_of(engine: Engine, cookie: str) -> str | None:
    """The token hash of the sign-in session a console cookie stands on."""
    with engine.connect() as connection:
        found: str | None = connection.execute(
            select(console_sessions.c.session_hash)
            .where(console_sessions.c.cookie_hash == token_hash(cookie))).scalar()
    return found


def end(engine: Engine, cookie: str) -> None:
    """Signs out: the console session and the sign-in session it stands on."""
    digest = token_hash(cookie)
    with engine.begin() as connection:
        session_hash = connection.execute(
            select(console_sessions.c.session_hash)
            .where(console_sessions.c.cookie_hash == digest)).scalar()
        connection.execute(delete(console_sessions)
                           .where(console_sessions.c.cookie_hash == digest))
        if session_hash is not None:
            connection.execute(delete(user_sessions)
                               .where(user_sessions.c.token_hash == session_hash))


def cookie_options(req: Request) -> dict[str, Any]:
    return {"httponly": True, "samesite": "Lax", "secure": req.is_secure, "path": PREFIX}


def form_key(engine: Engine) -> str:
    """The deployment's console key, made by the first process that asks."""
    with engine.connect() as connection:
        found = connection.execute(select(console_keys.c.secret)
                                   .where(console_keys.c.name == "console")).scalar()
    if found is not None:
        return str(found)
    try:
        with engine.begin() as connection:
            connection.execute(insert(console_keys).values(
                name="console", secret=secrets.token_urlsafe(48), created_at=datetime.now(UTC)))
    except sqlalchemy.exc.IntegrityError:
        pass  # another process made it first: theirs is the key
    return form_key(engine)


class FormCookie(SecureCookieSessionInterface):
    """Flask's signed cookie session, for the console's pages only (the API has none),
    signed with the key from the database, with the console cookie's attributes."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._key: str | None = None

    def key(self) -> str:
        if self._key is None:
            self._key = form_key(self.engine)
        return self._key

    def get_signing_serializer(self, app: Flask) -> Any:
        from itsdangerous import URLSafeTimedSerializer

        return URLSafeTimedSerializer(self.key(), salt=self.salt, serializer=self.serializer,
                                      signer_kwargs={"key_derivation": self.key_derivation,
                                                     "digest_method": self.digest_method})

    def open_session(self, app: Flask, request: Request) -> Any:
        if not is_console(request.path):
            return None  # the API keeps no session: Flask's null session
        return super().open_session(app, request)

    def get_cookie_name(self, app: Flask) -> str:
        return FORM_COOKIE

    def get_cookie_path(self, app: Flask) -> str:
        return PREFIX

    def get_cookie_httponly(self, app: Flask) -> bool:
        return True

    def get_cookie_samesite(self, app: Flask) -> str:
        return "Lax"

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(request.is_secure)
