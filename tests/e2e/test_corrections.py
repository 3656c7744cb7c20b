"""A correction is validated by the rule of the field it corrects, and the record's derived
facts (scores, eligibility, deviations) follow the corrected value."""

from __future__ import annotations

import pytest

from tests.e2e import payloads as p
from tests.e2e.test_errors import history_length
from tests.e2e.test_lifecycle import enrol

REASON = "source document check"


def capture(client, pid: str, type_: str, data: dict) -> str:
    """Records a command and answers the event id of the event it wrote."""
    answer = client.command(type_, pid, data)
    assert answer.status_code == 201, answer.text
    version = answer.json()["version"]
    events = client.get(f"/v1/participants/{pid}/history").json()["events"]
    return next(e["event_id"] for e in events if e["version"] == version)


def correct(client, pid: str, event_id: str, field: str, value):
    return client.command("CorrectData", pid,
                          {"event_id": event_id, "field": field, "value": value}, reason=REASON)


@pytest.mark.parametrize("field, value", [
    ("fact_es.GE1", "x"),            # an item left unanswered, with a value of the wrong type
    ("fact_es.GE1", 5),              # FACT items are 0-4
    ("fact_es.GP9", 1),              # not an item of the FACT-ES
    ("bpi_sf.worst", 99),            # BPI items are 0-10
    ("bpi_sf.interference.sleep", 11),
    ("completed_on", None),          # a required date can't be emptied
    ("completed_on", "2026-13-01"),
    ("visit_note", "x"),             # a field CompleteVisit does not define
])
def test_a_visit_correction_that_breaks_the_field_rule_is_a_422_and_stores_nothing(
        server, field, value):
    coordinator = server.client("coordinator")
    pid, _ = enrol(coordinator)
    visit = capture(coordinator, pid, "CompleteVisit", p.visit("baseline", 0))
    answer = correct(coordinator, pid, visit, field, value)
    assert answer.status_code == 422, answer.text
    assert list(answer.json()["fields"]) == ["data.value"]
    assert all(field in message for message in answer.json()["fields"]["data.value"])
    assert history_length(coordinator, pid) == 4


@pytest.mark.parametrize("field, value", [
    ("email", "not-an-email"),
    ("email", "a@example.org\r\nBcc: b@example.org"),
    ("eligibility.zubrod", 7),
    ("eligibility.stage", "V"),
    ("eligibility.pgr_positive", None),     # both receptor statuses would be null
    ("language", "fr"),
])
def test_a_screening_correction_that_breaks_the_field_rule_is_a_422(server, field, value):
    coordinator = server.client("coordinator")
    pid = p.participant_id()
    screening = capture(coordinator, pid, "ScreenParticipant",
                        p.screening(er_positive=None, pgr_positive=True))
    answer = correct(coordinator, pid, screening, field, value)
    assert answer.status_code == 422, answer.text
    assert list(answer.json()["fields"]) == ["data.value"]
    assert history_length(coordinator, pid) == 1


def test_an_unanswered_item_can_be_corrected_and_the_scores_follow(server):
    coordinator = server.client("coordinator")
    pid, _ = enrol(coordinator)
    data = p.visit("baseline", 0)
    data["fact_es"].update(GE2=1, GE3=1, GE4=1)  # 3 of 6 emotional items: not scored
    visit = capture(coordinator, pid, "CompleteVisit", data)
    before = coordinator.get(f"/v1/participants/{pid}").json()["scores"]["baseline"]
    answer = correct(coordinator, pid, visit, "fact_es.GE1", 2)
    assert answer.status_code == 201, answer.text
    after = coordinator.get(f"/v1/participants/{pid}",
                            after=answer.json()["position"]).json()["scores"]["baseline"]
    assert before["fact_ewb"] is None and after["fact_ewb"] is not None


def test_a_dose_date_correction_keeps_one_dose_per_day_and_no_dose_after_today(server):
    coordinator = server.client("coordinator")
    pid, _ = enrol(coordinator)
    first = capture(coordinator, pid, "RecordDose", p.dose(0))
    capture(coordinator, pid, "RecordDose", p.dose(1))
    same_day = correct(coordinator, pid, first, "taken_on", p.dose(1)["taken_on"])
    assert (same_day.status_code, same_day.json()["error"]) == (409, "invalid_transition")
    future = correct(coordinator, pid, first, "taken_on", "2999-01-01")
    assert (future.status_code, list(future.json()["fields"])) == (422, ["data.value"])
    assert correct(coordinator, pid, first, "taken_on", p.dose(2)["taken_on"]).status_code == 201


def test_a_dose_dated_after_today_is_a_422(server):
    service = server.client("service")
    pid, _ = enrol(service)
    answer = service.command("RecordDose", pid, {"taken_on": "2999-01-01", "taken": True})
    assert (answer.status_code, list(answer.json()["fields"])) == (422, ["data.taken_on"])
    assert history_length(service, pid) == 3


def test_null_takes_back_an_optional_answer_and_the_scores_follow(server):
    coordinator = server.client("coordinator")
    pid, _ = enrol(coordinator)
    data = p.visit("baseline", 0)
    data["fact_es"] = {f"GE{i}": 1 for i in range(1, 5)}  # 4 of 6: the subscale is scored
    visit = capture(coordinator, pid, "CompleteVisit", data)
    answer = correct(coordinator, pid, visit, "fact_es.GE4", None)  # 3 of 6: not scored
    assert answer.status_code == 201, answer.text
    scores = coordinator.get(f"/v1/participants/{pid}").json()["scores"]["baseline"]
    assert scores["fact_ewb"] is None
    whole = correct(coordinator, pid, visit, "bpi_sf", None)  # the questionnaire, taken back
    assert whole.status_code == 201, whole.text
    scores = coordinator.get(f"/v1/participants/{pid}").json()["scores"]["baseline"]
    assert scores["bpi_severity"] is None and scores["bpi_interference"] is None


def test_a_screen_failure_corrected_to_eligible_is_screened_and_consented(server):
    """Stage typed IV, corrected to II: it stayed `screen_failed` while its state said
    eligible, and its consent was refused naming `stage`, the criterion corrected."""
    coordinator = server.client("coordinator")
    pid = p.participant_id()
    screening = capture(coordinator, pid, "ScreenParticipant", p.screening(stage="IV"))
    fixed = correct(coordinator, pid, screening, "eligibility.stage", "II")
    assert fixed.status_code == 201, fixed.text
    assert [e["type"] for e in fixed.json()["events"]] == ["DataCorrected",
                                                           "ScreeningReassessed"]
    state = coordinator.get(f"/v1/participants/{pid}", after=fixed.json()["position"]).json()
    assert (state["status"], state["eligible"], state["failed_criteria"]) == (
        "screened", True, [])
    listed = coordinator.get("/v1/participants", status="screen_failed", limit=10000)
    assert pid not in listed.text
    assert coordinator.command("RecordConsent", pid, p.CONSENT).status_code == 201


def test_a_screening_corrected_to_ineligible_is_a_screen_failure_that_can_be_rescreened(
        server):
    """Metastatic found on a staging report before consent: the participant was left
    `screened`, its consent refused and its rescreen refused too (`already screened`)."""
    coordinator = server.client("coordinator")
    pid = p.participant_id()
    screening = capture(coordinator, pid, "ScreenParticipant", p.screening())
    fixed = correct(coordinator, pid, screening, "eligibility.metastatic", True)
    assert fixed.status_code == 201, fixed.text
    state = coordinator.get(f"/v1/participants/{pid}", after=fixed.json()["position"]).json()
    assert (state["status"], state["failed_criteria"]) == ("screen_failed", ["non_metastatic"])
    refused = coordinator.command("RecordConsent", pid, p.CONSENT)
    assert (refused.status_code, refused.json()["error"]) == (409, "not_eligible")
    assert refused.json()["failed_criteria"] == ["non_metastatic"]
    again = coordinator.command("ScreenParticipant", pid, p.screening())
    assert again.status_code == 201, again.text
    assert coordinator.command("RecordConsent", pid, p.CONSENT).status_code == 201


def test_a_corrected_object_of_the_wrong_type_is_named_by_its_own_path(server):
    coordinator = server.client("coordinator")
    pid = p.participant_id()
    screening = capture(coordinator, pid, "ScreenParticipant", p.screening())
    answer = correct(coordinator, pid, screening, "eligibility.menopause", 5)
    assert (answer.status_code, answer.json()["fields"]) == (
        422, {"data.value": ["eligibility.menopause: Invalid input type."]})


def test_a_value_nested_past_any_field_is_a_422_alone_and_in_a_batch(server):
    """Nested a thousand levels deep (the JSON parser takes 1024), a corrected value was a
    500 alone, and in a batch made the whole request a 500 with nothing written for the
    other commands: its fingerprint's encoder recursed past Python's limit."""
    import json
    import uuid

    coordinator = server.client("coordinator")
    pid, other = p.participant_id(), p.participant_id()
    screening = capture(coordinator, pid, "ScreenParticipant", p.screening())
    correction = {"command_id": str(uuid.uuid4()), "type": "CorrectData", "participant_id": pid,
                  "reason": REASON, "data": {"event_id": screening,
                                             "field": "eligibility.zubrod", "value": "DEEP"}}
    deep = "[" * 1000 + "1" + "]" * 1000

    def sent(path: str, body: dict) -> dict:
        raw = json.dumps(body).replace('"DEEP"', deep)
        answer = coordinator.session.post(coordinator.url + path, data=raw, timeout=30,
                                          headers={"Content-Type": "application/json"})
        assert answer.status_code in (200, 422), answer.text
        return {"status": answer.status_code, "body": answer.json()}

    alone = sent("/v1/commands", correction)
    assert alone["status"] == 422 and list(alone["body"]["fields"]) == ["data.value"]
    assert "nested more than 32 levels" in alone["body"]["fields"]["data.value"][0]
    screen_other = {"command_id": str(uuid.uuid4()), "type": "ScreenParticipant",
                    "participant_id": other, "data": p.screening()}
    batch = sent("/v1/commands/batch", {"commands": [
        screen_other, {**correction, "command_id": str(uuid.uuid4())}]})["body"]["results"]
    assert [r["status"] for r in batch] == [201, 422]
    assert batch[1]["body"] == alone["body"]
    assert history_length(coordinator, pid) == 1 and history_length(coordinator, other) == 1
