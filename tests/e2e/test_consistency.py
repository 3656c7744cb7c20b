"""Reads of one participant reflect every command answered before them, even when the read
models are behind (here: a server that does not follow the log at all), and every answer
says which log position it reflects."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator

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
    unknown = behind.get("/v1/participants/CASE-none")
    assert unknown.status_code == 404 and "Trialog-Position" in unknown.headers


def test_a_401_says_how_to_authenticate(behind):
    answer = Client(behind.url, None).get("/v1/participants")
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("path, read", [("/v1/participants", "list_participants"),
                                        ("/v1/trial/summary", "trial_summary")])
def test_a_read_of_the_read_models_names_their_position_before_it_read_them(
        isolated_url, monkeypatch, path, read):
    """A follower commits between a read of the read models and its answer: the
    answer names the position they had when it read them, not the newer one."""
    from infrastructure.api import create_app
    from infrastructure.readside import queries
    from infrastructure.readside.projections import TrialProjection

    trialog = bootstrap(settings_for(isolated_url), migrate=True)
    app = create_app(trialog, follow=False)
    try:
        token = create_token(trialog.engine, f"reader-{uuid.uuid4().hex[:8]}", "coordinator",
                             EVERY_SITE)
        client = app.test_client()
        headers = {"Authorization": f"Bearer {token}"}

        def screened_at() -> int:
            answer = client.post("/v1/commands", headers=headers, json={
                "command_id": str(uuid.uuid4()), "type": "ScreenParticipant",
                "participant_id": p.participant_id(), "data": p.screening()})
            assert answer.status_code == 201, answer.text
            return int(answer.json["position"])

        first = screened_at()
        TrialProjection(trialog).catch_up()
        read_at = TrialProjection(trialog).position()
        assert read_at >= first
        unread = screened_at()
        reading = getattr(queries, read)

        def read_then_a_follower_commits(*args, **kwargs):
            found = reading(*args, **kwargs)
            TrialProjection(trialog).catch_up()
            return found

        monkeypatch.setattr(queries, read, read_then_a_follower_commits)
        answer = client.get(path, headers=headers)
        assert answer.status_code == 200, answer.text
        assert TrialProjection(trialog).position() >= unread
        assert answer.headers["Trialog-Position"] == str(read_at)
    finally:
        app.extensions["trialog"].close()
        trialog.close()
