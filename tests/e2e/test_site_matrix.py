"""The role × site matrix over HTTP: for every role, a token scoped to CASE ("inside") and
one scoped to METRO ("outside") act on and read a CASE participant that has visits, scores,
an open query, a deviation, contact details and a disclosure in the access log. Outside,
the participant does not exist: every answer is the one a never-existing id gets (status,
body and headers but Date, X-Request-Id and Trialog-Position, once the ids are swapped), and
nothing of it shows in any list, count, export, verification or access log. All-sites
tokens still see both sites. Tokens, people and participants are made once per database.

Also: a command id recorded for a CASE participant answers a METRO token as an unused one;
the server's own command ids (the deviation monitor's) can't be computed from a
participant id; and a METRO query may carry the id of a CASE query."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import NAMESPACE_URL, uuid5

import pytest
import requests

from domain import commands as c
from domain.access import Scope
from domain.commands import COMMAND_TYPES
from domain.participant import event_uuid, participant_uuid
from infrastructure.store.bootstrap import bootstrap
from infrastructure.store.people import create_user
from infrastructure.store.tokens import (
    COMMANDS_BY_ROLE,
    CONTACT_ROLES,
    READS_BY_ROLE,
    ROLES,
    create_token,
)
from tests.conftest import TEST_SECRETS, settings_for
from tests.e2e import payloads as p
from tests.e2e.conftest import TRIALOG, Client, Server, free_port, wait_until_up

SITES = ("CASE", "METRO")
# Headers that differ from one answer to the next whatever the caller may see.
VOLATILE_HEADERS = frozenset({"date", "trialog-position", "x-request-id"})
ID = "<participant>"
WAIT = 10  # seconds the read side may take to reach a position (?after=)


def day(offset: int) -> str:
    """A date relative to today (the server's clock): the participants are registered ten
    days ago, so that their later visits are still due."""
    return (datetime.now(UTC).date() + timedelta(days=offset)).isoformat()


def screening(site: str, email: str) -> dict[str, Any]:
    return p.screening(site) | {"screened_on": day(-12), "email": email}


def consent() -> dict[str, Any]:
    return p.CONSENT | {"signed_on": day(-11)}


def baseline_visit() -> dict[str, Any]:
    return p.visit("baseline", 0, pain=6) | {"completed_on": day(-10)}


# --- answers compared ------------------------------------------------------------------


def headers(answer: requests.Response) -> dict[str, str]:
    return {k.lower(): v for k, v in answer.headers.items()
            if k.lower() not in VOLATILE_HEADERS}


def assert_same(known: requests.Response, known_id: str, unknown: requests.Response,
                unknown_id: str) -> None:
    """Two answers are the same once each participant id is replaced by a placeholder:
    status, body and every header but the volatile ones."""
    assert len(known_id) == len(unknown_id)  # so that Content-Length may be compared
    assert known.status_code == unknown.status_code, (known.text, unknown.text)
    assert known.text.replace(known_id, ID) == unknown.text.replace(unknown_id, ID)
    assert ({k: v.replace(known_id, ID) for k, v in headers(known).items()}
            == {k: v.replace(unknown_id, ID) for k, v in headers(unknown).items()})


def assert_hidden(answer: requests.Response, secrets: tuple[str, ...]) -> None:
    """None of the secrets is in the body or in a header but the volatile ones."""
    shown = answer.text + "\n" + "\n".join(f"{k}: {v}" for k, v in headers(answer).items())
    for secret in secrets:
        assert secret not in shown, (answer.request.method, answer.request.url, secret)


# --- the world: tokens and participants --------------------------------------------------


@dataclass
class Participant:
    pid: str
    email: str
    version: int
    deviation_id: str
    event_ids: list[str]
    visit_event: str  # the baseline VisitCompleted, a data-capturing event
    query_id: str  # an open query about the baseline visit
    as_of: str  # when its last event was recorded
    position: int
    sent: list[dict[str, Any]] = field(default_factory=list)  # the command bodies

    def secrets(self) -> tuple[str, ...]:
        return (self.pid, self.email, self.deviation_id, self.query_id, *self.event_ids,
                *(body["command_id"] for body in self.sent))


@dataclass
class World:
    server: Server
    clients: dict[tuple[str, str], Client]  # (role, site) -> a token scoped to that site
    names: dict[tuple[str, str], str]  # their token names
    signers: dict[str, Client]  # site -> an investigator's own session, scoped to it
    logins: dict[str, str]  # site -> that investigator's login
    case: Participant
    metro: Participant

    def client(self, role: str, site: str) -> Client:
        return self.clients[role, site]

    def secrets(self, asked: bool = False) -> tuple[str, ...]:
        """What METRO tokens must never be shown: the CASE participant and the names of
        the CASE tokens (the actors of its events and disclosures). When the request
        ``asked`` about the participant by its id, the answer may echo the id (as it
        echoes a never-existing one's; the answers are compared for that)."""
        case_names = [name for (_, site), name in self.names.items() if site == "CASE"]
        return tuple(s for s in (*self.case.secrets(), *case_names,
                                 self.logins["CASE"])
                     if not (asked and s == self.case.pid))

    def data(self, type_: str) -> dict[str, Any]:
        """Valid data for each command type about the CASE participant."""
        return command_data(self.case, type_)


def command_data(participant: Participant, type_: str) -> dict[str, Any]:
    data: dict[str, dict[str, Any]] = {
        "ScreenParticipant": screening("CASE", "someone-else@example.org"),
        "RecordConsent": consent(),
        "RandomizeParticipant": {"registered_on": day(-10)},
        "RecordBloodSample": {"timepoint": "week6",
                              "collected_at": f"{day(-1)}T09:00:00Z"},
        "RecordDose": {"taken_on": day(-1), "taken": True, "dose_mcg": 1000},
        "CompleteVisit": p.visit("week6", 42) | {"completed_on": day(-1)},
        "ReportMedication": {"drug": "ibuprofen", "contains_b12": False},
        "WithdrawParticipant": {"withdrawn_on": day(-1), "scope": "treatment",
                                "reason_code": "moved_away"},
        "CorrectData": {"event_id": participant.visit_event, "field": "bpi_sf.worst",
                        "value": 9},
        "ResolveDeviation": {"deviation_id": participant.deviation_id,
                             "resolution": "source checked"},
        # Data management (the contract's "Data management" section).
        "RaiseQuery": {"query_id": str(uuid.uuid4()), "text": "Please check the pain score",
                       "visit": "baseline"},
        "RespondToQuery": {"query_id": participant.query_id,
                           "text": "Checked against the source"},
        "CloseQuery": {"query_id": participant.query_id},
        "ReopenQuery": {"query_id": participant.query_id},
        "CancelQuery": {"query_id": participant.query_id},
        "VerifySource": {"visit": "baseline"},
        "SignVisit": {"visit": "baseline", "meaning": "I approve this visit's data",
                      "password": "not the password"},
        "SignCasebook": {"meaning": "I approve this casebook", "password": "not it"},
        "LockVisit": {"visit": "baseline"},
        "UnlockVisit": {"visit": "baseline"},
        "LockCasebook": {},
        "UnlockCasebook": {},
    }
    assert set(COMMAND_TYPES) <= set(data), "a new command type needs its data here"
    return data[type_]


PASSWORD = "the investigator's own password"
# Only a person's session may sign (with the password again): a machine token of a role
# that may sign is refused, but never differently for a participant it can't see.
SIGNING = frozenset({"SignVisit", "SignCasebook"})
WITH_REASON = frozenset({"CorrectData", "ReopenQuery", "UnlockVisit", "UnlockCasebook"})


def envelope(type_: str) -> dict[str, Any]:
    return {"reason": "transcription error"} if type_ in WITH_REASON else {}


def send(client: Client, type_: str, pid: str, data: dict[str, Any],
         command_id: str | None = None, **extra: Any) -> requests.Response:
    body = {"command_id": command_id or str(uuid.uuid4()), "type": type_,
            "participant_id": pid, "data": data, **envelope(type_), **extra}
    return client.post("/v1/commands", body)


def populate(server: Server, trialog: Any, client: Client, monitor: Client,
             site: str) -> Participant:
    """A randomized participant of ``site`` with a dose, a blood sample, its baseline visit
    (scores), a query raised by ``monitor``, a flagged deviation and contact details, shown
    once to an all-sites coordinator (a row of the access log); the read side has it
    all."""
    pid = p.participant_id(site)
    email = f"contact-{uuid.uuid4().hex[:12]}@example.org"
    sent = []
    for type_, data in (
            ("ScreenParticipant", screening(site, email)),
            ("RecordConsent", consent()),
            ("RandomizeParticipant", {"registered_on": day(-10)}),
            ("RecordDose", {"taken_on": day(-9), "taken": True, "dose_mcg": 1000}),
            ("RecordBloodSample", {"timepoint": "baseline",
                                   "collected_at": f"{day(-10)}T08:30:00Z"}),
            ("CompleteVisit", baseline_visit())):
        body = {"command_id": str(uuid.uuid4()), "type": type_, "participant_id": pid,
                "data": data}
        answer = client.post("/v1/commands", body)
        assert answer.status_code == 201, answer.text
        sent.append(body)
    query_id = str(uuid.uuid4())
    raised = {"command_id": str(uuid.uuid4()), "type": "RaiseQuery", "participant_id": pid,
              "data": {"query_id": query_id, "text": "Is the worst pain right?",
                       "visit": "baseline"}}
    answer = monitor.post("/v1/commands", raised)
    assert answer.status_code == 201, answer.text
    sent.append(raised)
    deviation_id = str(uuid.uuid4())
    flagged = trialog.bus.dispatch(
        c.FlagDeviation(pid, {"deviation_id": deviation_id, "code": "wrong_dose",
                              "severity": "minor", "evidence": [], "detail": "site matrix"}),
        command_id=str(uuid.uuid4()), actor="deviation-monitor")
    position = flagged.body["position"]
    admin = server.client("admin")
    assert admin.get("/v1/trial/summary", after=position, wait=WAIT).status_code == 200
    shown = server.client("coordinator").get(f"/v1/participants/{pid}")
    assert shown.json()["contact"]["email"] == email
    events = admin.get(f"/v1/participants/{pid}/history").json()["events"]
    return Participant(
        pid=pid, email=email, version=events[-1]["version"], deviation_id=deviation_id,
        event_ids=[e["event_id"] for e in events],
        visit_event=next(e["event_id"] for e in events if e["type"] == "VisitCompleted"),
        query_id=query_id, as_of=events[-1]["recorded_at"], position=position, sent=sent)


@pytest.fixture(scope="module")
def trialog(server):
    t = bootstrap(settings_for(server.database))
    yield t
    t.close()


@pytest.fixture(scope="module")
def world(server, trialog) -> World:
    clients, names = {}, {}
    for role in ROLES:
        for site in SITES:
            name = f"{role}-{site.lower()}-{uuid.uuid4().hex[:8]}"
            token = create_token(trialog.engine, name, role, Scope.of([site]))
            clients[role, site], names[role, site] = Client(server.url, token), name
    signers, logins = {}, {}
    for site in SITES:
        login = f"investigator.{site.lower()}.{uuid.uuid4().hex[:8]}"
        create_user(trialog.engine, login, f"Dr {site.title()}", "investigator",
                    Scope.of([site]), PASSWORD)
        session = Client(server.url, None).post("/v1/sessions", {"login": login,
                                                                "password": PASSWORD})
        assert session.status_code == 201, session.text
        signers[site], logins[site] = Client(server.url, session.json()["token"]), login
    # Each participant is recorded by its own site's service and monitor tokens.
    case, metro = (populate(server, trialog, clients["service", site],
                            clients["monitor", site], site) for site in SITES)
    return World(server, clients, names, signers, logins, case, metro)


# --- 1. commands -------------------------------------------------------------------------


@pytest.mark.parametrize("command_type", sorted(COMMAND_TYPES))
@pytest.mark.parametrize("role", ROLES)
def test_a_command_about_a_case_participant_by_role_and_site(world, role, command_type):
    inside, outside = world.client(role, "CASE"), world.client(role, "METRO")
    case, ghost = world.case, p.participant_id("CASE")
    data = world.data(command_type)

    if command_type not in COMMANDS_BY_ROLE[role]:
        # The role decides first, whichever site and whether the participant exists.
        for client in (inside, outside):
            known = send(client, command_type, case.pid, data)
            assert known.status_code == 403, known.text
            assert known.json()["error"] == "forbidden"
            assert_same(known, case.pid, send(client, command_type, ghost, data), ghost)
        return

    if command_type in SIGNING:
        # A machine token is refused before anything is looked up, whichever site.
        for client in (inside, outside):
            known = send(client, command_type, case.pid, data)
            assert (known.status_code, known.json()["error"]) == (403, "forbidden")
            assert_same(known, case.pid, send(client, command_type, ghost, data), ghost)
        # A person's own session, with the password again: inside it reaches the
        # participant; outside it is an unknown id's answer.
        signed = data | {"password": PASSWORD}
        answer = send(world.signers["CASE"], command_type, case.pid, signed,
                      expected_version=0)
        assert answer.status_code == 409, answer.text
        assert answer.json()["actual_version"] == case.version
        outsider = world.signers["METRO"]
        known = send(outsider, command_type, case.pid, signed)
        assert known.status_code == 404, known.text
        assert known.json() == {"error": "not_found",
                                "message": f"participant {case.pid} not found"}
        assert_same(known, case.pid, send(outsider, command_type, ghost, signed), ghost)
        return

    # Inside, the command reaches the participant: a stale expected version is the
    # conflict with its actual version (nothing is written).
    answer = send(inside, command_type, case.pid, data, expected_version=0)
    assert answer.status_code == 409, answer.text
    assert (answer.json()["error"], answer.json()["actual_version"]) == (
        "version_conflict", case.version)

    if command_type == "ScreenParticipant":
        # A new CASE id inside: accepted as far as the version check (still nothing written).
        fresh = send(inside, command_type, ghost, data, expected_version=1)
        assert fresh.status_code == 409, fresh.text
        assert fresh.json()["actual_version"] == 0
        # A screening at a site outside the scope is refused before anything is looked up.
        known = send(outside, command_type, case.pid, data)
        assert known.status_code == 403, known.text
        assert known.json()["error"] == "site_not_allowed"
        assert_same(known, case.pid, send(outside, command_type, ghost, data), ghost)
        # At the token's own site, a CASE- id breaks the prefix rule, known or not.
        at_metro = data | {"site_id": "METRO"}
        known = send(outside, command_type, case.pid, at_metro)
        assert known.status_code == 422, known.text
        assert "participant_id" in known.json()["fields"]
        assert_same(known, case.pid, send(outside, command_type, ghost, at_metro), ghost)
        # The outside token may screen at its own site (the refusals are about the site).
        metro_id = p.participant_id("METRO")
        own = send(outside, command_type, metro_id, at_metro, expected_version=1)
        assert own.status_code == 409 and own.json()["actual_version"] == 0, own.text
        return

    # Outside, the participant does not exist: what a never-existing id gets, whatever
    # the expected version (a stale one first: a leak would show as a 409, not a write).
    for extra in ({"expected_version": 0}, {}, {"expected_version": case.version}):
        known = send(outside, command_type, case.pid, data, **extra)
        assert known.status_code == 404, (extra, known.text)
        assert known.json() == {"error": "not_found",
                                "message": f"participant {case.pid} not found"}
        assert_same(known, case.pid, send(outside, command_type, ghost, data, **extra), ghost)


@pytest.fixture(scope="module")
def retried(server, world):
    """A CASE participant screened and consented by the CASE service token: the bodies as
    sent and the first answers."""
    client = world.client("service", "CASE")
    pid = p.participant_id("CASE")
    bodies = {
        "ScreenParticipant": {"command_id": str(uuid.uuid4()), "type": "ScreenParticipant",
                              "participant_id": pid,
                              "data": screening("CASE", "retried@example.org")},
        "RecordConsent": {"command_id": str(uuid.uuid4()), "type": "RecordConsent",
                          "participant_id": pid, "data": consent()},
    }
    first = {}
    for type_, body in bodies.items():
        answer = client.post("/v1/commands", body)
        assert answer.status_code == 201, answer.text
        first[type_] = answer.json()
    return pid, bodies, first


@pytest.mark.parametrize("role", ROLES)
def test_a_retry_of_a_case_command_by_a_metro_token_is_refused_as_the_first_time(
        world, retried, role):
    pid, bodies, first = retried
    ghost = p.participant_id("CASE")
    for type_, body in bodies.items():
        inside, outside = world.client(role, "CASE"), world.client(role, "METRO")
        again = outside.post("/v1/commands", body)
        fresh = send(outside, type_, ghost, body["data"])  # the first time, unknown id
        assert_same(again, pid, fresh, ghost)
        assert_hidden(again, (body["command_id"],))
        if type_ not in COMMANDS_BY_ROLE[role]:
            assert again.status_code == 403 and again.json()["error"] == "forbidden"
            continue
        expected = (403, "site_not_allowed") if type_ == "ScreenParticipant" else (
            404, "not_found")
        assert (again.status_code, again.json()["error"]) == expected, again.text
        # Inside, the same retry is answered the first answer (nothing written).
        replayed = inside.post("/v1/commands", body)
        assert replayed.status_code == 200, replayed.text
        assert replayed.json() == first[type_]


# --- 2. reads ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Read:
    path: str  # {pid}: the participant read about
    params: tuple[tuple[str, str], ...]  # {pid}, {as_of} are filled in
    what: str  # the read of the role table
    shape: str  # one | list | filtered | summary | verify

    def __str__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.params)
        return self.path + (f"?{query}" if query else "")

    def get(self, client: Client, pid: str, as_of: str) -> requests.Response:
        params = {k: v.format(pid=pid, as_of=as_of) for k, v in self.params}
        return client.get(self.path.format(pid=pid), **params)


def read(path: str, what: str, shape: str, **params: str) -> Read:
    return Read(path, tuple(params.items()), what, shape)


READS = (
    read("/v1/participants/{pid}", "participants", "one"),
    read("/v1/participants/{pid}", "participants", "one", as_of="{as_of}"),
    read("/v1/participants/{pid}", "participants", "one", version="1"),
    read("/v1/participants/{pid}/history", "history", "one"),
    read("/v1/participants/{pid}/history", "history", "one", as_of="{as_of}"),
    read("/v1/participants/{pid}/history", "history", "one", version="1"),
    read("/v1/participants", "participants", "list", limit="10000"),
    read("/v1/participants", "participants", "filtered", site_id="CASE", limit="10000"),
    read("/v1/deviations", "deviations", "list", limit="10000"),
    read("/v1/deviations", "deviations", "filtered", participant_id="{pid}"),
    read("/v1/queries", "queries", "list", limit="10000"),
    read("/v1/queries", "queries", "filtered", participant_id="{pid}"),
    read("/v1/queries", "queries", "filtered", site_id="CASE", limit="10000"),
    read("/v1/visits/due", "visits", "list", within_days="3660", limit="10000"),
    read("/v1/trial/summary", "summary", "summary"),
    read("/v1/audit/verify", "audit", "verify"),
    read("/v1/exports/csv", "exports", "list"),
    read("/v1/exports/odm", "exports", "list"),
    read("/v1/exports/fhir", "exports", "list"),
    read("/v1/audit/access", "access_log", "list", limit="10000"),
    read("/v1/audit/access", "access_log", "filtered", participant_id="{pid}"),
)


@pytest.mark.parametrize("what", READS, ids=str)
@pytest.mark.parametrize("role", ROLES)
def test_a_read_about_a_case_participant_by_role_and_site(world, role, what):
    case, metro = world.case, world.metro
    allowed = what.what in READS_BY_ROLE[role]
    inside = what.get(world.client(role, "CASE"), case.pid, case.as_of)
    outside = what.get(world.client(role, "METRO"), case.pid, case.as_of)

    # Inside: the participant shows where the role may read, and only CASE shows.
    assert inside.status_code == (200 if allowed else 403), inside.text
    assert_hidden(inside, metro.secrets())
    if allowed:
        if what.shape == "one":
            assert inside.json()["participant_id"] == case.pid
            # Contact details only to the roles that may see them.
            assert (case.email in inside.text) is (role in CONTACT_ROLES)
        elif what.shape in ("list", "filtered"):
            assert case.pid in inside.text
        elif what.shape == "summary":
            assert set(inside.json()["by_site"]) == {"CASE"}
            assert inside.json()["deviations_by_code"]["wrong_dose"] >= 1
        else:  # verify: the CASE participants' events are counted
            body = inside.json()
            assert body["ok"] is True and body["events_checked"] >= case.version

    # Outside: nothing of the CASE participant, in any answer.
    assert_hidden(outside, world.secrets(asked="{pid}" in str(what)))
    if what.shape == "one":
        # The participant does not exist: exactly what a never-existing id gets.
        ghost = p.participant_id("CASE")
        unknown = what.get(world.client(role, "METRO"), ghost, case.as_of)
        assert outside.status_code == 404, outside.text
        assert outside.json() == {"error": "not_found",
                                  "message": f"participant {case.pid} not found"}
        assert_same(outside, case.pid, unknown, ghost)
        return
    assert outside.status_code == (200 if allowed else 403), outside.text
    if not allowed:
        return
    if what.shape == "filtered":  # about CASE or the CASE participant: empty
        assert outside.json() in ({"participants": []}, {"deviations": []},
                                  {"queries": []}, {"disclosures": []}), outside.text
        ghost = p.participant_id("CASE")
        assert_same(outside, case.pid, what.get(world.client(role, "METRO"), ghost,
                                                case.as_of), ghost)
    elif what.shape == "list":  # the token's own site shows
        assert metro.pid in outside.text
    elif what.shape == "summary":
        assert set(outside.json()["by_site"]) == {"METRO"}
    else:
        body = outside.json()
        assert body["ok"] is True and body["events_checked"] >= metro.version


def metro_view(world: World) -> dict[str, Any]:
    """Everything METRO tokens read that does not name a participant, made comparable
    (an ODM document's id and creation time, a verification's duration left out)."""
    view: dict[str, Any] = {}
    for role in ROLES:
        client = world.client(role, "METRO")
        if "summary" in READS_BY_ROLE[role]:
            view[role, "summary"] = client.get("/v1/trial/summary").json()
    # A role without contact details: its exports record no disclosure of their own.
    reader, auditor = world.client("monitor", "METRO"), world.client("auditor", "METRO")
    for path, params in (("/v1/participants", {"limit": 10000}),
                         ("/v1/deviations", {"limit": 10000}),
                         ("/v1/queries", {"limit": 10000}),
                         ("/v1/visits/due", {"within_days": 3660, "limit": 10000}),
                         ("/v1/exports/csv", {}), ("/v1/exports/fhir", {}),
                         ("/v1/exports/csv", {"deidentify": "true"}),
                         ("/v1/exports/fhir", {"deidentify": "true"})):
        answer = reader.get(path, **params)
        assert answer.status_code == 200, answer.text
        view[path, tuple(params.items())] = answer.text
    for params in ({}, {"deidentify": "true"}):
        odm = reader.get("/v1/exports/odm", **params)
        assert odm.status_code == 200
        view["odm", tuple(params.items())] = re.sub(
            r' (FileOID|CreationDateTime|EffectiveDate)="[^"]*"', "", odm.text)
    verify = reader.get("/v1/audit/verify").json()
    verify.pop("seconds", None)
    view["verify"] = verify
    view["access"] = auditor.get("/v1/audit/access", limit=10000).json()
    return view


def test_what_metro_tokens_read_does_not_change_when_a_case_participant_is_added(
        server, trialog, world):
    everyone, case_only = server.client("admin"), world.client("admin", "CASE")
    before = metro_view(world)
    everyone_before = everyone.get("/v1/trial/summary").json()
    case_before = case_only.get("/v1/trial/summary").json()

    # Recorded by the CASE service token, shown to an all-sites coordinator (disclosed).
    added = populate(server, trialog, world.client("service", "CASE"),
                     world.client("monitor", "CASE"), "CASE")
    for client in (everyone, case_only, world.client("coordinator", "METRO")):
        waited = client.get("/v1/trial/summary", after=added.position, wait=WAIT)
        assert waited.status_code == 200, waited.text

    after = metro_view(world)
    assert after == before
    arm = everyone.get(f"/v1/participants/{added.pid}").json()["arm"]
    # The read side does have the participant: the counts that may see it grew.
    for was, now in ((everyone_before, everyone.get("/v1/trial/summary").json()),
                     (case_before, case_only.get("/v1/trial/summary").json())):
        assert now["participants"] >= was["participants"] + 1
        assert now["by_site"]["CASE"] >= was["by_site"].get("CASE", 0) + 1
        assert (now["deviations_by_code"]["wrong_dose"]
                >= was["deviations_by_code"].get("wrong_dose", 0) + 1)
        pain = now["mean_pain_by_arm_and_visit"][arm]["baseline"]["n"]
        assert pain >= was["mean_pain_by_arm_and_visit"].get(arm, {}).get(
            "baseline", {}).get("n", 0) + 1


# --- 3. the sweep ------------------------------------------------------------------------


Probe = Callable[[str], requests.Response]


def coordinator_probes(world: World) -> dict[str, Probe]:
    """Every request a METRO coordinator may make about a participant, by name: each is
    given the participant's id."""
    client = world.client("coordinator", "METRO")
    as_of = world.case.as_of

    def head(path: str, **params: Any) -> requests.Response:
        return client.session.head(client.url + path, params=params, timeout=30)

    probes: dict[str, Probe] = {}
    for base in ("/v1/participants/{}", "/v1/participants/{}/history"):
        for params in ({}, {"as_of": as_of}, {"version": 1}, {"version": 999},
                       {"version": "x"}, {"as_of": "not a time"},
                       {"as_of": as_of, "version": 1}, {"after": 0},
                       {"after": 2**40}, {"as_of": "2000-01-01T00:00:00"}):
            name = f"GET {base}?{params}"
            probes[name] = lambda pid, b=base, q=params: client.get(b.format(pid), **q)
        probes[f"HEAD {base}"] = lambda pid, b=base: head(b.format(pid))
        probes[f"POST {base}"] = lambda pid, b=base: client.post(b.format(pid), {})
    for path in ("/v1/deviations", "/v1/queries", "/v1/audit/access"):
        probes[f"GET {path}?participant_id"] = (
            lambda pid, path=path: client.get(path, participant_id=pid))
        probes[f"GET {path}?participant_id&status"] = (
            lambda pid, path=path: client.get(path, participant_id=pid, status="open"))

    may_issue = sorted(t for t in COMMAND_TYPES if t in COMMANDS_BY_ROLE["coordinator"])
    assert "CorrectData" in may_issue and "ScreenParticipant" in may_issue
    for type_ in may_issue:
        data = world.data(type_)
        variants: dict[str, dict[str, Any]] = {
            "": data, "empty data": {}, "bad date": data | {
                k: "2026-13-45" for k, v in data.items()
                if isinstance(v, str) and re.fullmatch(r"\d{4}-\d\d-\d\d", v)}}
        if type_ == "ScreenParticipant":
            variants["at METRO"] = data | {"site_id": "METRO"}
            variants["at no site"] = data | {"site_id": "ELSEWHERE"}
        for label, payload in variants.items():
            for extra in ({}, {"expected_version": 0},
                          {"expected_version": world.case.version}):
                probes[f"{type_} {label} {extra}"] = (
                    lambda pid, t=type_, d=payload, e=extra: send(client, t, pid, d, **e))
        if type_ == "CorrectData":
            probes["CorrectData without reason"] = lambda pid, d=data: client.post(
                "/v1/commands", {"command_id": str(uuid.uuid4()), "type": "CorrectData",
                                 "participant_id": pid, "data": d})

    def batch(pid: str) -> requests.Response:
        commands = [{"command_id": str(uuid.uuid4()), "type": t, "participant_id": pid,
                     "data": world.data(t), **envelope(t)} for t in may_issue]
        return client.post("/v1/commands/batch", {"commands": commands})

    probes["batch of every command"] = batch
    return probes


def test_a_metro_coordinator_cannot_learn_that_a_case_participant_exists(world):
    case, ghost = world.case, p.participant_id("CASE")
    metro = world.client("coordinator", "METRO")
    statuses = set()
    for name, probe in coordinator_probes(world).items():
        known, unknown = probe(case.pid), probe(ghost)
        try:
            assert_same(known, case.pid, unknown, ghost)
            assert_hidden(known, world.secrets(asked=True))
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
        statuses.add(known.status_code)
    # The sweep met the refusals it is about, not only one kind of answer.
    assert {200, 403, 404, 405, 422} <= statuses, statuses

    # Retries of the commands that recorded the CASE participant: the unknown id's answer.
    for body in case.sent:
        again = metro.post("/v1/commands", body)
        first_time = send(metro, body["type"], ghost, body["data"])
        assert_same(again, case.pid, first_time, ghost)
        assert again.status_code in (403, 404), again.text
        assert_hidden(again, world.secrets(asked=True))

    # And the reads that name no participant show nothing of it either.
    for path, params in (("/v1/participants", {}), ("/v1/participants", {"site_id": "CASE"}),
                         ("/v1/deviations", {}), ("/v1/deviations", {"status": "open"}),
                         ("/v1/queries", {}), ("/v1/queries", {"site_id": "CASE"}),
                         ("/v1/visits/due", {"within_days": 3660}),
                         ("/v1/trial/summary", {}), ("/v1/audit/verify", {}),
                         ("/v1/exports/csv", {}), ("/v1/exports/odm", {}),
                         ("/v1/exports/fhir", {}), ("/v1/exports/odm", {"deidentify": "1"}),
                         ("/v1/audit/access", {})):
        answer = metro.get(path, **params)
        assert answer.status_code in (200, 403), (path, answer.text)
        assert_hidden(answer, world.secrets())


@pytest.mark.parametrize(("role", "type_", "name"), [
    ("coordinator", "CorrectData", "event_id"), ("admin", "CorrectData", "event_id"),
    ("monitor", "RaiseQuery", "event_id"),
    ("monitor", "ResolveDeviation", "deviation_id"),
    ("data_manager", "ResolveDeviation", "deviation_id"),
    ("coordinator", "RespondToQuery", "query_id"), ("monitor", "CloseQuery", "query_id"),
    ("data_manager", "CancelQuery", "query_id")])
def test_a_metro_command_naming_a_case_event_deviation_or_query_gets_what_a_random_id_gets(
        world, role, type_, name):
    metro = world.client(role, "METRO")
    data = command_data(world.metro, type_)
    if type_ == "RaiseQuery":  # a query about one recorded event instead of a visit
        del data["visit"]
    case_ref = data[name] = {"event_id": world.case.visit_event,
                             "deviation_id": world.case.deviation_id,
                             "query_id": world.case.query_id}[name]
    known = send(metro, type_, world.metro.pid, data)
    random_ref = str(uuid.uuid4())
    unknown = send(metro, type_, world.metro.pid, data | {name: random_ref})
    assert known.status_code == 422, known.text
    assert f"data.{name}" in known.json()["fields"]
    assert_same(known, case_ref, unknown, random_ref)
    assert_hidden(known, tuple(s for s in world.secrets() if s != case_ref))


# --- command ids anyone can compute --------------------------------------------------------


WRONG_DOSE = {"taken_on": day(-9), "taken": True, "dose_mcg": 500}


def flag_command_id(pid: str, dose_version: int) -> str:
    """The command id the deviation monitor gives the FlagDeviation of a wrong dose
    (infrastructure/jobs/monitor.py ``flag``: uuid5 of the deviation id, itself a uuid5 of
    the participant's uuid, the code and the dose's event id, a uuid5 of the participant's
    uuid and the version): computable from a guessed participant id and a small number."""
    participant = participant_uuid(pid)
    deviation_id = uuid5(participant, f"deviation:wrong_dose:"
                                      f"{event_uuid(participant, dose_version)}")
    return str(uuid5(NAMESPACE_URL, f"trialog:flag:{deviation_id}"))


@pytest.fixture(scope="module")
def monitored(server, trialog, world) -> tuple[str, int, str]:
    """A CASE participant with a wrong dose, flagged by the deviation monitor's own code:
    its id, the dose's version and the command id of the flag (as an all-sites token reads
    it in the history)."""
    from infrastructure.jobs.monitor import flag

    client = world.client("service", "CASE")
    pid = p.participant_id("CASE")
    for type_, data in (("ScreenParticipant", screening("CASE", "monitored@example.org")),
                        ("RecordConsent", consent()),
                        ("RandomizeParticipant", {"registered_on": day(-10)}),
                        ("RecordDose", WRONG_DOSE)):
        answer = send(client, type_, pid, data)
        assert answer.status_code == 201, answer.text
    version = answer.json()["version"]
    participant = trialog.service.get_participant(pid)
    assert flag(trialog, participant, trialog.ended_everywhere(), ("wrong_dose",)) == ["wrong_dose"]
    history = server.client("admin").get(f"/v1/participants/{pid}/history").json()
    flagged = history["events"][-1]
    assert flagged["type"] == "DeviationFlagged" and flagged["actor"] == "deviation-monitor"
    return pid, version, flagged["command_id"]


def test_a_command_id_recorded_for_a_case_participant_tells_a_metro_token_nothing(
        world, monitored):
    _, _, recorded = monitored
    metro = world.client("coordinator", "METRO")
    target = p.participant_id("METRO")  # never exists: nothing is written whatever comes
    unused = send(metro, "RecordDose", target, WRONG_DOSE, command_id=str(uuid.uuid4()))
    assert unused.status_code == 404, unused.text
    known = send(metro, "RecordDose", target, WRONG_DOSE, command_id=recorded)
    assert (known.status_code, known.text) == (unused.status_code, unused.text)


def test_the_monitor_s_command_ids_cannot_be_computed_from_a_participant_id(monitored):
    pid, version, recorded = monitored
    assert recorded != flag_command_id(pid, version)


# --- query ids are the client's ------------------------------------------------------------


@pytest.fixture(scope="module")
def private_server(tmp_path_factory) -> Iterator[dict[tuple[str, str], Client]]:
    """A server of its own (SQLite), for a test that leaves a participant set aside: the
    shared server's database stays healthy. Its clients by (role, site)."""
    folder = tmp_path_factory.mktemp("site-matrix-private")
    url = f"sqlite:///{folder / 'trialog.db'}"
    t = bootstrap(settings_for(url), migrate=True)
    tokens = {(role, site): create_token(t.engine, f"{role}-{site.lower()}", role,
                                         Scope.of([site]))
              for role in ("service", "monitor", "coordinator") for site in SITES}
    t.close()
    port = free_port()
    env = {**os.environ, "TRIALOG_DATABASE_URL": url, **TEST_SECRETS}
    with open(folder / "server.log", "w") as log:
        process = subprocess.Popen([TRIALOG, "serve", "--port", str(port)], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base, process, folder / "server.log")
        yield {key: Client(base, token) for key, token in tokens.items()}
    finally:
        process.terminate()
        process.wait(timeout=10)


def randomized(client: Client, site: str) -> str:
    pid = p.participant_id(site)
    for type_, data in (("ScreenParticipant", screening(site, "someone@example.org")),
                        ("RecordConsent", consent()),
                        ("RandomizeParticipant", {"registered_on": day(-10)})):
        answer = send(client, type_, pid, data)
        assert answer.status_code == 201, answer.text
    return pid


def test_a_metro_query_with_the_id_of_a_case_query_is_listed_like_any_other(private_server):
    clients = private_server
    case_pid = randomized(clients["service", "CASE"], "CASE")
    taken = str(uuid.uuid4())
    question = {"text": "Is the worst pain right?", "visit": "baseline"}
    raised = send(clients["monitor", "CASE"], "RaiseQuery", case_pid,
                  {"query_id": taken} | question)
    assert raised.status_code == 201, raised.text

    monitor, coordinator = clients["monitor", "METRO"], clients["coordinator", "METRO"]
    listed = {}
    for query_id in (str(uuid.uuid4()), taken):  # a fresh id, then the CASE query's
        pid = randomized(clients["service", "METRO"], "METRO")
        answer = send(monitor, "RaiseQuery", pid, {"query_id": query_id} | question)
        assert answer.status_code == 201, answer.text
        shown = coordinator.get("/v1/queries", participant_id=pid,
                                after=answer.json()["position"], wait=WAIT)
        assert shown.status_code == 200, shown.text
        listed[query_id] = [q["query_id"] for q in shown.json()["queries"]]
    assert listed == {query_id: [query_id] for query_id in listed}
    health = requests.get(coordinator.url + "/healthz", timeout=30).json()
    assert (health["status"], health["quarantined"]) == ("ok", 0)


# --- 4. all sites ------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_an_all_sites_token_sees_and_acts_on_both_sites(server, world, role):
    client = server.client(role)
    reads = READS_BY_ROLE[role]
    for participant in (world.case, world.metro):
        for path in (f"/v1/participants/{participant.pid}",
                     f"/v1/participants/{participant.pid}/history"):
            answer = client.get(path)
            assert answer.status_code == 200, answer.text
            assert (participant.email in answer.text) is (role in CONTACT_ROLES)
        for type_ in sorted(COMMANDS_BY_ROLE[role] & set(COMMAND_TYPES)):
            answer = send(client, type_, participant.pid,
                          command_data(participant, type_)
                          | ({"site_id": participant.pid.split("-")[0]}
                             if type_ == "ScreenParticipant" else {}),
                          expected_version=0)
            if type_ in SIGNING:  # a machine token can't sign, at any site
                assert (answer.status_code, answer.json()["error"]) == (403, "forbidden")
                continue
            assert answer.status_code == 409, (type_, answer.text)
            assert answer.json()["actual_version"] == participant.version
    both = (world.case.pid, world.metro.pid)
    lists = [("/v1/participants", "participants", {"limit": 10000}),
             ("/v1/deviations", "deviations", {"limit": 10000}),
             ("/v1/queries", "queries", {"limit": 10000}),
             ("/v1/visits/due", "visits", {"within_days": 3660, "limit": 10000}),
             ("/v1/exports/csv", "exports", {}), ("/v1/exports/odm", "exports", {}),
             ("/v1/exports/fhir", "exports", {}),
             ("/v1/audit/access", "access_log", {"limit": 10000})]
    for path, what, params in lists:
        answer = client.get(path, **params)
        assert answer.status_code == (200 if what in reads else 403), (path, answer.text)
        if what in reads:
            assert all(pid in answer.text for pid in both), path
    summary = client.get("/v1/trial/summary").json()
    assert {"CASE", "METRO"} <= set(summary["by_site"])


def test_the_matrix_covers_every_role_and_command():
    assert set(ROLES) == set(COMMANDS_BY_ROLE) == set(READS_BY_ROLE)
    # The feed's site filter has tests of its own (tests/e2e/test_feed.py); the webhook
    # list names no participant, nor does the access register, refused to callers of
    # some sites (tests/e2e/test_roles.py).
    assert {r.what for r in READS} | {"feed", "webhooks", "access_register"} >= set().union(
        *READS_BY_ROLE.values())
