"""People sign in for a 12-hour bearer token; wrong passwords, disabled people, expired
sessions are refused without telling whether the login exists; five wrong passwords in a
row lock a login for 15 minutes."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from domain.access import EVERY_SITE, Scope
from infrastructure.store.bootstrap import bootstrap
from infrastructure.store.people import create_user, disable_user, sign_in
from tests.conftest import settings_for
from tests.e2e import payloads as p
from tests.e2e.conftest import Client
from tests.e2e.test_lifecycle import enrol

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def trialog(server):
    t = bootstrap(settings_for(server.database))
    yield t
    t.close()


def person(trialog, role: str = "coordinator", scope: Scope = EVERY_SITE) -> str:
    login = f"{role}.{uuid.uuid4().hex[:8]}"
    create_user(trialog.engine, login, "Ada Lovelace", role, scope, PASSWORD)
    return login


def signed_in(server, login: str, password: str = PASSWORD) -> Client:
    answer = Client(server.url, None).post("/v1/sessions", {"login": login,
                                                           "password": password})
    assert answer.status_code == 201, answer.text
    return Client(server.url, answer.json()["token"])


def attempt(server, login: str, password: str):
    return Client(server.url, None).post("/v1/sessions", {"login": login,
                                                         "password": password})


def test_a_person_signs_in_and_acts_under_their_login(server, trialog):
    login = person(trialog, "coordinator", Scope.of(["CASE"]))
    answer = attempt(server, login, PASSWORD)
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["token"].startswith("tls_") and PASSWORD not in answer.text
    assert (body["login"], body["role"], body["sites"], body["all_sites"]) == (
        login, "coordinator", ["CASE"], False)
    expires = datetime.fromisoformat(body["expires_at"])
    assert timedelta(hours=11, minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=12)
    client = Client(server.url, body["token"])
    pid, _ = enrol(client)
    history = client.get(f"/v1/participants/{pid}/history").json()["events"]
    assert {e["actor"] for e in history} == {login}
    # Its sites: a METRO screening is refused, a METRO participant does not exist for it.
    metro_pid, _ = enrol(server.client("admin"), "METRO")
    assert client.command("ScreenParticipant", p.participant_id("METRO"),
                          p.screening("METRO")).json()["error"] == "site_not_allowed"
    assert client.get(f"/v1/participants/{metro_pid}").status_code == 404
    everyone = signed_in(server, person(trialog, "auditor"))
    assert everyone.get(f"/v1/participants/{metro_pid}").status_code == 200


def test_refusals_say_nothing_about_whether_the_login_exists(server, trialog):
    login = person(trialog)
    disabled = person(trialog)
    disable_user(trialog.engine, disabled)
    answers = [attempt(server, login, "wrong password here"),
               attempt(server, f"nobody-{uuid.uuid4().hex[:8]}", PASSWORD),
               attempt(server, disabled, PASSWORD)]
    assert [a.status_code for a in answers] == [401, 401, 401]
    assert len({a.text for a in answers}) == 1
    assert answers[0].json() == {"error": "unauthorized",
                                 "message": "the login or password is not valid"}
    assert answers[0].headers["WWW-Authenticate"].startswith("Bearer")


def test_five_wrong_passwords_lock_a_login_known_or_not(server, trialog):
    login = person(trialog)
    unknown = f"nobody-{uuid.uuid4().hex[:8]}"
    for name in (login, unknown):
        statuses = [attempt(server, name, f"wrong-{n}-password").status_code
                    for n in range(5)]
        assert statuses == [401, 401, 401, 401, 423]
        locked = attempt(server, name, PASSWORD)  # even the right password, while locked
        assert locked.status_code == 423, locked.text
        assert locked.json()["error"] == "account_locked"
        assert 0 < int(locked.headers["Retry-After"]) <= 15 * 60
    # Each failure is logged with the reason, which the caller was not told; never the
    # password.
    failures = [json.loads(line) for line in server.log_lines()
                if '"login failed"' in line and login in line]
    assert [f["reason"] for f in failures] == ["wrong_password"] * 5 + ["locked"]
    assert not any("wrong-0-password" in line or PASSWORD in line
                   for line in server.log_lines())


def test_a_signature_locked_out_says_when_to_try_again_as_sign_in_does(server, trialog):
    login = person(trialog, "investigator")
    investigator = signed_in(server, login)
    pid, _ = enrol(server.client("admin"))
    sign = {"visit": "baseline", "meaning": "I approve this visit's data",
            "password": "not the password"}
    statuses = [investigator.command("SignVisit", pid, sign).status_code for _ in range(5)]
    assert statuses == [401, 401, 401, 401, 423]
    locked = investigator.command("SignVisit", pid, {**sign, "password": PASSWORD})
    assert (locked.status_code, locked.json()["error"]) == (423, "account_locked")
    assert 0 < int(locked.headers["Retry-After"]) <= 15 * 60


def test_a_lock_ends_after_15_minutes_and_a_success_clears_the_count(server, trialog):
    login = person(trialog)
    past = datetime.now(UTC) - timedelta(minutes=16)
    for _ in range(4):
        attempt(server, login, "wrong password again")
    signed_in(server, login)  # the fifth would lock; a success starts the count again
    for _ in range(4):
        assert attempt(server, login, "wrong password again").status_code == 401
    assert attempt(server, login, "wrong password again").status_code == 423
    # As if the lock had started 16 minutes ago: a lock set in the past has ended.
    login2 = person(trialog)
    from infrastructure.store.people import AccountLocked, LoginFailed

    for n in range(5):
        with pytest.raises(AccountLocked if n == 4 else LoginFailed):
            sign_in(trialog.engine, login2, "wrong password again", now=past)
    signed_in(server, login2)


def test_disabling_a_person_and_expired_sessions_act_on_the_next_request(server, trialog):
    login = person(trialog)
    client = signed_in(server, login)
    assert client.get("/v1/participants", limit=1).status_code == 200
    disable_user(trialog.engine, login)
    refused = client.get("/v1/participants", limit=1)
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
    other = person(trialog)
    old = sign_in(trialog.engine, other, PASSWORD,
                  now=datetime.now(UTC) - timedelta(hours=12, seconds=1))
    assert Client(server.url, old.token).get("/v1/participants").status_code == 401
    fresh = sign_in(trialog.engine, other, PASSWORD,
                    now=datetime.now(UTC) - timedelta(hours=11, minutes=59))
    assert Client(server.url, fresh.token).get("/v1/participants").status_code == 200


def test_a_sign_in_needs_a_login_and_a_password(server):
    answer = Client(server.url, None).post("/v1/sessions", {"login": "someone"})
    assert answer.status_code == 422
    assert answer.json()["fields"] == {"password": ["Missing data for required field."]}
    bad = Client(server.url, None).post("/v1/sessions", {"login": "a\x00b", "password": "x"})
    assert bad.status_code == 422 and "login" in bad.json()["fields"]


def test_admins_may_not_sign_and_each_new_role_has_its_commands():
    from infrastructure.store.tokens import COMMANDS_BY_ROLE, CONTACT_ROLES

    assert "SignVisit" in COMMANDS_BY_ROLE["investigator"]
    assert not {"SignVisit", "SignCasebook"} & COMMANDS_BY_ROLE["admin"]
    assert "LockDatabase" in COMMANDS_BY_ROLE["data_manager"]
    assert COMMANDS_BY_ROLE["coordinator"] < COMMANDS_BY_ROLE["investigator"]
    assert COMMANDS_BY_ROLE["monitor"] < COMMANDS_BY_ROLE["data_manager"]
    assert "investigator" in CONTACT_ROLES and "data_manager" not in CONTACT_ROLES


def test_attempts_sent_at_once_check_at_most_five_passwords(server, trialog):
    from concurrent.futures import ThreadPoolExecutor

    login = person(trialog)
    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(lambda n: attempt(server, login, f"guess-{n}-wrong")
                                 .status_code, range(20)))
    assert statuses.count(401) <= 5 and statuses.count(423) >= 15, statuses
    checked = [line for line in server.log_lines()
               if '"login failed"' in line and login in line and "wrong_password" in line]
    assert len(checked) <= 5
    assert attempt(server, login, PASSWORD).status_code == 423  # the right one, too late


NEW_PASSWORD = "a new password, twelve or more"


def test_a_person_changes_their_password_and_their_other_sessions_end(server, trialog):
    """With the current password again: the session asking goes on, every other one of
    the person's ends, the old password signs no one in and the new one does."""
    login = person(trialog)
    asking, elsewhere = signed_in(server, login), signed_in(server, login)
    bystander = signed_in(server, person(trialog))
    changed = asking.post("/v1/sessions/password", {"password": PASSWORD,
                                                    "new_password": NEW_PASSWORD})
    assert (changed.status_code, changed.text) == (204, "")
    assert asking.get("/v1/participants", limit=1).status_code == 200
    assert elsewhere.get("/v1/participants", limit=1).status_code == 401
    assert bystander.get("/v1/participants", limit=1).status_code == 200
    assert attempt(server, login, PASSWORD).status_code == 401
    signed_in(server, login, NEW_PASSWORD)
    assert not any(NEW_PASSWORD in line or PASSWORD in line for line in server.log_lines())
    assert any('"password changed"' in line and login in line for line in server.log_lines())


def test_a_password_change_names_the_rule_a_new_password_breaks(server, trialog):
    login = person(trialog)
    client = signed_in(server, login)
    for new, rule in (("short", "must be 12-1024 characters"),
                      (PASSWORD, "must differ from the current password")):
        refused = client.post("/v1/sessions/password", {"password": PASSWORD,
                                                        "new_password": new})
        assert refused.status_code == 422
        assert refused.json()["fields"] == {"new_password": [rule]}
    missing = client.post("/v1/sessions/password", {"new_password": NEW_PASSWORD})
    assert missing.json()["fields"] == {"password": ["Missing data for required field."]}
    signed_in(server, login)  # nothing changed


def test_a_wrong_current_password_is_counted_and_a_machine_token_has_none(server, trialog):
    login = person(trialog)
    client = signed_in(server, login)
    wrong = {"password": "not the password", "new_password": NEW_PASSWORD}
    statuses = [client.post("/v1/sessions/password", wrong) for _ in range(5)]
    assert [s.status_code for s in statuses] == [401, 401, 401, 401, 423]
    assert statuses[0].json()["error"] == "reauthentication_failed"
    assert 0 < int(statuses[-1].headers["Retry-After"]) <= 15 * 60
    assert attempt(server, login, PASSWORD).status_code == 423  # the login is locked
    machine = server.client("coordinator").post("/v1/sessions/password", {
        "password": PASSWORD, "new_password": NEW_PASSWORD})
    assert (machine.status_code, machine.json()["error"]) == (403, "forbidden")
    # a machine token has no password to change, whatever its body holds
    for body in ({}, {"password": PASSWORD, "new_password": "short"}):
        malformed = server.client("coordinator").post("/v1/sessions/password", body)
        assert (malformed.status_code, malformed.json()["error"]) == (403, "forbidden")
    assert Client(server.url, None).post("/v1/sessions/password", {
        "password": PASSWORD, "new_password": NEW_PASSWORD}).status_code == 401
