"""A whole cleaning cycle over HTTP: a monitor raises a query, the coordinator answers and
corrects, the monitor closes and verifies, the investigator signs with their password,
the data manager locks and unlocks with reasons, and the investigator signs again; with
every refusal of the contract, on both databases."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import text

from domain.access import EVERY_SITE, Scope
from infrastructure.store.bootstrap import bootstrap
from infrastructure.store.people import create_user
from infrastructure.store.tokens import create_token
from tests.conftest import settings_for
from tests.e2e import payloads as p
from tests.e2e.conftest import Client
from tests.e2e.test_lifecycle import enrol

PASSWORD = "investigator's own password"
MEANING = "I approve the data of this visit"


@pytest.fixture(scope="module")
def people(server):
    """Signed-in people of CASE (coordinator, monitor, investigator), an all-sites data
    manager, and a machine token of role investigator."""
    t = bootstrap(settings_for(server.database))
    suffix = uuid.uuid4().hex[:6]
    clients = {}
    for role, scope in (("coordinator", Scope.of(["CASE"])), ("monitor", Scope.of(["CASE"])),
                        ("investigator", Scope.of(["CASE"])), ("data_manager", EVERY_SITE)):
        login = f"{role}.{suffix}"
        create_user(t.engine, login, f"Dr {role.title()} {suffix}", role, scope, PASSWORD)
        answer = Client(server.url, None).post("/v1/sessions", {"login": login,
                                                               "password": PASSWORD})
        assert answer.status_code == 201, answer.text
        clients[role] = Client(server.url, answer.json()["token"])
        clients[role].login = login
    machine = create_token(t.engine, f"machine-investigator-{suffix}", "investigator",
                           EVERY_SITE)
    clients["machine"] = Client(server.url, machine)
    clients["engine"] = t.engine
    yield clients
    t.close()


def state(client, pid, position=None):
    params = {"after": position} if position else {}
    answer = client.get(f"/v1/participants/{pid}", **params)
    assert answer.status_code == 200, answer.text
    return answer.json()


def ok(answer, status=201):
    assert answer.status_code == status, answer.text
    return answer.json()


def refused(answer, status, error):
    assert answer.status_code == status, answer.text
    assert answer.json()["error"] == error, answer.text
    return answer.json()


def baseline_event(client, pid):
    events = client.get(f"/v1/participants/{pid}/history").json()["events"]
    return next(e["event_id"] for e in events if e["type"] == "VisitCompleted")


def test_a_whole_cleaning_cycle(server, people):
    coordinator, monitor, investigator, manager = (people[r] for r in (
        "coordinator", "monitor", "investigator", "data_manager"))
    pid, _ = enrol(coordinator)
    ok(coordinator.command("CompleteVisit", pid, p.visit("baseline", 0)))
    query_id = str(uuid.uuid4())

    # Raise: a visit that does not exist is a 422; a coordinator may not raise.
    refused(monitor.command("RaiseQuery", pid, {"query_id": query_id, "text": "?",
                                                "visit": "week99"}), 422, "validation_failed")
    refused(coordinator.command("RaiseQuery", pid, {"query_id": query_id, "text": "?",
                                                    "visit": "baseline"}), 403, "forbidden")
    raised = ok(monitor.command("RaiseQuery", pid, {
        "query_id": query_id, "text": "Worst pain 7 but average 5?", "visit": "baseline"}))
    assert state(monitor, pid, raised["position"])["open_queries"] == 1
    listed = ok(monitor.get("/v1/queries", participant_id=pid, after=raised["position"]), 200)
    [query] = listed["queries"]
    assert (query["status"], query["site_id"], query["target"], query["days_open"],
            query["opened_by"]) == ("open", "CASE", {"visit": "baseline"}, 0, monitor.login)

    # Respond and correct; a second response is refused naming the state.
    ok(coordinator.command("RespondToQuery", pid, {"query_id": query_id,
                                                   "text": "Source says worst 8"}))
    conflict = refused(coordinator.command("RespondToQuery", pid, {
        "query_id": query_id, "text": "again"}), 409, "invalid_transition")
    assert conflict["status"] == "answered" and "answered" in conflict["message"]
    ok(coordinator.command("CorrectData", pid, {"event_id": baseline_event(coordinator, pid),
                                                "field": "bpi_sf.worst", "value": 8},
                           reason="transcription error"))
    closed = ok(monitor.command("CloseQuery", pid, {"query_id": query_id, "text": "Thanks"}))
    refused(monitor.command("CloseQuery", pid, {"query_id": query_id}), 409,
            "invalid_transition")
    refused(monitor.command("ReopenQuery", pid, {"query_id": query_id}), 422,
            "validation_failed")  # reopening needs a reason
    listed = ok(monitor.get("/v1/queries", status="closed", participant_id=pid,
                            after=closed["position"]), 200)
    assert [m["action"] for m in listed["queries"][0]["thread"]] == [
        "raise", "respond", "close"]

    # Verify, then a correction marks the visit changed since verified.
    verified = ok(monitor.command("VerifySource", pid, {"visit": "baseline"}))
    visit = state(monitor, pid, verified["position"])["visits"][0]
    assert (visit["code"], visit["sdv"]) == ("baseline", "verified")
    refused(monitor.command("VerifySource", pid, {"visit": "week6"}), 409,
            "invalid_transition")
    corrected = ok(coordinator.command(
        "CorrectData", pid, {"event_id": baseline_event(coordinator, pid),
                             "field": "bpi_sf.least", "value": 2}, reason="late source"))
    assert state(monitor, pid, corrected["position"])["visits"][0]["sdv"] == \
        "changed_since_verified"
    ok(monitor.command("VerifySource", pid, {"visit": "baseline"}))

    # Sign: only a person's own session, only with their password, never an admin.
    sign = {"visit": "baseline", "meaning": MEANING, "password": PASSWORD}
    refused(people["machine"].command("SignVisit", pid, sign), 403, "forbidden")
    refused(server.client("admin").command("SignVisit", pid, sign), 403, "forbidden")
    refused(coordinator.command("SignVisit", pid, sign), 403, "forbidden")
    wrong = refused(investigator.command("SignVisit", pid, {**sign, "password": "not it"}),
                    401, "reauthentication_failed")
    assert "not it" not in json.dumps(wrong)
    signed = ok(investigator.command("SignVisit", pid, sign))
    signature = state(coordinator, pid, signed["position"])["visits"][0]["signature"]
    assert (signature["signed_by"], signature["printed_name"], signature["meaning"],
            signature["valid"]) == (investigator.login,
                                    f"Dr Investigator {investigator.login.split('.')[1]}",
                                    MEANING, True)

    # Lock: the visit's data can't change; queries and verification go on.
    refused(monitor.command("LockVisit", pid, {"visit": "baseline"}), 403, "forbidden")
    ok(manager.command("LockVisit", pid, {"visit": "baseline"}))
    refused(coordinator.command("CorrectData", pid, {
        "event_id": baseline_event(coordinator, pid), "field": "bpi_sf.now", "value": 4},
        reason="late"), 409, "locked")
    ok(monitor.command("RaiseQuery", pid, {"query_id": str(uuid.uuid4()), "text": "fine?",
                                           "event_id": baseline_event(coordinator, pid),
                                           "field": "bpi_sf.now"}))
    refused(manager.command("UnlockVisit", pid, {"visit": "baseline"}), 422,
            "validation_failed")
    unlocked = ok(manager.command("UnlockVisit", pid, {"visit": "baseline"},
                                  reason="query on bpi_sf.now"))
    after_unlock = state(coordinator, pid, unlocked["position"])["visits"][0]
    assert after_unlock["locked"] is False and after_unlock["signature"]["valid"] is False
    events = coordinator.get(f"/v1/participants/{pid}/history").json()["events"]
    assert [e["type"] for e in events[-2:]] == ["ScopeUnlocked", "SignatureInvalidated"]
    assert events[-1]["command_id"] == events[-2]["command_id"]  # one command, one commit
    resigned = ok(investigator.command("SignVisit", pid, sign))
    assert state(coordinator, pid, resigned["position"])["visits"][0]["signature"]["valid"]

    # The password is nowhere: not in the history, the answers, or the idempotency store.
    history = coordinator.get(f"/v1/participants/{pid}/history").text
    assert PASSWORD not in history and MEANING in history
    with people["engine"].connect() as connection:
        stored = connection.execute(text("SELECT response FROM trialog_commands WHERE "
                                         "participant_id = :pid"), {"pid": pid}).scalars()
        assert not any(PASSWORD in s for s in stored)
    assert not any(PASSWORD in line for line in server.log_lines())


def test_the_database_lock_stops_every_data_command_until_unlocked(server, people):
    coordinator, monitor, manager = (people[r] for r in ("coordinator", "monitor",
                                                         "data_manager"))
    pid, _ = enrol(coordinator)
    lock = {"command_id": str(uuid.uuid4()), "type": "LockDatabase",
            "reason": "interim analysis"}
    refused(coordinator.post("/v1/trial/commands", lock), 403, "forbidden")
    for reason in ({}, {"reason": None}):  # why the data stop is part of the record
        answer = manager.post("/v1/trial/commands", {
            "command_id": str(uuid.uuid4()), "type": "LockDatabase", **reason})
        if answer.status_code == 201:  # not left locked for the tests after this one
            ok(manager.post("/v1/trial/commands", {**lock, "type": "UnlockDatabase",
                                                   "command_id": str(uuid.uuid4())}))
        unsaid = refused(answer, 422, "validation_failed")
        assert unsaid["fields"] == {"reason": ["is required for LockDatabase"]}
    assert ok(manager.get("/v1/trial/summary"), 200)["database_lock"] is None
    locked = ok(manager.post("/v1/trial/commands", lock))
    try:
        assert ok(manager.post("/v1/trial/commands", lock), 200) == locked  # a retry
        summary = ok(manager.get("/v1/trial/summary", after=locked["position"]), 200)
        assert summary["database_lock"]["locked_by"] == manager.login
        assert summary["database_lock"]["position"] == locked["position"]
        refused(coordinator.command("RecordDose", pid, p.dose(1)), 409, "database_locked")
        refused(coordinator.command("ScreenParticipant", p.participant_id(), p.screening()),
                409, "database_locked")
        ok(monitor.command("RaiseQuery", pid, {"query_id": str(uuid.uuid4()), "text": "?",
                                               "visit": "baseline"}))
        again = {**lock, "command_id": str(uuid.uuid4())}
        refused(manager.post("/v1/trial/commands", again), 409, "invalid_transition")
        unlock = {"command_id": str(uuid.uuid4()), "type": "UnlockDatabase"}
        refused(manager.post("/v1/trial/commands", unlock), 422, "validation_failed")
    finally:
        unlocked = ok(manager.post("/v1/trial/commands", {
            "command_id": str(uuid.uuid4()), "type": "UnlockDatabase",
            "reason": "interim analysis done"}))
    summary = ok(manager.get("/v1/trial/summary", after=unlocked["position"]), 200)
    assert summary["database_lock"] is None
    ok(coordinator.command("RecordDose", pid, p.dose(1)))
