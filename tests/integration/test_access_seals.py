"""Who may call can't be changed in the database without the key: a token, a person or a
session row added or edited there is no one's."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert, select, text, update

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


def rows_of(engine, table, where):
    with engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(select(table).where(where))]


def put_back(engine, table, key, rows):
    """Rows as they were saved, seals and all (a backup's, say), put back."""
    from sqlalchemy import delete

    with engine.begin() as connection:
        for row in rows:
            connection.execute(delete(table).where(table.c[key] == row[key]))
            connection.execute(insert(table).values(**row))


def signed_in_twice_and_saved(engine, prefix: str):
    """A person signed in over the API and in the console: their login, session token,
    console cookie, and their rows in the three tables as saved then."""
    login = name(prefix)
    create_user(engine, login, login, "coordinator", Scope.of(["CASE"]), PASSWORD)
    session = sign_in(engine, login, PASSWORD)
    cookie = console.start(engine, login, PASSWORD, None)
    saved = {table: rows_of(engine, table, table.c.login == login)
             for table in (users, user_sessions, console_sessions)}
    return login, session, cookie, saved


def put_all_back(engine, saved) -> None:
    for table, key in ((users, "login"), (user_sessions, "token_hash"),
                       (console_sessions, "cookie_hash")):
        put_back(engine, table, key, saved[table])


def test_a_revoked_token_s_row_put_back_as_it_was_is_still_refused(isolated, caplog):
    engine = isolated.engine
    service = name("lab")
    token = create_token(engine, service, "service", Scope.of(["CASE"]))
    authenticate = Authenticator(engine)
    assert authenticate(token).name == service
    saved = rows_of(engine, tokens, tokens.c.name == service)
    revoke_token(engine, service)
    assert authenticate(token) is None
    put_back(engine, tokens, "name", saved)
    with caplog.at_level("WARNING", "trialog.access"):
        assert authenticate(token) is None
        assert Authenticator(engine)(token) is None  # nothing kept from before
    assert "a revoked token's or a disabled person's row was put back" in caplog.text
    other = name("lab")  # the register refuses no one else
    assert authenticate(create_token(engine, other, "service", Scope.of(["CASE"]))).name == other


def test_a_disabled_person_s_rows_put_back_sign_no_one_in(isolated):
    from infrastructure.store.people import disable_user

    engine = isolated.engine
    login, session, cookie, saved = signed_in_twice_and_saved(engine, "gus")
    disable_user(engine, login)
    put_all_back(engine, saved)
    assert Authenticator(engine)(session.token) is None
    assert console.person(engine, cookie) is None
    with pytest.raises(LoginFailed):
        sign_in(engine, login, PASSWORD)


def test_rows_put_back_from_before_a_password_change_take_the_old_password_no_more(
        isolated, caplog):
    """A leaked password changed, then the person's rows put back as saved before (seals
    and all): the access register counts the change, so neither the old password nor
    the sessions of then are taken; the new password is. Each change is in the
    register, with who made it."""
    from infrastructure.store.people import change_password, reset_password

    engine = isolated.engine
    login, session, cookie, saved = signed_in_twice_and_saved(engine, "ivy")
    change_password(engine, login, PASSWORD, "changed once, after a leak")
    reset_password(engine, login, "reset by an administrator")
    [row] = rows_of(engine, users, users.c.login == login)
    assert row["password_set"] == 2
    put_all_back(engine, saved)
    with caplog.at_level("WARNING", "trialog.access"):
        assert Authenticator(engine)(session.token) is None
        assert console.person(engine, cookie) is None
        with pytest.raises(LoginFailed):
            sign_in(engine, login, PASSWORD)
    assert "from before a change of their password was put back" in caplog.text
    register = isolated.service.access_register()
    changes = [(e.login, e.generation, e.actor) for e in isolated.service.repository
               .event_store.get(register.id) if type(e).__name__ == "PasswordChanged"]
    assert changes == [(login, 1, login), (login, 2, "trialog user password")]
    put_back(engine, users, "login", [row])  # the row as the reset left it
    assert sign_in(engine, login, "reset by an administrator").login == login


def made_as_before_grants(engine, table, **row):
    """A token's or a person's row as a release before 0036 made it: sealed, with no grant
    in the access register."""
    from infrastructure.store.access_seals import seals_for

    seals = seals_for(engine)
    seal = (seals.token(row["name"], row["role"], row["token_hash"], row["sites"],
                        revoked=row.get("revoked_at") is not None) if table is tokens else
            seals.user(row["login"], row["full_name"], row["role"], row["sites"],
                       row["password_hash"], disabled=row.get("disabled_at") is not None))
    with engine.begin() as connection:
        connection.execute(insert(table).values(**row, seal=seal))


def test_grants_and_revocations_made_before_the_register_are_recorded_on_upgrade(isolated):
    """Releases before revision 0036 granted by the row alone, and before the register
    revoked by the row alone: the upgrade records them, grants first in the order made,
    once; a row that fails its seal is no one's and is not recorded. A revoked token's
    row put back is then refused."""
    from domain.revocations import AccessRegister, holders
    from infrastructure.store.revocations import Earlier, record_earlier

    engine = isolated.engine
    service, person, made_up = name("lab"), name("zoe"), name("forged")
    token = "tlm_" + uuid.uuid4().hex
    made = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
    made_as_before_grants(engine, users, login=person, full_name="Ada Example",
                          role="investigator", sites='["METRO"]',
                          password_hash=HASHER.hash(PASSWORD), created_at=made)
    made_as_before_grants(engine, tokens, name=service, role="service", sites=None,
                          token_hash=token_hash(token), created_at=made + timedelta(days=1),
                          revoked_at=made + timedelta(days=2))
    with engine.begin() as connection:  # a row added in the database: no seal
        connection.execute(insert(tokens).values(
            name=made_up, role="admin", token_hash=token_hash(made_up), sites=None,
            created_at=made))
    assert record_earlier(isolated) == Earlier(grants=2, revocations=1)
    assert record_earlier(isolated) == Earlier()
    saved = rows_of(engine, tokens, tokens.c.name == service)
    put_back(engine, tokens, "name", saved)
    assert Authenticator(engine)(token) is None
    register = isolated.service.access_register()
    assert register.names_granted == [person, service]
    assert register.refused == [service]
    events = list(isolated.service.repository.event_store.get(register.id))[1:]
    assert [(type(e), e.actor) for e in events] == [
        (AccessRegister.PersonGranted, "trialog db upgrade"),
        (AccessRegister.TokenGranted, "trialog db upgrade"),
        (AccessRegister.TokenRevoked, "trialog db upgrade")]
    assert (events[0].login, events[0].full_name, events[0].role, events[0].sites) == (
        person, "Ada Example", "investigator", ["METRO"])
    assert (events[1].name, events[1].role, events[1].sites) == (service, "service", None)
    assert events[0].reason == ("recorded on upgrade: granted before the register recorded "
                                "grants")
    assert (events[0].granted_at, events[1].granted_at) == (made, made + timedelta(days=1))
    assert events[2].reason == ("recorded on upgrade: done at 2026-03-03T09:30:00+00:00, "
                                "before the register")
    listed = holders(events)  # as made, not as recorded on upgrade
    assert [(h["name"], h["granted_at"], h["ended_at"] == events[2].timestamp)
            for h in listed] == [(person, made, False), (service, made + timedelta(days=1),
                                                         True)]
    assert [h["name"] for h in holders(events, as_of=made + timedelta(hours=1))] == [person]


def test_each_grant_is_recorded_in_the_register_with_its_role_and_sites(isolated):
    """A token made and a person given a login are recorded in the access register in
    the transaction that writes their rows, with a command's record beside each; a name
    taken is refused and records nothing."""
    from domain.revocations import AccessRegister
    from infrastructure.audit.verification import check_store
    from infrastructure.store.tokens import TokenError

    t = isolated
    engine = t.engine
    service, person = name("lab"), name("ada")
    create_token(engine, service, "service", Scope.of(["METRO", "CASE"]))
    create_user(engine, person, "  Ada Example ", "monitor", Scope.of(None), PASSWORD)
    register = t.service.access_register()
    events = list(t.service.repository.event_store.get(register.id))
    assert [type(e) for e in events] == [AccessRegister.RegisterOpened,
                                         AccessRegister.TokenGranted,
                                         AccessRegister.PersonGranted]
    token_granted, person_granted = events[1:]
    assert (token_granted.name, token_granted.role, token_granted.sites,
            token_granted.actor) == (service, "service", ["CASE", "METRO"],
                                     "trialog token create")
    assert (person_granted.login, person_granted.full_name, person_granted.role,
            person_granted.sites, person_granted.actor) == (
        person, "Ada Example", "monitor", None, "trialog user create")
    [row] = rows_of(engine, tokens, tokens.c.name == service)
    assert abs(row["created_at"].replace(tzinfo=UTC) - token_granted.timestamp) < timedelta(
        seconds=5)
    for taken in (lambda: create_token(engine, person, "service", Scope.of(["CASE"])),
                  lambda: create_user(engine, service, "Someone", "monitor",
                                      Scope.of(["CASE"]), PASSWORD)):
        with pytest.raises(TokenError, match="already exists"):
            taken()
    assert t.service.access_register().version == 3
    assert access_records(t) == 2
    assert check_store(t).ok


def access_records(t) -> int:
    """How many commands' records the access register's events have beside them."""
    with t.engine.connect() as connection:
        return connection.execute(text(
            "SELECT count(*) FROM trialog_commands WHERE participant_id = :key"),
            {"key": f"access:{t.protocol.study_id}"}).scalar()


def test_a_grant_refused_by_the_access_tables_leaves_no_event_record_or_row(isolated):
    """A name the register never granted but a row holds (made by a release before
    0036, not recorded yet): the grant is decided, then refused by the row's table in
    the same transaction, and neither its event, its command's record nor a row is left."""
    from infrastructure.store.tokens import TokenError

    t = isolated
    engine = t.engine
    taken = name("lab")
    made_as_before_grants(engine, tokens, name=taken, role="service", sites='["CASE"]',
                          token_hash="1" * 64, created_at=datetime.now(UTC))
    create_token(engine, name("lab"), "service", Scope.of(["CASE"]))  # the register opened
    version = t.service.access_register().version
    recorded = access_records(t)
    for attempt in (lambda: create_token(engine, taken, "admin"),
                    lambda: create_user(engine, taken, "Someone", "admin", Scope.of(None),
                                        PASSWORD)):
        with pytest.raises(TokenError, match="already exists"):
            attempt()
    assert t.service.access_register().version == version
    assert access_records(t) == recorded
    assert [row["role"] for row in rows_of(engine, tokens, tokens.c.name == taken)] == [
        "service"]
    assert rows_of(engine, users, users.c.login == taken) == []


def test_a_register_cut_back_then_grown_past_where_a_process_read_it_is_read_whole(
        isolated):
    """The register restored to an earlier version while a process runs, then grown past
    the version that process last read: the process reads it whole, so a revocation
    recorded after the restore is not missed (read on from its last copy, it was, and the
    revoked token's row put back was let in)."""
    from sqlalchemy import delete

    from domain.revocations import register_uuid
    from infrastructure.store.stored import events_table

    t = isolated
    engine = t.engine
    kept = create_token(engine, name("lab"), "service", Scope.of(["CASE"]))
    for _ in range(2):
        create_token(engine, name("lab"), "service", Scope.of(["CASE"]))
    authenticate = Authenticator(engine)
    assert authenticate(kept).role == "service"  # the register read at version 4
    assert t.service.access_register().version == 4
    events = events_table(t.service.recorder)
    with engine.begin() as connection:  # back to version 2, records and all
        connection.execute(delete(events).where(
            events.c.originator_id == register_uuid(t.protocol.study_id),
            events.c.originator_version > 2))
        newest = connection.execute(text(
            "SELECT command_id FROM trialog_commands WHERE participant_id = :key "
            "ORDER BY recorded_at DESC LIMIT 2"),
            {"key": f"access:{t.protocol.study_id}"}).scalars().all()
        for command_id in newest:
            connection.execute(text("DELETE FROM trialog_commands WHERE command_id = :c"),
                               {"c": command_id})
    assert t.service.access_register().version == 2
    revoked = name("lab")
    token = create_token(engine, revoked, "service", Scope.of(["CASE"]))  # version 3
    saved = rows_of(engine, tokens, tokens.c.name == revoked)
    revoke_token(engine, revoked)  # version 4
    create_token(engine, name("lab"), "service", Scope.of(["CASE"]))  # version 5
    put_back(engine, tokens, "name", saved)
    assert authenticate(token) is None
    assert authenticate(kept).role == "service"


def test_the_register_s_list_refuses_a_person_of_some_sites_and_says_it_can_t_be_read(
        isolated):
    """GET /v1/audit/register: a person of some sites is refused, named as a person; an
    event of the register that no longer decrypts is a 500 that says what to run."""
    from domain.revocations import register_uuid
    from infrastructure.api import create_app
    from infrastructure.store.stored import events_table

    t = isolated
    auditor, person = name("auditor"), name("aud")
    token = create_token(t.engine, auditor, "auditor")
    create_user(t.engine, person, "Ann Lee", "auditor", Scope.of(["CASE"]), PASSWORD)
    client = create_app(t, follow=False).test_client()
    session = client.post("/v1/sessions", json={"login": person, "password": PASSWORD})
    refused = client.get("/v1/audit/register",
                         headers={"Authorization": f"Bearer {session.json['token']}"})
    assert refused.status_code == 403
    assert refused.json["message"] == (
        f"person {person!r} may not read the access register: it is the deployment's, "
        "read by callers of every site")
    headers = {"Authorization": f"Bearer {token}"}
    listed = client.get("/v1/audit/register", headers=headers)
    assert [h["name"] for h in listed.json["holders"]] == [auditor, person]
    table = events_table(t.service.recorder)
    with t.engine.begin() as connection:  # its first event garbled: it no longer decrypts
        connection.execute(update(table).where(
            table.c.originator_id == register_uuid(t.protocol.study_id),
            table.c.originator_version == 1).values(state=b"garbled"))
    unreadable = client.get("/v1/audit/register", headers=headers)
    assert (unreadable.status_code, unreadable.json["error"]) == (500, "record_unreadable")
    assert "`trialog audit verify` names the event" in unreadable.json["message"]


@pytest.mark.parametrize("granted", ["token", "person"])
def test_migration_0036_is_not_undone_once_a_grant_is_in_the_register(isolated, granted):
    engine = isolated.engine
    if granted == "token":
        create_token(engine, name("lab"), "service", Scope.of(["CASE"]))
    else:
        create_user(engine, name("ada"), "Ada", "monitor", Scope.of(["CASE"]), PASSWORD)
    with pytest.raises(RuntimeError, match="records 1 grants since revision 0036"):
        downgrade_to(engine, "0035")


def test_the_register_verifies_and_its_last_event_deleted_is_found(isolated):

    from domain.revocations import register_uuid
    from infrastructure.audit.verification import check_store
    from infrastructure.store.people import disable_user

    t = isolated
    engine = t.engine
    create_token(engine, name("lab"), "service", Scope.of(["CASE"]))
    first, second = name("lab"), name("hal")
    create_token(engine, first, "service", Scope.of(["CASE"]))
    create_user(engine, second, second, "monitor", Scope.of(["CASE"]), PASSWORD)
    revoke_token(engine, first)
    disable_user(engine, second)
    assert check_store(t, processes=1).ok
    last = delete_the_register_s_last_event(t)
    [problem] = check_store(t, processes=1).problems
    assert (problem.kind, problem.stream, problem.version) == (
        "deleted", str(register_uuid(t.protocol.study_id)), last)


def delete_the_register_s_last_event(t, *also) -> int:
    """Its version; ``also``: statements run in the same transaction."""
    from sqlalchemy import delete, func

    from domain.revocations import register_uuid
    from infrastructure.store.stored import events_table

    table = events_table(t.service.recorder)
    stream = register_uuid(t.protocol.study_id)
    with t.engine.begin() as connection:
        last = connection.execute(select(func.max(table.c.originator_version))
                                  .where(table.c.originator_id == stream)).scalar()
        connection.execute(delete(table).where(table.c.originator_id == stream,
                                               table.c.originator_version == last))
        for statement in also:
            connection.execute(statement)
    return int(last)


def test_a_register_that_can_t_be_read_refuses_every_caller(isolated, caplog):
    from domain.revocations import register_uuid
    from infrastructure.store.stored import events_table

    t = isolated
    engine = t.engine
    kept = create_token(engine, name("lab"), "service", Scope.of(["CASE"]))
    assert Authenticator(engine)(kept).role == "service"
    revoked = name("old")
    create_token(engine, revoked, "service", Scope.of(["CASE"]))
    revoke_token(engine, revoked)  # the register moves on: read again at the next call
    table = events_table(t.service.recorder)
    with engine.begin() as connection:  # its state garbled: it no longer decrypts
        connection.execute(update(table).where(
            table.c.originator_id == register_uuid(t.protocol.study_id))
            .values(state=b"garbled"))
    with caplog.at_level("ERROR", "trialog.access"):
        assert Authenticator(engine)(kept) is None
    assert "the access register can't be read: every caller is refused" in caplog.text



def test_a_register_cut_back_below_what_a_process_saw_refuses_every_caller(isolated, caplog):
    """The register's last event deleted with its command's record (which verify would
    otherwise compare): the process that saw the newer version refuses everyone."""
    from sqlalchemy import delete

    from infrastructure.store.tables import command_records

    t = isolated
    engine = t.engine
    service = name("lab")
    token = create_token(engine, service, "service", Scope.of(["CASE"]))
    saved = rows_of(engine, tokens, tokens.c.name == service)
    kept = create_token(engine, name("lab"), "service", Scope.of(["CASE"]))
    revoke_token(engine, service)
    authenticate = Authenticator(engine)
    assert authenticate(kept).role == "service"  # the register read at its newest version
    last = delete_the_register_s_last_event(t, delete(command_records).where(
        command_records.c.participant_id.like("access:%")))
    put_back(engine, tokens, "name", saved)
    with caplog.at_level("ERROR", "trialog.access"):
        assert authenticate(token) is None
        assert authenticate(kept) is None
    assert f"the access register went back from version {last} to {last - 1}" in caplog.text


def test_the_database_unavailable_while_reading_the_register_is_not_a_refusal(
        isolated, monkeypatch):
    """Raised as any look-up's outage is (503 over HTTP), not taken for a caller refused
    or a wrong password."""
    import psycopg
    import sqlalchemy

    engine = isolated.engine
    revoked, login = name("old"), name("ida")
    kept = create_token(engine, name("lab"), "service", Scope.of(["CASE"]))
    create_token(engine, revoked, "service", Scope.of(["CASE"]))
    create_user(engine, login, login, "coordinator", Scope.of(["CASE"]), PASSWORD)
    revoke_token(engine, revoked)  # the register moves on: read again at the next call

    def unavailable(*_: object) -> None:
        try:
            raise psycopg.OperationalError("connection refused")
        except psycopg.OperationalError as error:  # as SQLAlchemy raises it
            raise sqlalchemy.exc.OperationalError("SELECT", {}, error) from error

    monkeypatch.setattr(isolated.service, "access_register", unavailable)
    with pytest.raises(sqlalchemy.exc.OperationalError):
        Authenticator(engine)(kept)
    with pytest.raises(sqlalchemy.exc.OperationalError):
        sign_in(engine, login, PASSWORD)
    monkeypatch.undo()
    assert Authenticator(engine)(kept).role == "service"
    assert sign_in(engine, login, PASSWORD).login == login


@pytest.mark.parametrize("rendered", [False, True])
def test_the_register_s_events_are_in_the_feed_of_readers_of_every_site_only(isolated,
                                                                             rendered):
    """Who was granted access, revoked or disabled is the deployment's, not a site's: a
    reader of some sites sees none of it, read from the store or from rm_feed."""
    from domain.access import EVERY_SITE
    from infrastructure.audit.feed import Feed, Reader
    from infrastructure.readside.projections import FeedProjection
    from infrastructure.store.people import disable_user
    from infrastructure.store.tables import as_utc

    engine = isolated.engine
    revoked, login = name("lab"), name("jan")
    create_token(engine, revoked, "service", Scope.of(["CASE"]))
    create_user(engine, login, login, "coordinator", Scope.of(["CASE"]), PASSWORD)
    revoke_token(engine, revoked)
    disable_user(engine, login)
    if rendered:
        FeedProjection(isolated).catch_up()
    feed = Feed(isolated)
    every, _ = feed.page(0, 1000, Reader(EVERY_SITE))
    case_only, _ = feed.page(0, 1000, Reader(Scope.of(["CASE"])))
    assert [e["type"] for e in every][-5:] == [
        "org.trialog.RegisterOpened", "org.trialog.TokenGranted",
        "org.trialog.PersonGranted", "org.trialog.TokenRevoked",
        "org.trialog.PersonDisabled"]
    made = {h: as_utc(rows_of(engine, table, key == h)[0]["created_at"])
            for h, table, key in ((revoked, tokens, tokens.c.name),
                                  (login, users, users.c.login))}
    assert every[-4]["data"]["data"] == {"name": revoked, "role": "service",
                                         "sites": ["CASE"],
                                         "granted_at": made[revoked].isoformat()}
    assert every[-3]["data"]["data"] == {"login": login, "full_name": login,
                                         "role": "coordinator", "sites": ["CASE"],
                                         "granted_at": made[login].isoformat()}
    assert every[-2]["data"]["data"] == {"name": revoked}
    assert every[-1]["data"]["data"] == {"login": login}
    assert not [e for e in case_only if e["type"].endswith((
        "RegisterOpened", "Granted", "TokenRevoked", "PersonDisabled"))]
    # The register's subject is its own: the trial's stream (the database lock) had the
    # same one, two chains under one subject that a consumer checking it took for
    # tampering.
    study = isolated.protocol.study_id
    isolated.bus.dispatch_trial("LockDatabase", command_id=str(uuid.uuid4()), actor="dm",
                                reason="final analysis")
    if rendered:
        FeedProjection(isolated).catch_up()
    every, _ = feed.page(0, 1000, Reader(EVERY_SITE))
    assert {e["subject"] for e in every if e["type"].endswith(("RegisterOpened",
                                                                "PersonDisabled"))} == {
        f"access/{study}"}
    assert {e["subject"] for e in every if e["type"].endswith("DatabaseLocked")} == {study}
    last: dict[str, str] = {}
    for e in every:  # each subject's events chain, as a consumer checks them
        assert e["previousdigest"] == last.get(e["subject"], ""), e
        last[e["subject"]] = e["digest"]


def test_a_password_is_kept_peppered_and_an_older_hash_is_replaced_at_sign_in(isolated):
    """The Argon2 hash is of the password's keyed MAC: a guess can't be checked against
    it without the key. A hash made before the pepper still signs its person in, once,
    and is then replaced."""
    from argon2.exceptions import VerificationError

    from infrastructure.store.access_seals import seals_for
    from infrastructure.store.people import PEPPERED

    engine = isolated.engine
    fresh, older = name("kim"), name("lee")
    for login in (fresh, older):
        create_user(engine, login, login, "coordinator", Scope.of(["CASE"]), PASSWORD)
    [stored] = [row["password_hash"] for row in rows_of(engine, users, users.c.login == fresh)]
    assert stored.startswith(PEPPERED + "$argon2id$")
    with pytest.raises(VerificationError):  # the password alone is not what was hashed
        HASHER.verify(stored.removeprefix(PEPPERED), PASSWORD)
    assert HASHER.verify(stored.removeprefix(PEPPERED), seals_for(engine).pepper(PASSWORD))
    hashed_as_before_the_pepper(engine, older)
    assert sign_in(engine, older, PASSWORD).login == older
    [row] = rows_of(engine, users, users.c.login == older)
    assert row["password_hash"].startswith(PEPPERED)
    assert sign_in(engine, older, PASSWORD).login == older  # the new hash signs in too
    with pytest.raises(LoginFailed):
        sign_in(engine, older, "not the password at all")


def hashed_as_before_the_pepper(engine, login: str) -> None:
    """The person's password hashed and sealed as a release before the pepper kept it."""
    from infrastructure.store.access_seals import seals_for

    [row] = rows_of(engine, users, users.c.login == login)
    unpeppered = HASHER.hash(PASSWORD)
    with engine.begin() as connection:
        connection.execute(update(users).where(users.c.login == login).values(
            password_hash=unpeppered, seal=seals_for(engine).user(
                login, row["full_name"], row["role"], row["sites"], unpeppered,
                disabled=False)))


def test_a_look_up_that_read_the_register_before_a_revocation_is_judged_at_its_newest(
        isolated, caplog):
    """A request's statement read version v; another thread has since seen v + 1: the
    register is read again, not taken for cut back."""
    from infrastructure.store.revocations import revocations_for

    engine = isolated.engine
    kept = name("lab")
    token = create_token(engine, kept, "service", Scope.of(["CASE"]))
    for _ in range(2):
        revoked = name("old")
        create_token(engine, revoked, "service", Scope.of(["CASE"]))
        revoke_token(engine, revoked)
    assert Authenticator(engine)(token).name == kept  # the register seen at version 3
    with caplog.at_level("ERROR", "trialog.access"):
        assert not revocations_for(engine).refuses(kept, 2)
        assert revocations_for(engine).refuses(revoked, 2)  # judged at version 3
    assert "went back" not in caplog.text


def test_a_signature_s_re_authentication_replaces_an_older_hash_too(isolated):
    from infrastructure.store.people import PEPPERED, reauthenticate

    engine = isolated.engine
    login = name("max")
    create_user(engine, login, "Max Planck", "investigator", Scope.of(["CASE"]), PASSWORD)
    hashed_as_before_the_pepper(engine, login)
    assert reauthenticate(engine, login, PASSWORD) == "Max Planck"
    [row] = rows_of(engine, users, users.c.login == login)
    assert row["password_hash"].startswith(PEPPERED)
    assert reauthenticate(engine, login, PASSWORD) == "Max Planck"


def test_migration_0027_encrypts_the_hashes_made_before_the_pepper(isolated_url):
    """Read from the database, an older hash can't be checked against guesses without
    the key any more; it still signs its person in once, and is replaced then. A row
    whose seal failed still fails; a peppered hash is left as it is; a downgrade gives the
    older hash back."""
    from argon2.exceptions import InvalidHashError

    from infrastructure.store import migrations
    from infrastructure.store.access_seals import seals_for
    from infrastructure.store.bootstrap import bootstrap
    from infrastructure.store.people import PEPPERED, WRAPPED
    from tests.conftest import settings_for

    app = bootstrap(settings_for(isolated_url), migrate=False)
    engine = app.engine
    try:
        migrations.upgrade(engine, "0026")
        older, forged, kept, restored = (name(n) for n in ("old", "forged", "kept", "back"))
        older = "maría.gonzález-" + "x" * 70 + older  # 100 characters, some of two bytes
        seals = seals_for(engine)
        peppered = PEPPERED + HASHER.hash(seals.pepper(PASSWORD))
        before = {login: HASHER.hash(PASSWORD) for login in (older, forged, restored)}
        before[kept] = peppered
        with engine.begin() as connection:  # the rows as a release at 0026 kept them
            connection.execute(text(
                "INSERT INTO trialog_users (login, full_name, role, sites, password_hash, "
                "created_at, seal) VALUES (:login, :login, 'coordinator', '[\"CASE\"]', "
                ":hash, :at, :seal)"),
                [{"login": login, "hash": stored, "at": datetime.now(UTC),
                  "seal": b"put there without the key" if login == forged else seals.user(
                      login, login, "coordinator", '["CASE"]', stored, disabled=False)}
                 for login, stored in before.items()])
        everyone = users.c.login.in_([older, forged, kept, restored])

        migrations.upgrade(engine)
        after = {row["login"]: row["password_hash"] for row in rows_of(engine, users, everyone)}
        assert after[kept] == before[kept] and after[kept].startswith(PEPPERED)
        for login in (older, forged, restored):
            assert after[login].startswith(WRAPPED) and "argon2" not in after[login]
            with pytest.raises(InvalidHashError):
                HASHER.verify(after[login], PASSWORD)
        assert sign_in(engine, older, PASSWORD).login == older
        [row] = rows_of(engine, users, users.c.login == older)
        assert row["password_hash"].startswith(PEPPERED)
        with pytest.raises(LoginFailed):
            sign_in(engine, forged, PASSWORD)
        with pytest.raises(LoginFailed):
            sign_in(engine, restored, "not the password at all")

        downgrade_to(engine, "0026")
        with engine.connect() as connection:
            [back] = connection.execute(text(
                "SELECT password_hash, seal FROM trialog_users WHERE login = :login"),
                {"login": restored})
        assert back.password_hash == before[restored]
        assert HASHER.verify(back.password_hash, PASSWORD)
        assert bytes(back.seal) == seals.user(restored, restored, "coordinator", '["CASE"]',
                                              before[restored], disabled=False)
    finally:
        app.close()


def downgrade_to(engine, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    from infrastructure.store import migrations

    config = Config()
    config.set_main_option("script_location", str(migrations.HERE))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        config.attributes["engine"] = engine
        command.downgrade(config, revision)


def test_an_access_log_row_changed_or_made_up_in_the_database_is_shown_and_reported(
        isolated):
    """Who was shown whose contact details: a row whose actor was changed, one made up
    (unsealed, or with another row's seal) reads as not intact, and verify reports each;
    the rows the server wrote stay intact."""
    from infrastructure.audit import access
    from infrastructure.audit.verification import check_store
    from infrastructure.store.tables import access_log

    engine = isolated.engine
    pid, other = f"CASE-{uuid.uuid4().hex[:8]}", f"CASE-{uuid.uuid4().hex[:8]}"
    access.record(engine, "coordinator-ada", [pid, other], "GET /v1/feed", "req-1")
    access.record(engine, "coordinator-ada", [pid], f"GET /v1/participants/{pid}", None)
    assert [d["intact"] for d in access.disclosures(engine, pid)] == [True, True]
    assert check_store(isolated, processes=1).ok
    with engine.begin() as connection:
        ids = dict(connection.execute(select(access_log.c.participant_id, access_log.c.id)
                                      .where(access_log.c.endpoint == "GET /v1/feed")).all())
        connection.execute(update(access_log).where(access_log.c.id == ids[other])
                           .values(actor="someone-else"))
        [row] = connection.execute(select(access_log).where(access_log.c.id == ids[pid]))
        connection.execute(insert(access_log), [
            {"at": row.at, "actor": "monitor-max", "participant_id": pid,
             "endpoint": "GET /v1/feed", "request_id": "req-1", "seal": row.seal},
            {"at": row.at, "actor": "monitor-max", "participant_id": pid,
             "endpoint": "GET /v1/feed", "request_id": None, "seal": None}])

    shown = [(d["actor"], d["intact"]) for d in access.disclosures(engine, pid)]
    assert shown == [("monitor-max", False), ("monitor-max", False),
                     ("coordinator-ada", True), ("coordinator-ada", True)]
    assert access.disclosures(engine, other)[0]["intact"] is False
    problems = check_store(isolated, processes=1).problems
    assert sorted((p.kind, p.participant_id) for p in problems) == sorted([
        ("disclosure", other), ("disclosure", pid), ("disclosure", pid)])
    assert "(someone-else shown the contact details" in " ".join(
        p.detail for p in problems)


def test_migration_0028_seals_the_access_log_rows_already_there(isolated_url):
    from infrastructure.audit import access
    from infrastructure.store import migrations
    from infrastructure.store.bootstrap import bootstrap
    from tests.conftest import settings_for

    app = bootstrap(settings_for(isolated_url), migrate=False)
    try:
        migrations.upgrade(app.engine, "0027")
        pids = [f"CASE-{n:04d}" for n in range(2501)]  # three chunks
        with app.engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO trialog_access_log (at, actor, participant_id, endpoint, "
                "request_id) VALUES (:at, 'coordinator-ada', :pid, 'GET /v1/feed', NULL)"),
                [{"at": datetime(2026, 3, 1, 12, 30, 0, 250_000, tzinfo=UTC), "pid": pid}
                 for pid in pids])
        migrations.upgrade(app.engine)
        shown = access.disclosures(app.engine, limit=10_000)
        assert len(shown) == len(pids) and all(d["intact"] for d in shown)
    finally:
        app.close()


def test_a_disabled_person_signing_in_is_refused_as_disabled_with_no_false_alarm(
        isolated, caplog):
    """Their row says disabled: refused for that (the log's reason), not taken for a row
    put back after the register's PersonDisabled."""
    from infrastructure.store.people import disable_user

    engine = isolated.engine
    login = name("gone")
    create_user(engine, login, login, "coordinator", Scope.of(["CASE"]), PASSWORD)
    disable_user(engine, login)
    with caplog.at_level("INFO"), pytest.raises(LoginFailed):
        sign_in(engine, login, PASSWORD)
    assert "put back" not in caplog.text
    assert [r.reason for r in caplog.records if r.getMessage() == "login failed"] == [
        "disabled"]


def test_a_sign_in_checked_before_a_password_change_and_ended_after_it_is_refused(
        isolated, monkeypatch, caplog):
    """The old password checked, then the change commits, then the session is written:
    it was begun under the older password, and is refused."""
    from infrastructure.store import people

    engine = isolated.engine
    login = name("race")
    create_user(engine, login, login, "coordinator", Scope.of(["CASE"]), PASSWORD)
    checked = people._password_checked

    def then_changed(engine, login, password, client, now, doing=None):
        person = checked(engine, login, password, client, now, doing)
        if doing is None:  # the sign-in's check: the person changes it right then
            people.change_password(engine, login, PASSWORD, "changed in between")
        return person

    monkeypatch.setattr(people, "_password_checked", then_changed)
    late = people.sign_in(engine, login, PASSWORD)
    monkeypatch.undo()
    cookie = console.start(engine, login, "changed in between", None)  # no race
    with caplog.at_level("WARNING"):
        assert Authenticator(engine)(late.token) is None
    assert console.person(engine, cookie) is not None
    assert "fails its seal" not in caplog.text  # ended, not tampered with


def test_sessions_alone_put_back_after_a_password_change_are_refused(isolated):
    from infrastructure.store.people import change_password

    engine = isolated.engine
    login, session, cookie, saved = signed_in_twice_and_saved(engine, "kit")
    change_password(engine, login, PASSWORD, "changed, sessions ended")
    put_back(engine, user_sessions, "token_hash", saved[user_sessions])
    put_back(engine, console_sessions, "cookie_hash", saved[console_sessions])
    assert Authenticator(engine)(session.token) is None
    assert console.person(engine, cookie) is None


def test_a_reset_gives_a_row_put_back_from_before_a_change_its_person_again(isolated):
    """Refused while it is behind the register; an administrator's reset counts on from
    the register's count and signs its person in again."""
    from infrastructure.store.people import change_password, reset_password

    engine = isolated.engine
    login, _, _, saved = signed_in_twice_and_saved(engine, "lee")
    change_password(engine, login, PASSWORD, "changed once, then lost")
    put_back(engine, users, "login", saved[users])
    with pytest.raises(LoginFailed):
        sign_in(engine, login, PASSWORD)
    reset_password(engine, login, "a reset after the restore")
    [row] = rows_of(engine, users, users.c.login == login)
    assert row["password_set"] == 2
    assert sign_in(engine, login, "a reset after the restore").login == login


def test_a_change_that_loses_a_race_is_not_counted_as_a_wrong_password(isolated,
                                                                       monkeypatch):
    from domain.errors import InvalidTransition
    from infrastructure.store.people import change_password
    from infrastructure.store.revocations import revocations_for
    from infrastructure.store.tables import login_failures
    from infrastructure.store.tokens import TokenError

    engine = isolated.engine
    login = name("two")
    create_user(engine, login, login, "coordinator", Scope.of(["CASE"]), PASSWORD)

    def another_first(*args, **kwargs):
        raise InvalidTransition("changed 1 times: this change is number 2, not 1")

    monkeypatch.setattr(revocations_for(engine), "change_password", another_first)
    with pytest.raises(TokenError, match="changed meanwhile"):
        change_password(engine, login, PASSWORD, "the change that lost")
    assert rows_of(engine, login_failures, login_failures.c.login == login) == []


def test_migration_0029_is_not_undone_once_a_password_was_changed(isolated):
    from infrastructure.store.people import change_password

    engine = isolated.engine
    login = name("max")
    made_as_before_grants(engine, users, login=login, full_name=login, role="coordinator",
                          sites='["CASE"]', password_hash=HASHER.hash(PASSWORD),
                          created_at=datetime.now(UTC))  # 0036 is undone: no grant in it
    change_password(engine, login, PASSWORD, "changed under 0029")
    with pytest.raises(RuntimeError, match="have changed their password since revision 0029"):
        downgrade_to(engine, "0028")
    [row] = rows_of(engine, users, users.c.login == login)
    assert row["password_set"] == 1
