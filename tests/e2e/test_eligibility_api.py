"""The eligibility object over HTTP: the protocol's drugs by any of their names, the criteria
added to the evaluation, and what is refused before anything is stored."""

from __future__ import annotations

import uuid

import pytest

from tests.e2e import payloads as p
from tests.e2e.test_errors import history_length

DRUG_FIELD = "data.eligibility.aromatase_inhibitor.drug"
NEW_QUESTIONS = ("surgery_side_effects_resolved", "prior_therapy_toxicity_resolved",
                 "pain_due_to_fracture_or_injury", "able_to_consent")


def taking(drug: str, daily_dose_mg: float = 1) -> dict[str, object]:
    return p.screening(aromatase_inhibitor={
        "drug": drug, "daily_dose_mg": daily_dose_mg, "started_on": "2026-01-02",
        "planned_days_after_registration": 365})


def recorded_drug(client, pid: str) -> str:
    screened = client.get(f"/v1/participants/{pid}/history").json()["events"][0]
    drug: str = screened["data"]["data"]["eligibility"]["aromatase_inhibitor"]["drug"]
    return drug


def outcome(client, pid: str, answer) -> tuple[str, list[str]]:
    state = client.get(f"/v1/participants/{pid}", after=answer.json()["position"]).json()
    return state["status"], state["failed_criteria"]


@pytest.mark.parametrize("drug", ["tamoxifen", "Arimidex 1 mg", ""])
def test_a_drug_that_is_not_the_protocols_is_a_422_naming_the_allowed_ones(server, drug):
    service = server.client("service")
    pid = p.participant_id()
    answer = service.command("ScreenParticipant", pid, taking(drug))
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert (body["error"], body["fields"]) == ("validation_failed", {DRUG_FIELD: [
        "must be one of: anastrozole (Arimidex), letrozole (Femara), exemestane (Aromasin)"]})
    assert history_length(server.client("admin"), pid) == 0
    assert service.get(f"/v1/participants/{pid}").status_code == 404


@pytest.mark.parametrize(("drug", "dose", "generic"), [
    ("Arimidex", 1, "anastrozole"), ("ANASTROZOLE", 1, "anastrozole"),
    ("femara", 2.5, "letrozole"), ("AroMasin", 25, "exemestane"),
])
def test_a_brand_name_in_any_case_is_recorded_as_the_generic_name(server, drug, dose,
                                                                    generic):
    service = server.client("service")
    pid = p.participant_id()
    answer = service.command("ScreenParticipant", pid, taking(drug, dose))
    assert answer.status_code == 201, answer.text
    assert recorded_drug(service, pid) == generic
    assert outcome(service, pid, answer) == ("screened", [])


def test_a_protocol_drug_at_another_dose_is_a_screen_failure_not_a_422(server):
    service = server.client("service")
    pid = p.participant_id()
    answer = service.command("ScreenParticipant", pid, taking("Femara", 1))
    assert answer.status_code == 201, answer.text
    assert recorded_drug(service, pid) == "letrozole"
    assert outcome(service, pid, answer) == ("screen_failed", ["aromatase_inhibitor"])


@pytest.mark.parametrize("question", NEW_QUESTIONS)
def test_each_new_question_is_required(server, question):
    pid = p.participant_id()
    data = p.screening()
    del data["eligibility"][question]
    answer = server.client("service").command("ScreenParticipant", pid, data)
    assert answer.status_code == 422, answer.text
    assert answer.json()["fields"] == {f"data.eligibility.{question}": [
        "Missing data for required field."]}
    assert history_length(server.client("admin"), pid) == 0


@pytest.mark.parametrize("question", NEW_QUESTIONS)
def test_each_new_question_is_answered_true_or_false(server, question):
    pid = p.participant_id()
    answer = server.client("service").command("ScreenParticipant", pid,
                                              p.screening(**{question: "yes"}))
    assert answer.status_code == 422, answer.text
    assert list(answer.json()["fields"]) == [f"data.eligibility.{question}"]
    assert history_length(server.client("admin"), pid) == 0


@pytest.mark.parametrize(("answer", "criterion"), [
    ({"surgery_side_effects_resolved": False}, "surgery_side_effects_resolved"),
    ({"prior_therapy_toxicity_resolved": False}, "prior_therapy_toxicity_resolved"),
    ({"pain_due_to_fracture_or_injury": True}, "no_pain_due_to_fracture_or_injury"),
    ({"able_to_consent": False}, "able_to_consent"),
])
def test_a_failed_new_criterion_is_a_screen_failure(server, answer, criterion):
    service = server.client("service")
    pid = p.participant_id()
    screened = service.command("ScreenParticipant", pid, p.screening(**answer))
    assert screened.status_code == 201, screened.text
    assert outcome(service, pid, screened) == ("screen_failed", [criterion])


def test_the_answers_say_what_was_decided_the_screening_outcome_and_the_arm(server):
    """An upstream system learns from the answer itself whether the person was eligible
    (and why not) and which arm was drawn; sent again, the same answer."""
    service = server.client("service")
    failed = p.participant_id()
    answer = service.command("ScreenParticipant", failed, p.screening(able_to_consent=False))
    assert answer.status_code == 201, answer.text
    assert (answer.json()["eligible"], answer.json()["failed_criteria"]) == (
        False, ["able_to_consent"])
    assert "arm" not in answer.json()

    pid = p.participant_id()
    screened = service.command("ScreenParticipant", pid, p.screening())
    assert (screened.json()["eligible"], screened.json()["failed_criteria"]) == (True, [])
    consented = service.command("RecordConsent", pid, p.CONSENT)
    assert consented.status_code == 201, consented.text
    assert not {"eligible", "failed_criteria", "arm"} & set(consented.json())
    body = {"command_id": str(uuid.uuid4()), "type": "RandomizeParticipant",
            "participant_id": pid, "data": p.RANDOMIZE}
    randomized = service.post("/v1/commands", body)
    assert randomized.status_code == 201, randomized.text
    state = service.get(f"/v1/participants/{pid}", after=randomized.json()["position"])
    assert randomized.json()["arm"] == state.json()["arm"] in ("b12", "control")
    again = service.post("/v1/commands", body)
    assert (again.status_code, again.json()) == (200, randomized.json())

    batch_pid = p.participant_id()
    batch = service.post("/v1/commands/batch", {"commands": [
        {"command_id": str(uuid.uuid4()), "type": type_, "participant_id": batch_pid,
         "data": data}
        for type_, data in (("ScreenParticipant", p.screening()),
                            ("RecordConsent", p.CONSENT),
                            ("RandomizeParticipant", p.RANDOMIZE))]})
    screened_b, _, randomized_b = (r["body"] for r in batch.json()["results"])
    assert screened_b["eligible"] is True and randomized_b["arm"] in ("b12", "control")
