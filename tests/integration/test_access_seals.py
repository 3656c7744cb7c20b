"""Who may call can't be changed in the database without the key: a token, a person or a
session row added or edited there is no one's."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert, select, update

from domain.access import Scope
from infrastructure.console import auth as console
from infrastructure.console.tables import console_sessions
from infrastructure.store.people import HASHER, LoginFailed, create_user, sign_in
from infrastructure.store.tables import tokens, user_sessions, users
from infrastructure.store.tokens import Authenticator, create_token, revoke_token, token_hash

PASSWORD = "correct horse battery staple"


def name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_a_token_row_added_or_edited_in_the_database_is_no_one_s(isolated):
    engine = isolated.engine
    authenticate = Authenticator(engine)
    service = name("lab")
    token = create_token(engine, service, "service", Scope.of(["CASE"]))
    assert authenticate(token).role == "service"
    with engine.begin() as connection:  # given every site and the admin role
        connection.execute(update(tokens).where(tokens.c.name == service)
                           .values(role="admin", sites=None))
    assert authenticate(token) is None
    with engine.begin() as connection:  # a token made up by hand
        connection.execute(insert(tokens).values(
            name=name("made-up"), role="admin", token_hash=token_hash("tlg_made_up"),
            created_at=datetime.now(UTC)))
    assert authenticate("tlg_made_up") is None
    revoked = name("old")
    old = create_token(engine, revoked, "auditor")
    revoke_token(engine, revoked)
    with engine.begin() as connection:  # revoked, then restored by hand
        connection.execute(update(tokens).where(tokens.c.name == revoked)
                           .values(revoked_at=None))
    assert authenticate(old) is None


def test_a_password_hash_put_in_a_person_s_row_signs_no_one_in(isolated):
    engine = isolated.engine
    login = name("ada")
    create_user(engine, login, "Ada Lovelace", "coordinator", Scope.of(["CASE"]), PASSWORD)
    assert sign_in(engine, login, PASSWORD).login == login
    with engine.begin() as connection:
        connection.execute(update(users).where(users.c.login == login)
                           .values(password_hash=HASHER.hash("the intruder's password")))
    with pytest.raises(LoginFailed):
        sign_in(engine, login, "the intruder's password")


def test_a_person_s_role_changed_or_a_session_made_up_authenticates_no_one(isolated):
    engine = isolated.engine
    authenticate = Authenticator(engine)
    login = name("bob")
    create_user(engine, login, "Bob", "coordinator", Scope.of(["CASE"]), PASSWORD)
    session = sign_in(engine, login, PASSWORD)
    assert authenticate(session.token).role == "coordinator"
    with engine.begin() as connection:
        connection.execute(update(users).where(users.c.login == login)
                           .values(role="admin", sites=None))
    assert authenticate(session.token) is None
    with engine.begin() as connection:
        connection.execute(update(users).where(users.c.login == login)
                           .values(role="coordinator", sites='["CASE"]'))
    assert authenticate(session.token).role == "coordinator"  # as sealed: holds again
    with engine.begin() as connection:  # a session of the person's, made up by hand
        connection.execute(insert(user_sessions).values(
            token_hash=token_hash("tls_made_up"), login=login, created_at=datetime.now(UTC),
            expires_at=datetime.now(UTC) + timedelta(hours=1)))
        connection.execute(update(user_sessions)  # and the real one made to last
                           .where(user_sessions.c.token_hash == token_hash(session.token))
                           .values(expires_at=datetime.now(UTC) + timedelta(days=365)))
    assert authenticate("tls_made_up") is None
    assert authenticate(session.token) is None


def test_a_console_cookie_tied_to_another_s_session_is_no_one_s(isolated):
    engine = isolated.engine
    victim, intruder = name("carol"), name("dave")
    for login in (victim, intruder):
        create_user(engine, login, login, "coordinator", Scope.of(["CASE"]), PASSWORD)
    victims_cookie = console.start(engine, victim, PASSWORD, None)
    intruders_cookie = console.start(engine, intruder, PASSWORD, None)
    assert console.person(engine, intruders_cookie).principal.name == intruder
    with engine.begin() as connection:
        victims = connection.execute(select(console_sessions.c.session_hash).where(
            console_sessions.c.cookie_hash == token_hash(victims_cookie))).scalar_one()
        connection.execute(update(console_sessions)
                           .where(console_sessions.c.cookie_hash == token_hash(intruders_cookie))
                           .values(session_hash=victims, login=victim))
    assert console.person(engine, intruders_cookie) is None
    assert console.person(engine, victims_cookie).principal.name == victim


def test_a_console_session_s_last_use_pushed_forward_does_not_escape_the_idle_timeout(
        isolated):
    engine = isolated.engine
    login = name("erin")
    create_user(engine, login, login, "coordinator", Scope.of(["CASE"]), PASSWORD)
    cookie = console.start(engine, login, PASSWORD, None)
    later = datetime.now(UTC) + timedelta(hours=2)  # idle far past the timeout by then
    with engine.begin() as connection:
        connection.execute(update(console_sessions)
                           .where(console_sessions.c.cookie_hash == token_hash(cookie))
                           .values(last_seen_at=later))
    assert console.person(engine, cookie, now=later + timedelta(minutes=1)) is None


def test_a_changed_row_is_not_sealed_again_by_a_revocation_or_a_disable(isolated):
    from infrastructure.store.people import disable_user
    from infrastructure.store.tokens import TokenError

    engine = isolated.engine
    service, login = name("lab"), name("fay")
    create_token(engine, service, "service", Scope.of(["CASE"]))
    create_user(engine, login, login, "coordinator", Scope.of(["CASE"]), PASSWORD)
    with engine.begin() as connection:
        connection.execute(update(tokens).where(tokens.c.name == service).values(role="admin"))
        connection.execute(update(users).where(users.c.login == login).values(role="admin"))
    with pytest.raises(TokenError, match="fails its seal"):
        revoke_token(engine, service)
    with pytest.raises(TokenError, match="fails its seal"):
        disable_user(engine, login)
