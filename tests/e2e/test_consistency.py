"""Reads of one participant reflect every command answered before them, even when the read
models are behind (here: a server that does not follow the log at all), and every answer
says which log position it reflects."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from domain.access import EVERY_SITE
from infrastructure.store.bootstrap import bootstrap
from infrastructure.store.tokens import create_token
from tests.conftest import TEST_KEY, settings_for
from tests.e2e import payloads as p
from tests.e2e.conftest import TRIALOG, Client, free_port, wait_until_up


@pytest.fixture(scope="module")
def behind(tmp_path_factory) -> Iterator[Client]:
    """A server whose read models never move: it runs no projection."""
    folder = tmp_path_factory.mktemp("behind")
    url = f"sqlite:///{folder / 'trialog.db'}"
    trialog = bootstrap(settings_for(url), migrate=True)
    token = create_token(trialog.engine, "coordinator-behind", "coordinator", EVERY_SITE)
    trialog.close()
    port = free_port()
    env = {**os.environ, "TRIALOG_DATABASE_URL": url, "TRIALOG_CIPHER_KEY": TEST_KEY}
    log = folder / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen([TRIALOG, "serve", "--port", str(port), "--no-projection"],
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}", process, log)
        yield Client(f"http://127.0.0.1:{port}", token)
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_a_participant_read_right_after_a_201_shows_the_write_without_after(behind):
    pid = p.participant_id()
    screened = behind.command("ScreenParticipant", pid, p.screening())
    assert screened.status_code == 201, screened.text
    state = behind.get(f"/v1/participants/{pid}")
    assert state.status_code == 200, state.text
    assert state.json()["status"] == "screened" and state.json()["version"] == 1
    consented = behind.command("RecordConsent", pid, p.CONSENT)
    state = behind.get(f"/v1/participants/{pid}").json()
    assert (state["status"], state["version"]) == ("consented", 2)
    assert state["contact"]["email"] == "participant@example.org"
    assert state["position"] == consented.json()["position"]
    history = behind.get(f"/v1/participants/{pid}/history").json()
    assert [e["version"] for e in history["events"]] == [1, 2]


def test_every_answer_carries_the_position_it_reflects(behind):
    pid = p.participant_id()
    screened = behind.command("ScreenParticipant", pid, p.screening())
    position = screened.json()["position"]
    assert screened.headers["Trialog-Position"] == str(position)
    assert behind.get(f"/v1/participants/{pid}").headers["Trialog-Position"] == str(position)
    assert behind.get(f"/v1/participants/{pid}/history").headers[
        "Trialog-Position"] == str(position)
    # The lists come from the read models, which this server never moves past 0.
    assert behind.get("/v1/participants").headers["Trialog-Position"] == "0"
    # The CONSORT counts come from the store itself, whatever the read models' position.
    consort = behind.get("/v1/reports/consort")
    assert consort.status_code == 200, consort.text
    assert consort.headers["Trialog-Position"] == str(position)
    unknown = behind.get("/v1/participants/CASE-none")
    assert unknown.status_code == 404 and "Trialog-Position" in unknown.headers
    for public in ("/healthz", "/openapi.json"):  # every answer carries it
        assert behind.get(public).headers["Trialog-Position"] == "0"


def test_a_401_says_how_to_authenticate(behind):
    answer = Client(behind.url, None).get("/v1/participants")
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")


def _screened_at(client: Any, headers: dict[str, str]) -> int:
    answer = client.post("/v1/commands", headers=headers, json={
        "command_id": str(uuid.uuid4()), "type": "ScreenParticipant",
        "participant_id": p.participant_id(), "data": p.screening()})
    assert answer.status_code == 201, answer.text
    return int(answer.json["position"])


@contextmanager
def _in_process(url: str) -> Iterator[tuple[Any, Any, dict[str, str]]]:
    """The app in this process, following no log (its read models move only when a test
    catches them up), and a coordinator's bearer headers."""
    from infrastructure.api import create_app

    trialog = bootstrap(settings_for(url), migrate=True)
    app = create_app(trialog, follow=False)
    try:
        token = create_token(trialog.engine, f"reader-{uuid.uuid4().hex[:8]}", "coordinator",
                             EVERY_SITE)
        yield trialog, app, {"Authorization": f"Bearer {token}"}
    finally:
        app.extensions["trialog"].close()
        trialog.close()


def _a_follower_commits_after(monkeypatch: Any, trialog: Any, read: str) -> tuple[int, int]:
    """Makes ``read`` (a function of the read models' queries) catch them up right after
    it has read: the position they have until then, and the store's newest."""
    from infrastructure.readside import queries
    from infrastructure.readside.projections import TrialProjection

    read_at = TrialProjection(trialog).position()
    reading = getattr(queries, read)

    def read_then_a_follower_commits(*args: Any, **kwargs: Any) -> Any:
        found = reading(*args, **kwargs)
        TrialProjection(trialog).catch_up()
        return found

    monkeypatch.setattr(queries, read, read_then_a_follower_commits)
    return read_at, TrialProjection(trialog).head()


@pytest.mark.parametrize("path, read", [("/v1/participants", "list_participants"),
                                        ("/v1/trial/summary", "trial_summary")])
def test_a_read_of_the_read_models_names_their_position_before_it_read_them(
        isolated_url, monkeypatch, path, read):
    """A follower commits between a read of the read models and its answer: the
    answer names the position they had when it read them, not the newer one."""
    from infrastructure.readside.projections import TrialProjection

    with _in_process(isolated_url) as (trialog, app, headers):
        client = app.test_client()
        first = _screened_at(client, headers)
        TrialProjection(trialog).catch_up()
        unread = _screened_at(client, headers)
        read_at, _ = _a_follower_commits_after(monkeypatch, trialog, read)
        assert read_at >= first
        answer = client.get(path, headers=headers)
        assert answer.status_code == 200, answer.text
        assert TrialProjection(trialog).position() >= unread > read_at
        assert answer.headers["Trialog-Position"] == str(read_at)


@pytest.mark.parametrize("path, read", [("/console/participants/", "list_participants"),
                                        ("/console/", "trial_summary")])
def test_a_console_page_names_the_read_models_position_before_it_read_them(
        isolated_url, monkeypatch, path, read):
    """The same for the console's pages, read by a person signed in."""
    from infrastructure.readside.projections import TrialProjection
    from infrastructure.store.people import create_user
    from tests.e2e.console_support import PASSWORD, csrf_of

    with _in_process(isolated_url) as (trialog, app, headers):
        login = f"reader-{uuid.uuid4().hex[:8]}"
        create_user(trialog.engine, login, "A Reader", "coordinator", EVERY_SITE, PASSWORD)
        client = app.test_client()
        site = "https://console.test"
        form = client.get("/console/sign-in", base_url=site)
        signed_in = client.post("/console/sign-in", base_url=site, data={
            "csrf_token": csrf_of(form.text), "login": login, "password": PASSWORD})
        assert signed_in.status_code == 303, signed_in.text
        _screened_at(client, headers)
        TrialProjection(trialog).catch_up()
        _screened_at(client, headers)
        read_at, unread = _a_follower_commits_after(monkeypatch, trialog, read)
        assert unread > read_at > 0
        page = client.get(path, base_url=site)
        assert page.status_code == 200, page.text
        assert TrialProjection(trialog).position() >= unread
        assert page.headers["Trialog-Position"] == str(read_at)


def test_a_read_after_a_position_looks_up_the_read_models_position_once(isolated_url):
    """``?after=``'s wait ends at a position taken before the view reads: the answer
    names it, with no second look-up."""
    from infrastructure.readside.projections import TrialProjection

    with _in_process(isolated_url) as (trialog, app, headers):
        client = app.test_client()
        position = _screened_at(client, headers)
        TrialProjection(trialog).catch_up()
        projection = app.extensions["trialog"].projection
        looked_up: list[int] = []
        original = projection.position

        def counted() -> int:
            looked_up.append(original())
            return looked_up[-1]

        projection.position = counted
        answer = client.get(f"/v1/participants?after={position}", headers=headers)
        assert answer.status_code == 200, answer.text
        assert looked_up == [int(answer.headers["Trialog-Position"])]
        assert looked_up[0] >= position


@pytest.mark.parametrize("kind", ["csv", "odm", "fhir"])
def test_an_export_that_fails_midway_is_an_error_not_a_shorter_document(
        isolated_url, monkeypatch, kind):
    """The database fails after an export's first lines: the answer is an error, with no
    line of the export, rather than a 200 whose body stops there (a server ends a streamed
    body that fails as if it were whole). A whole export is sent with its length."""
    import sqlalchemy.exc

    from infrastructure.audit import exports
    from infrastructure.readside.projections import TrialProjection

    with _in_process(isolated_url) as (trialog, app, headers):
        client = app.test_client()
        _screened_at(client, headers)  # a participant in each export
        TrialProjection(trialog).catch_up()
        whole = client.get(f"/v1/exports/{kind}", headers=headers)
        assert whole.status_code == 200
        assert whole.headers["Content-Length"] == str(len(whole.data)) != "0"

        def fails_midway(*args: Any, **kwargs: Any) -> Iterator[str]:
            yield "the first lines\n"
            raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("no connection"))

        monkeypatch.setattr(exports, "document", fails_midway)
        answer = client.get(f"/v1/exports/{kind}", headers=headers)
        assert answer.status_code == 500, answer.data[:200]
        assert answer.json["error"] == "internal_error"
        assert b"the first lines" not in answer.data


def test_an_exports_head_makes_no_export_and_records_no_disclosure(isolated_url, monkeypatch):
    """HEAD answers the headers of the ODM export (which carries contact details) without
    making it, so nobody is recorded as shown anyone's."""
    from infrastructure.audit import access, exports

    with _in_process(isolated_url) as (trialog, app, headers):
        client = app.test_client()
        _screened_at(client, headers)
        made = []
        document = exports.document
        monkeypatch.setattr(exports, "document", lambda *a, **k: made.append(1) or document(*a, **k))
        answer = client.head("/v1/exports/odm", headers=headers)
        assert answer.status_code == 200
        assert answer.headers["Content-Type"].startswith("application/xml")
        assert "Content-Length" not in answer.headers  # unknown until it is made, not 0
        assert made == []
        assert access.disclosures(trialog.engine) == []
        assert client.get("/v1/exports/odm", headers=headers).status_code == 200
        assert made == [1]
        assert len(access.disclosures(trialog.engine)) == 1  # the GET's


def test_the_history_never_waits_for_the_read_models(isolated_url):
    """The history is read from the store, which holds every command answered: `?after=`
    is checked (not beyond the newest event) but not waited for; it answered 503
    read_side_behind while a follower lagged."""
    with _in_process(isolated_url) as (trialog, app, headers):
        client = app.test_client()
        position = _screened_at(client, headers)
        pid = trialog.service.recorder.select_notifications(position, 1)[0].originator_id
        participant = trialog.service.repository.get(pid)
        answer = client.get(f"/v1/participants/{participant.participant_id}/history",
                            headers=headers, query_string={"after": position, "wait": 0})
        assert answer.status_code == 200, answer.text
        assert len(answer.json["events"]) == 1
