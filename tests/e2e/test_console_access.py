"""Who may use the console: a person of each role signs in and sees their own sites only;
the session cookie's attributes, CSRF on every form, sign-out, the idle timeout, the lock
after wrong passwords, and a disabled person refused on the next request."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
import requests
from sqlalchemy import select, update

from domain.access import Scope
from infrastructure.console.tables import console_sessions
from infrastructure.store.access_seals import seals_for
from infrastructure.store.people import create_user, disable_user
from infrastructure.store.tokens import ROLES, token_hash
from tests.e2e.console_support import (  # noqa: F401  (fixtures)
    PASSWORD,
    browser,
    console,
    csrf_of,
    follow,
    form_session,
    sign_in,
)
from tests.e2e.test_lifecycle import enrol


@pytest.fixture(scope="module")
def two_sites(console):  # noqa: F811
    return enrol(console.admin, "CASE")[0], enrol(console.admin, "METRO")[0]


@pytest.mark.parametrize("role", ROLES)
def test_each_role_signs_in_and_sees_only_its_own_sites(console, browser, two_sites,  # noqa: F811
                                                        role):
    case_pid, metro_pid = two_sites
    context = browser.new_context()
    try:
        page = sign_in(context, console, console.logins[role])
        assert page.url == console.page_url("/console/")
        assert role.replace("_", " ") in page.get_by_test_id("who").inner_text()
        follow(page.get_by_role("link", name="Participants"))
        listed = page.get_by_test_id("participants").inner_text()
        every_site = role in ("data_manager", "auditor", "admin")
        assert case_pid in listed
        assert (metro_pid in listed) is every_site
        answer = page.goto(console.page_url(f"/console/participants/{metro_pid}"))
        assert answer.status == (200 if every_site else 404)
        answer = page.goto(console.page_url(f"/console/participants/{case_pid}"))
        assert answer.status == 200
        assert page.get_by_test_id("status").inner_text() == "randomized"
    finally:
        context.close()


def test_a_metro_coordinator_sees_metro_only(console, browser, two_sites):  # noqa: F811
    case_pid, metro_pid = two_sites
    context = browser.new_context()
    try:
        page = sign_in(context, console, console.metro_coordinator,
                       path="/console/participants/")
        listed = page.get_by_test_id("participants").inner_text()
        assert metro_pid in listed and case_pid not in listed
        assert page.goto(console.page_url(f"/console/participants/{case_pid}")).status == 404
    finally:
        context.close()


@pytest.mark.parametrize(("role", "form"), [
    ("coordinator", {"type": "LockVisit", "visit": "baseline"}),  # a role's refusal: 403
    ("coordinator", {"type": "CorrectData", "field": "bogus", "value": "x",
                     "event_id": "nope"}),  # a form's refusal: 422
    ("monitor", {"type": "CorrectData", "field": "bogus", "value": "x"}),
])
def test_a_form_posted_for_another_site_s_participant_shows_nothing_of_them(
        console, two_sites, role, form):  # noqa: F811
    """A refused command re-renders its participant's page with the errors: for a
    participant of another site it is the 404 page, whatever refused the command first
    (the page showed the participant, contact details included)."""
    _, metro_pid = two_sites
    session = form_session(console, console.logins[role])  # a CASE person
    csrf = csrf_of(session.get(console.page_url("/console/participants/"), timeout=30).text)
    answer = session.post(console.page_url(f"/console/participants/{metro_pid}/commands"),
                          data={"csrf_token": csrf, **form}, timeout=30,
                          allow_redirects=False)
    assert answer.status_code == 404
    assert metro_pid not in answer.text.replace(f"Participant {metro_pid} was not found", "")
    assert "@" not in answer.text and "1958" not in answer.text


def test_the_session_cookie_is_httponly_lax_and_every_form_needs_its_csrf_token(console):  # noqa: F811
    session = form_session(console, console.logins["monitor"])
    cookie = next(c for c in session.cookies if c.name == "trialog_console")
    assert cookie.has_nonstandard_attr("HttpOnly")
    assert cookie.get_nonstandard_attr("SameSite") == "Lax"
    assert not cookie.secure  # served over plain HTTP here
    page = session.get(console.page_url("/console/"), timeout=30)
    assert page.status_code == 200
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["Cache-Control"] == "no-store"
    forged = session.post(console.page_url("/console/sign-out"), data={}, timeout=30,
                          allow_redirects=False)
    assert forged.status_code == 400
    assert session.get(console.page_url("/console/"), timeout=30,
                       allow_redirects=False).status_code == 200  # still signed in


def test_a_form_left_open_two_hours_of_a_sign_in_is_still_taken(console, two_sites):  # noqa: F811
    """The forms' CSRF tokens expired after an hour (Flask-WTF's default) while the person
    was signed in and busy in another tab: the form was refused and what was typed lost.
    A token now lasts as a sign-in does (12 hours); one older than that is refused."""
    import hashlib
    import time

    from flask.json.tag import TaggedJSONSerializer
    from itsdangerous import TimestampSigner, URLSafeTimedSerializer

    from infrastructure.console.auth import form_key

    session = form_session(console, console.logins["monitor"])
    session.get(console.page_url("/console/participants/"), timeout=30)
    key = form_key(console.engine)
    cookie = session.cookies.get("trialog_console_form")
    raw = URLSafeTimedSerializer(key, salt="cookie-session", serializer=TaggedJSONSerializer(),
                                 signer_kwargs={"key_derivation": "hmac",
                                                "digest_method": hashlib.sha1}
                                 ).loads(cookie)["csrf_token"]

    def token_made_hours_ago(hours: float) -> str:
        class Earlier(TimestampSigner):
            def get_timestamp(self) -> int:
                return int(time.time() - hours * 3600)

        return URLSafeTimedSerializer(key, salt="wtf-csrf-token", signer=Earlier).dumps(raw)

    def raise_blank_query(csrf: str) -> int:  # refused by the API's rule once let through
        return session.post(console.page_url(f"/console/participants/{two_sites[0]}/commands"),
                            timeout=30, allow_redirects=False,
                            data={"csrf_token": csrf, "type": "RaiseQuery", "form": "raise",
                                  "query_id": str(uuid.uuid4()), "target": "visit:baseline",
                                  "text": ""}).status_code

    assert raise_blank_query(token_made_hours_ago(2)) == 422
    assert raise_blank_query(token_made_hours_ago(13)) == 400


def test_a_page_s_parameter_given_twice_is_refused_naming_it(console, two_sites):  # noqa: F811
    """`?status=screened&status=withdrawn` listed the screened participants alone, as if
    the list were whole, as the API did before it refused a repeated parameter."""
    session = form_session(console, console.logins["monitor"])
    for path in ("/console/participants?status=screened&status=withdrawn",
                 f"/console/participants/{two_sites[0]}?version=1&version=2",
                 "/console/?as_of=2026-03-01T00:00&as_of=2026-03-02T00:00"):
        page = session.get(console.page_url(path), timeout=30)
        name = path.split("?")[1].split("=")[0]
        assert page.status_code == 422, path
        assert f"{name}: given 2 times: give one value" in page.text, path
    listed = session.get(console.page_url("/console/participants?status=screened&x=1&x=2"),
                         timeout=30)
    assert listed.status_code == 200  # a parameter no page reads is left alone, as ever


def test_a_form_drawn_before_a_sign_out_is_refused_in_the_next_sign_in(console, two_sites):  # noqa: F811
    """A form's CSRF token stayed good after its person signed out, in their next sign-in
    and in the next person's on the same browser. The secret is drawn anew at each."""
    session = form_session(console, console.logins["monitor"])
    path = console.page_url(f"/console/participants/{two_sites[0]}")
    old = csrf_of(session.get(path, timeout=30).text)
    out = session.post(console.page_url("/console/sign-out"), data={"csrf_token": old},
                       timeout=30, allow_redirects=False)
    assert out.status_code == 303
    for login in (console.logins["monitor"], console.logins["data_manager"]):
        page = session.get(console.page_url("/console/sign-in"), timeout=30)
        signed_in = session.post(console.page_url("/console/sign-in"), timeout=30,
                                 allow_redirects=False,
                                 data={"csrf_token": csrf_of(page.text), "login": login,
                                       "password": PASSWORD, "next": "/console/"})
        assert signed_in.status_code == 303
        stale = session.post(f"{path}/commands", timeout=30, allow_redirects=False,
                             data={"csrf_token": old, "type": "RaiseQuery", "form": "raise",
                                   "query_id": str(uuid.uuid4()), "target": "visit:baseline",
                                   "text": "Sent with a form of an earlier sign-in?"})
        assert stale.status_code == 400, login
        fresh = csrf_of(session.get(path, timeout=30).text)
        assert session.post(console.page_url("/console/sign-out"), timeout=30,
                            data={"csrf_token": fresh}, allow_redirects=False
                            ).status_code == 303


def test_the_cookies_are_secure_when_served_over_https(console):  # noqa: F811
    from infrastructure.api import create_app
    from infrastructure.store.bootstrap import bootstrap
    from tests.conftest import settings_for

    trialog = bootstrap(settings_for(console.database))
    app = create_app(trialog, follow=False)
    try:
        client = app.test_client()
        form = client.get("/console/sign-in", base_url="https://console.test")
        answer = client.post("/console/sign-in", base_url="https://console.test", data={
            "csrf_token": csrf_of(form.text), "login": console.logins["auditor"],
            "password": PASSWORD})
        assert answer.status_code == 303
        cookies = form.headers.getlist("Set-Cookie") + answer.headers.getlist("Set-Cookie")
        # The form cookie, the session's, and the form cookie emptied at sign-in (its CSRF
        # secret is drawn anew for the next form).
        assert len(cookies) == 3
        for cookie in cookies:
            assert "; Secure" in cookie and "; HttpOnly" in cookie
            assert "SameSite=Lax" in cookie and "Path=/console" in cookie
    finally:
        app.extensions["trialog"].close()
        trialog.close()


def test_signing_out_ends_the_session_for_good(console, browser):  # noqa: F811
    context = browser.new_context()
    try:
        page = sign_in(context, console, console.logins["coordinator"])
        cookie = next(c["value"] for c in context.cookies() if c["name"] == "trialog_console")
        follow(page.get_by_role("button", name="Sign out"))
        assert "You are signed out." in page.content()
        assert page.url.startswith(console.page_url("/console/sign-in"))
        page.goto(console.page_url("/console/work/queries"))
        assert page.url.startswith(console.page_url("/console/sign-in"))
    finally:
        context.close()
    answer = requests.get(console.page_url("/console/"), cookies={"trialog_console": cookie},
                          timeout=30, allow_redirects=False)
    assert answer.status_code == 302 and "/console/sign-in" in answer.headers["Location"]


def test_an_idle_session_ends_at_the_next_request(console, browser):  # noqa: F811
    context = browser.new_context()
    try:
        page = sign_in(context, console, console.logins["investigator"])
        cookie = next(c["value"] for c in context.cookies() if c["name"] == "trialog_console")
        # Its last request, 31 minutes ago, written as the server writes it (sealed: an
        # edit of the row alone would make it no one's, and the page would not say why).
        digest, before = token_hash(cookie), datetime.now(UTC) - timedelta(minutes=31)
        with console.engine.begin() as connection:
            row = connection.execute(select(console_sessions).where(
                console_sessions.c.cookie_hash == digest)).one()
            connection.execute(update(console_sessions).where(
                console_sessions.c.cookie_hash == digest).values(
                last_seen_at=before, seal=seals_for(console.engine).console(
                    digest, row.session_hash, row.login, before)))
        page.goto(console.page_url("/console/participants/"))
        assert page.url.startswith(console.page_url("/console/sign-in"))
        assert "signed out after 30 minutes without activity" in page.content()
    finally:
        context.close()


def test_wrong_passwords_are_refused_and_the_fifth_locks_the_login(console, browser):  # noqa: F811
    login = f"locked.{console.logins['monitor']}"
    create_user(console.engine, login, "Lock Tester", "monitor", Scope.of(["CASE"]), PASSWORD)
    context = browser.new_context()
    try:
        page = context.new_page()
        for attempt in range(5):
            page.goto(console.page_url("/console/sign-in"))
            page.get_by_label("Login").fill(login)
            page.get_by_label("Password").fill("not the password at all")
            with page.expect_response(lambda r: r.request.method == "POST") as answer:
                follow(page.get_by_role("button", name="Sign in"))
            expected = 423 if attempt == 4 else 401
            assert answer.value.status == expected
        assert "sign-in is locked until" in page.get_by_role("alert").inner_text()
        page.get_by_label("Password").fill(PASSWORD)  # the right one, too late
        follow(page.get_by_role("button", name="Sign in"))
        assert page.url.startswith(console.page_url("/console/sign-in"))
        assert "locked" in page.get_by_role("alert").inner_text()
    finally:
        context.close()


def test_a_disabled_person_is_refused_at_the_next_request(console, browser):  # noqa: F811
    login = f"leaving.{console.logins['coordinator']}"
    create_user(console.engine, login, "Leaving Soon", "coordinator", Scope.of(["CASE"]),
                PASSWORD)
    context = browser.new_context()
    try:
        page = sign_in(context, console, login)
        assert page.url == console.page_url("/console/")
        disable_user(console.engine, login)
        page.goto(console.page_url("/console/participants/"))
        assert page.url.startswith(console.page_url("/console/sign-in"))
    finally:
        context.close()


def test_the_api_still_wants_a_bearer_token(console):  # noqa: F811
    answer = requests.get(console.page_url("/v1/participants"), timeout=30)
    assert answer.status_code == 401 and answer.json()["error"] == "unauthorized"
    answer = requests.get(console.page_url("/console/"), timeout=30, allow_redirects=False)
    assert answer.status_code == 302 and "/console/sign-in" in answer.headers["Location"]


def test_signing_in_needs_only_the_keyboard(console, browser):  # noqa: F811
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(console.page_url("/console/sign-in"))
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.textContent") == "Skip to the content"
        for _ in range(5):  # the skip link, the brand, then the form's fields in order
            if page.evaluate("document.activeElement.id") == "login":
                break
            page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "login"
        page.keyboard.type(console.logins["auditor"])
        page.keyboard.press("Tab")
        page.keyboard.type(PASSWORD)
        page.keyboard.press("Enter")
        page.wait_for_url(console.page_url("/console/"))
        assert page.get_by_role("heading", level=1).inner_text() == "Trial overview"
    finally:
        context.close()


def test_a_person_changes_their_password_in_the_console(console, browser):  # noqa: F811
    """A wrong current password is refused; the right one changes it: this session goes
    on, the person's other sessions end, the old password signs no one in."""
    import uuid

    login, new = f"grace.{uuid.uuid4().hex[:6]}", "a new password of my own"
    create_user(console.engine, login, "Grace Hopper", "coordinator", Scope.of(["CASE"]),
                PASSWORD)

    def signed_in_over_the_api(password: str) -> requests.Response:
        return requests.post(console.page_url("/v1/sessions"), timeout=30,
                             json={"login": login, "password": password})

    elsewhere = signed_in_over_the_api(PASSWORD).json()["token"]
    context = browser.new_context()
    try:
        page = sign_in(context, console, login)
        follow(page.get_by_role("link", name="Password"))
        refused = "Your current password is not that one."
        changed = "Your password is changed. Your other sessions have ended."
        for current, said in (("not my password at all", refused), (PASSWORD, changed)):
            page.get_by_label("Current password").fill(current)
            page.get_by_label("New password", exact=True).fill(new)
            page.get_by_label("New password again").fill(new)
            follow(page.get_by_role("button", name="Change the password"))
            assert said in page.content()
        assert page.url == console.page_url("/console/")
        follow(page.get_by_role("link", name="Participants"))
        assert page.url == console.page_url("/console/participants/")
    finally:
        context.close()
    refused = requests.get(console.page_url("/v1/participants"), timeout=30,
                           headers={"Authorization": f"Bearer {elsewhere}"})
    assert refused.status_code == 401
    assert signed_in_over_the_api(PASSWORD).status_code == 401
    assert signed_in_over_the_api(new).status_code == 201
