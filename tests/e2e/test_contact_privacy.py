"""Contact details only where the roles allow: a marker address given at screening and sent
a reminder is searched for in every read of every role, in the server's log and in the
database file."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from domain import commands as c
from domain.access import EVERY_SITE
from infrastructure.logs import mask_email
from infrastructure.store.bootstrap import bootstrap
from infrastructure.store.tokens import ROLES, create_token
from tests.conftest import TEST_KEY, settings_for
from tests.e2e import payloads as p
from tests.e2e.conftest import TRIALOG, Client, free_port, wait_until_up

MARKER = f"marker-{uuid.uuid4().hex[:12]}@example.org"
BIRTH_DATE = "1958-06-15"  # the payloads' birth date, a contact detail
WITH_CONTACT = {"coordinator", "investigator", "admin"}


class Site:
    def __init__(self, folder: Path, url: str, clients: dict[str, Client]) -> None:
        self.folder, self.database, self.clients = folder, url, clients
        # The ids of the participant's commands: those that carried the marker (the
        # screening, the reminder's), which only roles with contact rights may see, and
        # the consent's, which every role sees.
        self.command_ids: dict[str, str] = {}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("privacy")
    url = f"sqlite:///{folder / 'trialog.db'}"
    trialog = bootstrap(settings_for(url), migrate=True)
    tokens = {role: create_token(trialog.engine, f"{role}-privacy", role, EVERY_SITE)
              for role in ROLES}
    trialog.close()
    port = free_port()
    env = {**os.environ, "TRIALOG_DATABASE_URL": url, "TRIALOG_CIPHER_KEY": TEST_KEY}
    with open(folder / "server.log", "w") as out:
        process = subprocess.Popen([TRIALOG, "serve", "--port", str(port)], env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base, process, folder / "server.log")
        yield Site(folder, url, {role: Client(base, token) for role, token in tokens.items()})
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def participant(site) -> str:
    """A participant whose address is the marker, sent one reminder."""
    coordinator = site.clients["coordinator"]
    pid = p.participant_id()
    screening = p.screening() | {"email": MARKER}
    screened = coordinator.command("ScreenParticipant", pid, screening)
    assert screened.status_code == 201
    consented = coordinator.command("RecordConsent", pid, p.CONSENT)
    assert consented.status_code == 201
    assert coordinator.command("RandomizeParticipant", pid, p.RANDOMIZE).status_code == 201
    last = coordinator.command("CompleteVisit", pid, p.visit("baseline", 0))
    assert last.status_code == 201
    # A reason that quotes the address (free text): shown masked where the address is not.
    visit_event = next(e["event_id"] for e in coordinator.get(
        f"/v1/participants/{pid}/history").json()["events"] if e["type"] == "VisitCompleted")
    corrected = coordinator.post("/v1/commands", {
        "command_id": str(uuid.uuid4()), "type": "CorrectData", "participant_id": pid,
        "reason": f"as {MARKER} wrote to the site",
        "data": {"event_id": visit_event, "field": "bpi_sf.worst", "value": 6}})
    assert corrected.status_code == 201, corrected.text
    site.command_ids["correction"] = corrected.json()["command_id"]
    asked = site.clients["monitor"].command("RaiseQuery", pid, {
        "query_id": str(uuid.uuid4()), "visit": "baseline",
        "text": f"The source names {MARKER}: is it right?"})
    assert asked.status_code == 201, asked.text
    left = coordinator.command("WithdrawParticipant", pid, {
        "withdrawn_on": p.REGISTERED.isoformat(), "scope": "treatment",
        "reason_code": "other", "note": f"asked by mail from {MARKER}"})
    assert left.status_code == 201, left.text
    withdrawal = next(e["event_id"] for e in coordinator.get(
        f"/v1/participants/{pid}/history").json()["events"]
        if e["type"] == "ParticipantWithdrawn")
    unquoted = coordinator.post("/v1/commands", {
        "command_id": str(uuid.uuid4()), "type": "CorrectData", "participant_id": pid,
        "reason": "no addresses in notes",
        "data": {"event_id": withdrawal, "field": "note", "value": "asked by mail"}})
    assert unquoted.status_code == 201, unquoted.text
    site.command_ids.update(query=asked.json()["command_id"],
                            withdrawal=left.json()["command_id"],
                            unquoted=unquoted.json()["command_id"])
    trialog = bootstrap(settings_for(site.database))
    try:
        sent = trialog.bus.dispatch(
            c.RecordReminderSent(pid, {"visit": "week6", "kind": "window_open",
                                       "recipients": [MARKER, "coordinator@case.example"]}),
            command_id=str(uuid.uuid4()), actor="reminder-worker")
        # A signature's meaning is shown in the state to every role, and kept there.
        signed = trialog.bus.dispatch(
            c.SignVisit(pid, {"visit": "baseline", "meaning": f"I approve; see {MARKER}",
                              "signer": "dr-okafor", "printed_name": "A. Okafor"}),
            command_id=str(uuid.uuid4()), actor="dr-okafor")
    finally:
        trialog.close()
    coordinator.get(f"/v1/participants/{pid}", after=signed.body["position"])
    site.command_ids.update(screening=screened.json()["command_id"],
                            reminder=sent.body["command_id"],
                            signature=signed.body["command_id"],
                            consent=consented.json()["command_id"])
    return pid


def reads(pid: str) -> list[str]:
    return [f"/v1/participants/{pid}", f"/v1/participants/{pid}/history",
            f"/v1/participants/{pid}/history?version=4",
            f"/v1/participants/{pid}/history?as_of=2999-01-01T00:00:00Z",
            f"/v1/participants/{pid}?version=1",
            f"/v1/participants/{pid}?as_of=2999-01-01T00:00:00Z", "/v1/participants",
            "/v1/deviations",
            "/v1/queries",
            "/v1/visits/due?within_days=365", "/v1/trial/summary", "/v1/exports/odm",
            "/v1/exports/csv", "/v1/exports/fhir", "/v1/exports/odm?deidentify=true",
            "/v1/audit/verify", "/v1/feed?after=0&limit=1000"]


@pytest.mark.parametrize("role", sorted(set(ROLES) - WITH_CONTACT))
def test_no_read_of_a_role_without_contact_rights_holds_the_address(site, participant, role):
    client = site.clients[role]
    local_part = MARKER.split("@")[0]
    for path in reads(participant):
        answer = client.get(path)
        assert answer.status_code in (200, 403), (path, answer.status_code)
        assert local_part not in answer.text, (role, path)
        assert BIRTH_DATE not in answer.text, (role, path)
    history = client.get(f"/v1/participants/{participant}/history").json()["events"]
    reminder = next(e for e in history if e["type"] == "ReminderSent")
    assert reminder["data"]["recipients"] == ["[redacted]", "[redacted]"]
    correction = next(e for e in history if e["type"] == "DataCorrected")
    assert correction["reason"] == f"as {mask_email(MARKER)} wrote to the site"


@pytest.mark.parametrize("role", sorted(set(ROLES) - WITH_CONTACT))
def test_without_contact_rights_no_read_holds_the_id_of_a_command_that_carried_them(
        site, participant, role):
    """With a screening's command id, a caller that may screen (`service`) could send it
    again with guessed contact details and learn from the answer whether they were right
    (the first answer, or 409 for another body)."""
    client = site.clients[role]
    hidden = [site.command_ids[name] for name in (  # (the last five quote the address)
        "screening", "reminder", "correction", "query", "withdrawal", "unquoted",
        "signature")]
    for path in reads(participant):
        answer = client.get(path)
        assert not [i for i in hidden if i in answer.text], (role, path)
    history = client.get(f"/v1/participants/{participant}/history").json()["events"]
    shown = {e["type"]: e["command_id"] for e in history}
    assert shown["ParticipantScreened"] == shown["ReminderSent"] == "[redacted]"
    assert shown["DataCorrected"] == "[redacted]"
    assert shown["ConsentRecorded"] == site.command_ids["consent"]


@pytest.mark.parametrize("role", sorted(WITH_CONTACT))
def test_roles_with_contact_rights_see_the_address_and_the_recipients(site, participant, role):
    client = site.clients[role]
    assert client.get(f"/v1/participants/{participant}").json()["contact"]["email"] == MARKER
    history = client.get(f"/v1/participants/{participant}/history").json()["events"]
    reminder = next(e for e in history if e["type"] == "ReminderSent")
    assert MARKER in reminder["data"]["recipients"]
    assert reminder["command_id"] == site.command_ids["reminder"]
    correction = next(e for e in history if e["type"] == "DataCorrected")
    assert correction["reason"] == f"as {MARKER} wrote to the site"
    raised = next(e for e in history if e["type"] == "QueryRaised")
    assert MARKER in raised["data"]["text"]  # the list keeps it masked, in plain text
    signed = next(e for e in history if e["type"] == "RecordSigned")
    assert MARKER in signed["data"]["meaning"]  # the state shows it masked, to every role


def test_the_log_and_the_database_file_never_hold_the_address(site, participant):
    for role in ROLES:  # every role has read everything once
        for path in reads(participant):
            site.clients[role].get(path)
    local_part = MARKER.split("@")[0].encode()
    assert local_part not in (site.folder / "server.log").read_bytes()
    files = [f for f in site.folder.iterdir() if f.name.startswith("trialog.db")]
    assert files
    for file in files:
        assert local_part not in file.read_bytes(), file.name
