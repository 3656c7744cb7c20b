"""A whole participant lifecycle over HTTP, retries and concurrency."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from tests.e2e import payloads as p


def enrol(client, site: str = "CASE") -> tuple[str, int]:
    pid = p.participant_id(site)
    assert client.command("ScreenParticipant", pid, p.screening(site)).status_code == 201
    assert client.command("RecordConsent", pid, p.CONSENT).status_code == 201
    answer = client.command("RandomizeParticipant", pid, p.RANDOMIZE)
    assert answer.status_code == 201, answer.text
    return pid, answer.json()["position"]


def test_a_participant_goes_from_screening_to_completion(server):
    service = server.client("service")
    pid, _ = enrol(service)
    blood = {"timepoint": "baseline", "collected_at": "2026-03-04T08:30:00Z",
             "results": {"b12_pg_ml": 410.0}}
    assert service.command("RecordBloodSample", pid, blood).status_code == 201
    for day in range(3):
        assert service.command("RecordDose", pid, p.dose(day)).status_code == 201
    for code, day, pain in (("baseline", 0, 6), ("week6", 42, 4), ("end_of_treatment", 90, 3),
                            ("follow_up", 180, 3)):
        answer = service.command("CompleteVisit", pid, p.visit(code, day, pain))
        assert answer.status_code == 201, answer.text
    last = answer.json()

    state = service.get(f"/v1/participants/{pid}", after=last["position"])
    assert state.status_code == 200
    body = state.json()
    assert (body["status"], body["version"]) == ("completed", last["version"])
    assert [v["status"] for v in body["visits"]] == ["completed"] * 4
    assert body["scores"]["week6"]["bpi_severity"] == 4.0  # (6 + 2 + 4 + 4) / 4
    assert "contact" not in body

    history = service.get(f"/v1/participants/{pid}/history").json()["events"]
    assert [e["version"] for e in history] == list(range(1, last["version"] + 1))
    assert {e["actor"] for e in history} == {server.names["service"]}
    assert history[0]["type"] == "ParticipantScreened"

    listed = service.get("/v1/participants", status="completed", site_id="CASE",
                         after=last["position"]).json()["participants"]
    assert pid in {row["participant_id"] for row in listed}
    summary = service.get("/v1/trial/summary").json()
    assert summary["by_status"]["completed"] >= 1


def test_the_state_as_of_a_moment_is_what_was_recorded_then(server):
    service = server.client("service")
    pid = p.participant_id()
    service.command("ScreenParticipant", pid, p.screening())
    consented = service.command("RecordConsent", pid, p.CONSENT).json()
    service.command("RandomizeParticipant", pid, p.RANDOMIZE)
    moment = consented["events"][0]["recorded_at"]

    then = service.get(f"/v1/participants/{pid}", as_of=moment)
    assert (then.json()["status"], then.json()["version"]) == ("consented", 2)
    before = service.get(f"/v1/participants/{pid}", as_of="2000-01-01T00:00:00")
    assert before.status_code == 404

    at_version = service.get(f"/v1/participants/{pid}", version=2).json()
    assert (at_version["status"], at_version["version"]) == ("consented", 2)
    assert service.get(f"/v1/participants/{pid}", version=9).status_code == 404
    both = service.get(f"/v1/participants/{pid}", version=2, as_of=moment)
    assert both.status_code == 422

    history = f"/v1/participants/{pid}/history"
    assert [e["version"] for e in service.get(history, version=2).json()["events"]] == [1, 2]
    beyond = service.get(history, version=9)  # as the state answers: not the whole record
    assert (beyond.status_code, beyond.json()["message"]) == (
        404, f"participant {pid} has no version 9")
    assert [e["version"] for e in service.get(history, as_of=moment).json()["events"]] == [1, 2]
    assert len(service.get(history).json()["events"]) == 3
    service.command("RecordDose", pid, {"taken_on": "2026-03-05", "taken": True,
                                        "dose_mcg": 1000})
    # The server keeps decoded histories: a new event still shows at once.
    assert [e["type"] for e in service.get(history).json()["events"]][-1] == "DoseRecorded"
    assert service.get(history, version=2, as_of=moment).status_code == 422


def test_a_retried_command_answers_the_first_answer_and_writes_nothing(server):
    service = server.client("service")
    pid = p.participant_id()
    body = {"command_id": str(uuid.uuid4()), "type": "ScreenParticipant",
            "participant_id": pid, "data": p.screening()}
    first = service.post("/v1/commands", body)
    again = service.post("/v1/commands", body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()

    other = dict(body, data=p.screening(language="es"))
    reused = service.post("/v1/commands", other)
    assert reused.status_code == 409
    assert reused.json()["error"] == "idempotency_key_reused"
    assert len(service.get(f"/v1/participants/{pid}/history").json()["events"]) == 1


def test_a_retry_whose_record_was_changed_in_the_database_is_refused(server):
    """The first answer kept for retries is sealed: edited outside trialog, it is given
    to no one, and the command is not decided again."""
    from sqlalchemy import create_engine, text

    service = server.client("service")
    pid = p.participant_id()
    body = {"command_id": str(uuid.uuid4()), "type": "ScreenParticipant",
            "participant_id": pid, "data": p.screening()}
    assert service.post("/v1/commands", body).status_code == 201
    engine = create_engine(server.database)
    edit = text("UPDATE trialog_commands SET response = replace(response, :was, :now) "
                "WHERE command_id = :id")
    try:
        with engine.begin() as connection:
            connection.execute(edit, {"was": '"version":1', "now": '"version":7',
                                      "id": body["command_id"]})
        again = service.post("/v1/commands", body)
        assert again.status_code == 409
        assert again.json() == {
            "error": "command_record_altered",
            "message": f"the record of command_id {body['command_id']} fails its seal (it "
                       "was changed outside trialog): its first answer can't be given; "
                       "trialog audit verify reports it"}
        assert len(service.get(f"/v1/participants/{pid}/history").json()["events"]) == 1
    finally:  # put back as it was: the server's store is shared by the other tests
        with engine.begin() as connection:
            connection.execute(edit, {"was": '"version":7', "now": '"version":1',
                                      "id": body["command_id"]})
        engine.dispose()
    assert service.post("/v1/commands", body).json()["version"] == 1
    assert any("fails its seal" in line and body["command_id"] in line
               for line in server.log_lines())


def test_concurrent_commands_without_expected_version_all_succeed(server):
    service = server.client("service")
    pid, _ = enrol(service)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda day: server.client("service").command(
            "RecordDose", pid, p.dose(day)), range(16)))
    assert [a.status_code for a in answers] == [201] * 16
    assert sorted(a.json()["version"] for a in answers) == list(range(4, 20))


def test_concurrent_commands_with_the_same_expected_version_one_wins(server):
    service = server.client("service")
    pid, _ = enrol(service)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda day: server.client("service").command(
            "RecordDose", pid, p.dose(day), expected_version=3), range(8)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [201] + [409] * 7
    conflicts = [a.json() for a in answers if a.status_code == 409]
    assert {c["error"] for c in conflicts} == {"version_conflict"}
    assert len(service.get(f"/v1/participants/{pid}/history").json()["events"]) == 4


def test_a_batch_answers_one_result_per_command_and_goes_on_after_a_failure(server):
    service = server.client("service")
    pid = p.participant_id()

    def command(type_, data):
        return {"command_id": str(uuid.uuid4()), "type": type_, "participant_id": pid,
                "data": data}

    batch = [command("ScreenParticipant", p.screening()),
             command("RandomizeParticipant", p.RANDOMIZE),  # not consented yet: 409
             command("RecordConsent", p.CONSENT),
             command("RandomizeParticipant", p.RANDOMIZE)]
    answer = service.post("/v1/commands/batch", {"commands": batch})
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert [r["status"] for r in results] == [201, 409, 201, 201]
    assert results[1]["body"]["error"] == "invalid_transition"
    assert results[3]["body"]["version"] == 3


def test_a_batch_entry_that_is_no_command_object_is_answered_alone(server):
    """An entry that is not an object refused the whole batch (422 on `commands.1`), the
    valid commands around it unwritten."""
    service = server.client("service")
    pid = p.participant_id()
    screen = {"command_id": str(uuid.uuid4()), "type": "ScreenParticipant",
              "participant_id": pid, "data": p.screening()}
    answer = service.post("/v1/commands/batch", {"commands": [screen, "oops", 7, None]})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["status"] for r in results] == [201, 422, 422, 422]
    assert results[1]["body"]["fields"] == {"body": ["must be a JSON object"]}
    assert service.get(f"/v1/participants/{pid}").status_code == 200


@pytest.mark.parametrize("body", [[1], [], "text", 7, False])
def test_a_body_that_is_no_json_object_is_refused_alike_by_every_command_endpoint(
        server, body):
    """The batch and trial endpoints took a body that is no object (an array, say) for
    an empty one, and named the fields it lacked (`commands`; `command_id` and `type`),
    not what was wrong with it, as `POST /v1/commands` does."""
    admin = server.client("admin")
    for path in ("/v1/commands", "/v1/commands/batch", "/v1/trial/commands"):
        answer = admin.post(path, body)
        assert answer.status_code == 422, (path, answer.text)
        assert answer.json()["fields"] == {"body": ["must be a JSON object"]}, path


def test_deviations_and_visits_due_are_listed(server):
    coordinator = server.client("coordinator")
    pid, position = enrol(coordinator)
    due = coordinator.get("/v1/visits/due", within_days=100000 // 100, after=position)
    assert due.status_code == 200
    deviations = coordinator.get("/v1/deviations", status="open", participant_id=pid)
    assert deviations.json() == {"deviations": []}


def _two_rows(server, path: str) -> int:
    """Makes at least two rows of the list; the position of the last command."""
    coordinator = server.client("coordinator")
    position = 0
    for _ in range(2):
        pid = p.participant_id()
        assert coordinator.command("ScreenParticipant", pid, p.screening()).status_code == 201
        assert coordinator.command("RecordConsent", pid, p.CONSENT).status_code == 201
        week_ago = (datetime.now(UTC).date() - timedelta(days=7)).isoformat()
        answer = coordinator.command("RandomizeParticipant", pid, {"registered_on": week_ago})
        assert answer.status_code == 201, answer.text
        if path == "/v1/queries":
            history = coordinator.get(f"/v1/participants/{pid}/history").json()["events"]
            answer = server.client("monitor").command("RaiseQuery", pid, {
                "query_id": str(uuid.uuid4()), "text": "date?",
                "event_id": history[-1]["event_id"], "field": "registered_on"})
            assert answer.status_code == 201, answer.text
        position = answer.json()["position"]
    return position


@pytest.mark.parametrize("path", ["/v1/visits/due", "/v1/queries", "/v1/participants"])
def test_a_list_reads_a_page_of_itself(server, path):
    """(Deviations' pages: tests/integration/test_lists.py, where the rows are made.)"""
    coordinator = server.client("coordinator")
    position = _two_rows(server, path)
    ahead = {"within_days": 3660} if path == "/v1/visits/due" else {}
    whole = coordinator.get(path, limit=10000, after=position, **ahead)
    assert whole.status_code == 200
    (key,) = whole.json()
    assert len(whole.json()[key]) >= 2
    page = coordinator.get(path, limit=1, offset=1, **ahead)
    assert page.json()[key] == whole.json()[key][1:2]


@pytest.mark.parametrize("path", ["/v1/deviations", "/v1/visits/due", "/v1/queries",
                                  "/v1/participants"])
def test_a_list_refuses_a_page_it_cannot_read(server, path):
    coordinator = server.client("coordinator")
    for params, field in (({"limit": 0}, "limit"), ({"limit": 10001}, "limit"),
                          ({"offset": -1}, "offset"), ({"limit": "x"}, "limit")):
        refused = coordinator.get(path, **params)
        assert (refused.status_code, list(refused.json()["fields"])) == (422, [field])


def test_an_auditor_downloads_the_csv_export(server):
    pid, position = enrol(server.client("service"))
    service = server.client("service")
    service.command("CompleteVisit", pid, p.visit("baseline", 0, pain=6))
    auditor = server.client("auditor")
    auditor.get("/v1/trial/summary", after=position)
    answer = auditor.get("/v1/exports/csv")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/csv")
    lines = answer.text.splitlines()
    assert lines[0].startswith("participant_id,site_id,arm,visit,completed_on,bpi_severity")
    assert any(line.startswith(f"{pid},CASE,") for line in lines[1:])
    masked = auditor.get("/v1/exports/csv", deidentify="true").text
    assert pid not in masked


def test_an_auditor_downloads_the_odm_and_fhir_exports(server):
    from fhir.resources.R4B.researchsubject import ResearchSubject
    from lxml import etree

    pid, position = enrol(server.client("service"))
    auditor = server.client("auditor")
    auditor.get("/v1/trial/summary", after=position)
    odm = auditor.get("/v1/exports/odm")
    assert odm.status_code == 200 and odm.headers["Content-Type"].startswith("application/xml")
    root = etree.fromstring(odm.content)
    subject = root.find(f".//{{*}}SubjectData[@SubjectKey='{pid}']")
    assert subject is not None
    # An auditor sees no contact details: the screening form has no email or birth date.
    items = {e.get("ItemOID") for e in subject.iter("{*}ItemData")}
    assert "I.SCREENING.site_id" in items and "I.SCREENING.email" not in items
    assert "I.SCREENING.birth_date" not in items
    fhir = auditor.get("/v1/exports/fhir", deidentify="true")
    assert fhir.status_code == 200
    assert fhir.headers["Content-Type"].startswith("application/fhir+ndjson")
    subjects = [ResearchSubject.model_validate_json(line) for line in fhir.text.splitlines()]
    assert subjects and pid not in fhir.text


def test_an_auditor_verifies_the_store_plainly_and_deeply(server):
    from tests.e2e.test_verify_jobs import finished

    enrol(server.client("service"))  # the store has a participant to check
    auditor = server.client("auditor")
    for deep in ("false", "true"):
        started = auditor.get("/v1/audit/verify", deep=deep)
        # The deep check runs in the background: follow the job to its report.
        answer = finished(auditor, started) if deep == "true" else started.json()
        assert answer["ok"] is True and answer["problems"] == []
        assert answer["deep"] is (deep == "true")
        assert answer["events_checked"] >= 3 and answer["events_per_second"] > 0


def test_a_study_withdrawal_cancels_the_open_visits_in_the_read_models(server):
    service = server.client("service")
    pid, _ = enrol(service)
    assert service.command("CompleteVisit", pid, p.visit("baseline", 0)).status_code == 201
    withdrawn = service.command("WithdrawParticipant", pid, {
        "withdrawn_on": "2026-03-20", "scope": "study", "reason_code": "moved_away"})
    assert withdrawn.status_code == 201, withdrawn.text
    state = service.get(f"/v1/participants/{pid}", after=withdrawn.json()["position"]).json()
    assert {v["code"]: v["status"] for v in state["visits"]} == {
        "baseline": "completed", "week6": "cancelled", "end_of_treatment": "cancelled",
        "follow_up": "cancelled"}

