"""The role table of the contract, as a matrix over every command and read."""

from __future__ import annotations

import json
import uuid

import pytest

from domain.commands import COMMAND_TYPES
from infrastructure.store.tokens import ROLES
from tests.e2e import payloads as p
from tests.e2e.conftest import Client
from tests.e2e.test_lifecycle import enrol

SERVICE = {"ScreenParticipant", "RecordConsent", "RandomizeParticipant", "RecordBloodSample",
           "RecordDose", "CompleteVisit", "ReportMedication", "WithdrawParticipant"}
COORDINATOR = SERVICE | {"CorrectData", "RespondToQuery"}
MONITOR = {"ResolveDeviation", "RaiseQuery", "CloseQuery", "ReopenQuery", "CancelQuery",
           "VerifySource"}
MAY_ISSUE = {
    "service": SERVICE,
    "coordinator": COORDINATOR,
    "investigator": COORDINATOR | {"SignVisit", "SignCasebook"},
    "monitor": MONITOR,
    "data_manager": MONITOR | {"LockVisit", "UnlockVisit", "LockCasebook", "UnlockCasebook"},
    "auditor": set(),
    "admin": set(COMMAND_TYPES) - {"SignVisit", "SignCasebook"},
}
NO_DATA = {"LockCasebook", "UnlockCasebook"}  # empty data is valid: the id is unknown
READS = {
    "/v1/participants": "participants", "/v1/participants/{pid}": "participants",
    "/v1/participants/{pid}/history": "history", "/v1/visits/due": "visits",
    "/v1/deviations": "deviations", "/v1/queries": "queries",
    "/v1/trial/summary": "summary",
    "/v1/audit/verify": "audit", "/v1/exports/csv": "exports",
    "/v1/exports/odm": "exports", "/v1/exports/fhir": "exports",
    "/v1/audit/access": "access_log", "/v1/audit/register": "access_register",
}
SERVICE_READS = {"participants", "history", "visits", "deviations", "queries", "summary"}
ACCESS_LOG_ROLES = {"auditor", "admin"}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("command_type", sorted(COMMAND_TYPES))
def test_a_role_issues_only_its_commands(server, role, command_type):
    # Empty data: an allowed command gets as far as validation (422; 404 for an unknown
    # participant when no data is needed), a refused one is 403.
    answer = server.client(role).command(command_type, p.participant_id(), {})
    allowed = 404 if command_type in NO_DATA else 422
    expected = allowed if command_type in MAY_ISSUE[role] else 403
    assert answer.status_code == expected, answer.text
    if expected == 403:
        assert answer.json()["error"] == "forbidden"


@pytest.fixture(scope="module")
def known_participant(server):
    pid, position = enrol(server.client("admin"))
    server.client("admin").get(f"/v1/participants/{pid}", after=position)
    return pid


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("path", sorted(READS))
def test_a_role_reads_only_what_it_may(server, known_participant, role, path):
    answer = server.client(role).get(path.format(pid=known_participant))
    if READS[path] in ("access_log", "access_register"):
        allowed = role in ACCESS_LOG_ROLES
    else:
        allowed = role != "service" or READS[path] in SERVICE_READS
    assert answer.status_code == (200 if allowed else 403), answer.text


@pytest.mark.parametrize("role", ROLES)
def test_only_coordinators_investigators_and_admins_see_contact_details(server,
                                                                         known_participant,
                                                                         role):
    state = server.client(role).get(f"/v1/participants/{known_participant}").json()
    history = server.client(role).get(f"/v1/participants/{known_participant}/history").json()
    if role in ("coordinator", "investigator", "admin"):
        assert state["contact"] == {"email": "participant@example.org",
                                    "birth_date": "1958-06-15"}
        assert "participant@example.org" in json.dumps(history)
    else:
        assert "contact" not in state
        assert "participant@example.org" not in json.dumps(history)
        assert "1958-06-15" not in json.dumps(history)


def test_every_answer_that_shows_contact_details_is_accounted_for(server):
    coordinator, monitor, auditor = (server.client(r) for r in
                                     ("coordinator", "monitor", "auditor"))
    pid, position = enrol(coordinator)
    coordinator.get(f"/v1/participants/{pid}", after=position)
    coordinator.get(f"/v1/participants/{pid}/history")
    coordinator.get(f"/v1/participants/{pid}", version=1)
    monitor.get(f"/v1/participants/{pid}")  # no contact details shown: not accounted
    monitor.get(f"/v1/participants/{pid}/history")
    coordinator.get("/v1/exports/odm")
    coordinator.get("/v1/exports/odm", deidentify="true")  # none shown
    coordinator.get("/v1/exports/csv")  # the CSV has none
    for path in (f"/v1/participants/{pid}", f"/v1/participants/{pid}/history", "/v1/feed"):
        assert coordinator.session.head(server.url + path, timeout=30).status_code == 200
    # HEAD answers carry no body: nothing was shown (they were recorded as GETs)

    listed = auditor.get("/v1/audit/access", participant_id=pid)
    assert listed.status_code == 200
    seen = [(d["actor"], d["endpoint"]) for d in reversed(listed.json()["disclosures"])]
    name = server.names["coordinator"]
    assert seen == [(name, f"GET /v1/participants/{pid}"),
                    (name, f"GET /v1/participants/{pid}/history"),
                    (name, f"GET /v1/participants/{pid}"),
                    (name, "GET /v1/exports/odm")]
    assert all(d["participant_id"] == pid and d["at"] and d["intact"] is True
               for d in listed.json()["disclosures"])


def test_the_access_register_lists_who_was_granted_access_and_whose_access_ended(server):
    """Auditors and admins of every site read who holds or held access: each token and
    person with the role and sites granted, when and by whom, and when their access
    ended; at a moment, as recorded then. A caller of some sites is refused."""
    import time
    from datetime import UTC, datetime

    from domain.access import Scope
    from infrastructure.store.bootstrap import bootstrap
    from infrastructure.store.people import create_user, disable_user
    from infrastructure.store.tokens import create_token, revoke_token
    from tests.conftest import settings_for

    suffix = uuid.uuid4().hex[:8]
    lab, ada, scoped = f"lab-{suffix}", f"ada-{suffix}", f"auditor-case-{suffix}"
    late = f"late-{suffix}"
    t = bootstrap(settings_for(server.database), migrate=False)
    try:
        create_token(t.engine, lab, "service", Scope.of(["METRO", "CASE"]))
        create_user(t.engine, ada, "Ada Example", "investigator", Scope.of(["CASE"]),
                    "correct horse battery staple")
        scoped_token = create_token(t.engine, scoped, "auditor", Scope.of(["CASE"]))
        time.sleep(0.01)
        before_the_end = datetime.now(UTC)
        revoke_token(t.engine, lab)
        disable_user(t.engine, ada)
        create_token(t.engine, late, "service", Scope.of(["CASE"]))
    finally:
        t.close()
    answer = server.client("auditor").get("/v1/audit/register")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    listed = {h["name"]: h for h in body["holders"]}
    assert listed[lab] == {
        "name": lab, "kind": "token", "full_name": None, "role": "service",
        "sites": ["CASE", "METRO"], "granted_at": listed[lab]["granted_at"],
        "granted_by": "trialog token create", "grant_reason": None,
        "ended_at": listed[lab]["ended_at"], "ended_by": "trialog token revoke",
        "end_reason": None, "password_changes": 0}
    assert listed[ada]["kind"] == "person" and listed[ada]["full_name"] == "Ada Example"
    assert (listed[ada]["role"], listed[ada]["sites"], listed[ada]["ended_by"]) == (
        "investigator", ["CASE"], "trialog user disable")
    granted = datetime.fromisoformat(listed[lab]["granted_at"])
    ended = datetime.fromisoformat(listed[lab]["ended_at"])
    assert granted < before_the_end < ended <= datetime.now(UTC)
    admin = server.names["admin"]
    assert (listed[admin]["role"], listed[admin]["sites"], listed[admin]["ended_at"]) == (
        "admin", None, None)
    names = [h["name"] for h in body["holders"]]
    assert (names.index(admin) < names.index(lab) < names.index(ada) < names.index(scoped)
            < names.index(late))
    assert isinstance(body["version"], int) and body["version"] >= 7
    then = server.client("admin").get("/v1/audit/register",
                                      as_of=before_the_end.isoformat()).json()
    at_the_time = {h["name"]: h for h in then["holders"]}
    assert at_the_time[lab]["ended_at"] is None and at_the_time[ada]["ended_at"] is None
    assert late not in at_the_time and scoped in at_the_time
    assert then["version"] == body["version"] - 3  # as recorded then
    refused = Client(server.url, scoped_token).get("/v1/audit/register")
    assert refused.status_code == 403
    assert "callers of every site" in refused.json()["message"]
    wrong = server.client("auditor").get("/v1/audit/register", as_of="yesterday")
    assert wrong.status_code == 422 and "as_of" in wrong.text
