from datetime import UTC, date, datetime, timedelta

import pytest

from domain.chain import compute_digest
from domain.commands import Audit
from domain.errors import InvalidTransition, NotEligible, ValidationFailed
from domain.participant import Participant
from domain.randomization import AllocationSequence
from tests.factories import SCREENED_ON, audit, consent, protocol, screening

PROTOCOL = protocol()
SEED = b"unit-test-seed"
REGISTERED = date(2026, 3, 4)


def screened(**changes) -> Participant:
    return Participant.screen("CASE-0001", screening(**changes), PROTOCOL, audit())


def randomized(**changes) -> Participant:
    p = screened(**changes)
    p.record_consent(consent(), audit())
    randomize(p)
    return p


def randomize(p: Participant, registered_on: date = REGISTERED) -> None:
    sequence = AllocationSequence.open(PROTOCOL.study_id, p.site_id, audit())
    p.randomize({"registered_on": registered_on}, sequence, SEED, PROTOCOL, audit())


def dose(day: date, taken: bool = True) -> dict:
    return {"taken_on": day, "taken": taken, "dose_mcg": 1000}


def visit(code: str, day: date, **instruments) -> dict:
    return {"visit": code, "completed_on": day, **instruments}


def test_an_eligible_candidate_is_screened():
    p = screened()
    assert (p.status, p.eligible, p.failed_criteria, p.version) == ("screened", True, [], 1)


def test_a_failed_criterion_is_a_screen_failure_with_the_criteria_listed():
    p = screened(stage="IV", zubrod=3)
    assert p.status == "screen_failed"
    assert p.failed_criteria == ["stage", "zubrod"]


def test_an_unknown_site_is_a_validation_error():
    with pytest.raises(ValidationFailed) as e:
        screened(site_id="NOWHERE")
    assert "data.site_id" in e.value.fields


def test_a_screen_failure_can_be_neither_consented_nor_randomized():
    p = screened(zubrod=3)
    with pytest.raises(NotEligible):
        p.record_consent(consent(), audit())
    with pytest.raises(NotEligible):
        randomize(p)


def test_a_rescreen_is_accepted_only_after_a_screen_failure():
    p = screened()
    with pytest.raises(InvalidTransition):
        p.rescreen(screening(), PROTOCOL, audit())
    failed = screened(zubrod=3)
    failed.rescreen(screening(), PROTOCOL, audit())
    assert failed.status == "screened"


def test_randomization_needs_consent():
    with pytest.raises(InvalidTransition):
        randomize(screened())


def test_randomization_records_the_arm_and_the_draw():
    p = randomized()
    assert p.status == "randomized"
    assert p.arm in ("b12", "control")
    assert p.allocation_index == 0


def test_randomizing_twice_is_an_invalid_transition():
    p = randomized()
    with pytest.raises(InvalidTransition):
        randomize(p)


def test_time_relative_criteria_are_rechecked_against_the_registration_date():
    p = screened()
    p.record_consent(consent(), audit())
    # A corrected AI start date 13 days before registration fails the 14-day rule...
    p.correct_data({"event_id": p.screening_event, "field": "eligibility.aromatase_inhibitor"
                    ".started_on", "value": REGISTERED - timedelta(days=13)},
                   audit(reason="start date misread"))
    with pytest.raises(NotEligible) as e:
        randomize(p)
    assert e.value.details["failed_criteria"] == ["ai_duration"]
    assert p.status == "consented"
    # ...and 14 days passes.
    p.correct_data({"event_id": p.screening_event, "field": "eligibility.aromatase_inhibitor"
                    ".started_on", "value": REGISTERED - timedelta(days=14)},
                   audit(reason="checked with the pharmacy"))
    randomize(p)
    assert p.status == "randomized"


def test_a_b12_product_reported_before_randomization_fails_the_washout():
    p = screened()
    p.record_consent(consent(), audit())
    p.report_medication({"drug": "multivitamin", "contains_b12": True,
                         "stopped_on": REGISTERED - timedelta(days=5)}, audit())
    with pytest.raises(NotEligible) as e:
        randomize(p)
    assert e.value.details["failed_criteria"] == ["b12_washout"]


def test_a_dose_needs_randomization():
    p = screened()
    p.record_consent(consent(), audit())
    with pytest.raises(InvalidTransition):
        p.record_dose(dose(REGISTERED), audit())


def test_after_a_treatment_withdrawal_only_earlier_doses_are_accepted():
    p = randomized()
    stopped = REGISTERED + timedelta(days=10)
    p.withdraw({"withdrawn_on": stopped, "scope": "treatment", "reason_code": "ae"}, audit())
    assert p.status == "off_treatment"
    p.record_dose(dose(stopped), audit())  # a late diary entry
    with pytest.raises(InvalidTransition):
        p.record_dose(dose(stopped + timedelta(days=1)), audit())


def test_a_second_dose_for_the_same_day_is_refused():
    p = randomized()
    p.record_dose(dose(REGISTERED), audit())
    with pytest.raises(InvalidTransition):
        p.record_dose(dose(REGISTERED), audit())


def test_after_a_study_withdrawal_only_corrections_and_resolutions_are_accepted():
    p = randomized()
    p.record_dose(dose(REGISTERED), audit())
    p.flag_deviation("d1", "wrong_dose", "minor", [], "test", audit())
    p.withdraw({"withdrawn_on": REGISTERED, "scope": "study", "reason_code": "moved"}, audit())
    assert p.status == "withdrawn"
    refused = [
        lambda: p.record_dose(dose(REGISTERED - timedelta(days=1)), audit()),
        lambda: p.complete_visit(visit("baseline", REGISTERED), PROTOCOL, audit()),
        lambda: p.record_consent(consent(), audit()),
        lambda: p.report_medication({"drug": "x", "contains_b12": False}, audit()),
        lambda: p.record_blood_sample({"timepoint": "baseline",
                                       "collected_at": datetime(2026, 3, 4, 8)}, PROTOCOL,
                                      audit()),
        lambda: p.withdraw({"withdrawn_on": REGISTERED, "scope": "study",
                            "reason_code": "x"}, audit()),
        lambda: p.withdraw({"withdrawn_on": REGISTERED, "scope": "treatment",
                            "reason_code": "x"}, audit()),
    ]
    for command in refused:
        with pytest.raises(InvalidTransition):
            command()
    dose_event = next(e for e, _ in p.records_of("DoseRecorded"))
    p.correct_data({"event_id": dose_event, "field": "dose_mcg", "value": 500},
                   audit(reason="diary misread"))
    p.resolve_deviation({"deviation_id": "d1", "resolution": "confirmed"}, audit())
    assert p.deviations["d1"]["status"] == "resolved"


def test_withdrawing_from_treatment_needs_randomization():
    p = screened()
    with pytest.raises(InvalidTransition):
        p.withdraw({"withdrawn_on": SCREENED_ON, "scope": "treatment", "reason_code": "x"},
                   audit())


def test_a_visit_is_completed_once_and_the_last_completes_the_study():
    p = randomized()
    p.complete_visit(visit("baseline", REGISTERED), PROTOCOL, audit())
    with pytest.raises(InvalidTransition):
        p.complete_visit(visit("baseline", REGISTERED), PROTOCOL, audit())
    with pytest.raises(ValidationFailed):
        p.complete_visit(visit("week99", REGISTERED), PROTOCOL, audit())
    p.complete_visit(visit("follow_up", REGISTERED + timedelta(days=180)), PROTOCOL, audit())
    assert p.status == "completed"


def test_an_earlier_visit_entered_after_the_last_one_is_still_recorded():
    """Data entry of a late visit (a paper form typed in after the follow-up visit) goes
    on once the study is completed, as doses and samples do; the last visit stays once."""
    p = randomized()
    p.complete_visit(visit("follow_up", REGISTERED + timedelta(days=180)), PROTOCOL, audit())
    p.complete_visit(visit("week6", REGISTERED + timedelta(days=42)), PROTOCOL, audit())
    assert p.status == "completed" and "week6" in p.completed_visits()
    with pytest.raises(InvalidTransition):
        p.complete_visit(visit("follow_up", REGISTERED + timedelta(days=181)), PROTOCOL,
                         audit())


def test_a_blood_sample_needs_consent_and_a_known_timepoint():
    p = screened()
    sample = {"timepoint": "baseline", "collected_at": datetime(2026, 3, 4, 8)}
    with pytest.raises(InvalidTransition):
        p.record_blood_sample(sample, PROTOCOL, audit())
    p.record_consent(consent(), audit())
    with pytest.raises(ValidationFailed):
        p.record_blood_sample({**sample, "timepoint": "day3"}, PROTOCOL, audit())
    p.record_blood_sample(sample, PROTOCOL, audit())


def test_a_correction_needs_a_reason_and_changes_the_derived_scores():
    p = randomized()
    bpi = {"worst": 6, "least": 2, "average": 4, "now": 4}
    p.complete_visit(visit("baseline", REGISTERED, bpi_sf=bpi), PROTOCOL, audit())
    event_id = next(e for e, _ in p.records_of("VisitCompleted"))
    correction = {"event_id": event_id, "field": "bpi_sf.worst", "value": 10}
    with pytest.raises(ValidationFailed) as e:
        p.correct_data(correction, audit())
    assert "reason" in e.value.fields
    p.correct_data(correction, audit(reason="transcription error"))
    assert p.scores()["baseline"]["bpi_severity"] == 5.0
    corrected = p.collect_events()[-1]
    assert (corrected.previous_value, corrected.value, corrected.reason) == (
        6, 10, "transcription error")


@pytest.mark.parametrize(("field", "message"), [
    ("site_id", "can't be corrected"),
    ("nonexistent.path", "is not a field"),
])
def test_locked_or_unknown_fields_cannot_be_corrected(field, message):
    p = screened()
    with pytest.raises(ValidationFailed) as e:
        p.correct_data({"event_id": p.screening_event, "field": field, "value": "X"},
                       audit(reason="r"))
    assert message in e.value.fields["data.field"][0]


def test_a_correction_must_name_an_event_of_this_participant():
    p = screened()
    with pytest.raises(ValidationFailed):
        p.correct_data({"event_id": "nope", "field": "email", "value": "x@y.z"},
                       audit(reason="r"))


def test_deviations_and_reminders_are_recorded_once():
    p = randomized()
    assert p.flag_deviation("d1", "wrong_dose", "minor", [], "", audit()) is True
    assert p.flag_deviation("d1", "wrong_dose", "minor", [], "", audit()) is False
    assert p.record_reminder_sent("week6", "window_open", ["a@b.c"], audit()) is True
    assert p.record_reminder_sent("week6", "window_open", ["a@b.c"], audit()) is False
    with pytest.raises(ValidationFailed):
        p.resolve_deviation({"deviation_id": "d2", "resolution": "x"}, audit())
    p.resolve_deviation({"deviation_id": "d1", "resolution": "ok"}, audit())
    with pytest.raises(InvalidTransition):
        p.resolve_deviation({"deviation_id": "d1", "resolution": "ok"}, audit())


def test_every_event_carries_audit_fields_and_is_chained_to_the_previous():
    p = randomized()
    events = p.collect_events()
    previous = ""
    for event in events:
        assert event.command_id and event.actor == "test-service"
        assert event.previous_digest == previous
        assert compute_digest(event) == event.digest
        previous = event.digest


def test_an_altered_event_no_longer_matches_its_digest():
    event = screened().collect_events()[0]
    object.__setattr__(event, "data", {**event.data, "email": "someone.else@example.org"})
    assert compute_digest(event) != event.digest


@pytest.mark.parametrize(("field", "value", "stored"), [
    ("birth_date", "1958-06-16", date(1958, 6, 16)),
    ("eligibility.zubrod", 2, 2),
    ("email", "new@example.org", "new@example.org"),
])
def test_a_correction_takes_the_type_of_the_value_it_corrects(field, value, stored):
    participant = screened()
    event_id = participant.screening_event
    participant.correct_data({"event_id": event_id, "field": field, "value": value},
                             audit(reason="transcription error"))
    parent, key = participant.screening, field.split(".")[-1]
    for part in field.split(".")[:-1]:
        parent = parent[part]
    assert parent[key] == stored


@pytest.mark.parametrize(("field", "value"), [
    ("birth_date", "16/06/1958"), ("birth_date", 1958), ("eligibility.zubrod", "2"),
    ("eligibility.metastatic", 0), ("eligibility.zubrod", True),
])
def test_a_correction_of_another_type_is_refused(field, value):
    participant = screened()
    with pytest.raises(ValidationFailed) as refused:
        participant.correct_data(
            {"event_id": participant.screening_event, "field": field, "value": value},
            audit(reason="transcription error"))
    assert list(refused.value.fields) == ["data.value"]


def test_event_ids_are_the_uuid5_of_the_stream_and_version():
    from uuid import uuid4, uuid5

    from domain.participant import event_uuid

    stream = uuid4()
    assert [event_uuid(stream, v) for v in (1, 7, 500)] == [
        str(uuid5(stream, str(v))) for v in (1, 7, 500)]


def test_a_correction_leaves_the_captured_event_as_it_was():
    participant = screened()
    screening_event = participant.collect_events()[0]
    participant.correct_data({"event_id": participant.screening_event,
                              "field": "eligibility.zubrod", "value": 2},
                             audit(reason="transcription error"))
    assert screening_event.data["eligibility"]["zubrod"] == 1
    assert participant.screening["eligibility"]["zubrod"] == 2


def test_the_digest_of_a_known_event_is_pinned():
    # Stored chains are checked with this function: any change of its output would make
    # every recorded event fail verification.
    at = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
    pinned = Audit(command_id="9b2d3c6e-0000-4000-8000-000000000001", actor="señora-app",
                   recorded_at=at, reason="été")
    # The screening record as it was when the digests were pinned, before the eligibility
    # object gained four questions.
    record = screening()
    for question in ("surgery_side_effects_resolved", "prior_therapy_toxicity_resolved",
                     "pain_due_to_fracture_or_injury", "able_to_consent"):
        del record["eligibility"][question]
    participant = Participant.screen("CASE-PINNED", record, PROTOCOL, pinned)
    participant.record_consent(consent(), pinned)
    # Its registration is dated after the day it was recorded, which RandomizeParticipant
    # refuses since: the event is built as it was stored.
    sequence = AllocationSequence.open(PROTOCOL.study_id, "CASE", pinned)
    index, arm = sequence.draw("CASE-PINNED", SEED, PROTOCOL.randomization, pinned)
    participant.trigger_event(Participant.ParticipantRandomized,
                              data={"registered_on": REGISTERED}, arm=arm,
                              allocation_index=index, **pinned.event_fields())
    participant.record_blood_sample({"timepoint": "baseline", "collected_at": at,
                                     "results": {"b12_pg_ml": 410.5}}, PROTOCOL, pinned)
    digests = [compute_digest(e) for e in participant.collect_events()]
    assert digests == PINNED_DIGESTS


PINNED_DIGESTS = [
    "ecc7f6dc3208db1e8d4c3f5955c4225048cb670188239490f0d6f4b6a0f25c37",
    "b22151314bdbf28ab3d0a4f892ffc65fc5e0c3da4e84c9b7ff6a1f6d597f8305",
    "b3aacba1edab390dfb83feb9f22cd6daf9af7c602b1dd1917d858f82fbf252a8",
    "940cd1d86ea0099997dd2fa76e2b05cf2b8983904d8fceac0bc5aaae8bd79377",
]


def test_a_study_withdrawal_cancels_the_visits_not_done_and_keeps_the_done_ones():
    from domain.views import participant_state

    p = randomized()
    p.complete_visit(visit("baseline", REGISTERED), PROTOCOL, audit())
    left = REGISTERED + timedelta(days=60)  # week 6's window closed on day 49, unvisited
    p.withdraw({"withdrawn_on": left, "scope": "study", "reason_code": "moved"}, audit())
    today = REGISTERED + timedelta(days=70)
    statuses = {v["code"]: v["status"] for v in participant_state(p, PROTOCOL, today)["visits"]}
    assert statuses == {"baseline": "completed", "week6": "overdue",
                        "end_of_treatment": "cancelled", "follow_up": "cancelled"}


def test_a_correction_that_makes_a_consented_participant_ineligible_refuses_randomization():
    from domain.views import participant_state

    p = screened()
    p.record_consent(consent(), audit())
    p.correct_data({"event_id": p.screening_event, "field": "eligibility.metastatic",
                    "value": True}, audit(reason="staging report"))
    state = participant_state(p, PROTOCOL, REGISTERED)
    assert (state["eligible"], state["failed_criteria"]) == (False, ["non_metastatic"])
    sequence = AllocationSequence.open(PROTOCOL.study_id, p.site_id, audit())
    with pytest.raises(NotEligible) as refused:
        p.randomize({"registered_on": REGISTERED}, sequence, b"seed", PROTOCOL, audit())
    assert "non_metastatic" in refused.value.details["failed_criteria"]


def test_a_screen_failure_a_correction_makes_eligible_is_consented_and_randomized():
    """Stage typed IV, corrected to II: the record is eligible, and the consent that the
    stale screen failure refused (quoting `stage`) enrols the participant."""
    from domain.views import participant_state

    p = screened(stage="IV")
    assert p.status == "screen_failed"
    p.correct_data({"event_id": p.screening_event, "field": "eligibility.stage",
                    "value": "II"}, audit(reason="transcription error"))
    assert participant_state(p, PROTOCOL, REGISTERED)["eligible"] is True
    p.record_consent(consent(), audit(), PROTOCOL)
    assert p.status == "consented"
    randomize(p)
    assert p.status == "randomized"


def test_a_screen_failure_still_failing_as_corrected_is_refused_naming_what_it_fails():
    p = screened(stage="IV", zubrod=3)
    p.correct_data({"event_id": p.screening_event, "field": "eligibility.stage",
                    "value": "II"}, audit(reason="transcription error"))
    with pytest.raises(NotEligible) as refused:
        p.record_consent(consent(), audit(), PROTOCOL)
    assert refused.value.details["failed_criteria"] == ["zubrod"]
    assert "(zubrod)" in str(refused.value) and p.status == "screen_failed"


def test_an_uncorrected_record_keeps_the_outcome_recorded_at_screening():
    p = screened()
    assert p.eligibility_now(PROTOCOL) == (True, [])


@pytest.mark.parametrize("field, value", [("screened_on", date(2026, 3, 10)),
                                          ("registered_on", date(2026, 2, 20))])
def test_a_correction_keeps_registration_on_or_after_screening(field, value):
    p = randomized()
    target = p.screening_event if field == "screened_on" else p.registration_event
    with pytest.raises(ValidationFailed) as refused:
        p.correct_data({"event_id": target, "field": field, "value": value.isoformat()},
                       audit(reason="typo"))
    assert list(refused.value.fields) == ["data.value"]
    p.correct_data({"event_id": target, "field": field, "value": "2026-03-03"},
                   audit(reason="typo"))  # still in order


TODAY = datetime(2026, 6, 1, 12, tzinfo=UTC)  # the day the refused commands are recorded
# The latest date anywhere then (UTC+14) is 2026-06-02: the day after that is in no
# site's past.
TOMORROW = date(2026, 6, 3)


def on_day(n: int) -> date:
    return REGISTERED + timedelta(days=n)


@pytest.mark.parametrize("path", [
    "screened_on", "birth_date", "eligibility.aromatase_inhibitor.started_on",
    "eligibility.substance_abuse_last_on", "eligibility.b12_supplement_stopped_on",
    "eligibility.analgesics.0.stable_since",
])
def test_a_screening_dated_after_today_is_refused(path):
    data = screening()
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = TOMORROW
    with pytest.raises(ValidationFailed) as refused:
        Participant.screen("CASE-0001", data, PROTOCOL, audit(at=TODAY))
    assert list(refused.value.fields) == [f"data.{path}"]
    assert "after today (2026-06-02" in refused.value.fields[f"data.{path}"][0]


def consented() -> Participant:
    p = screened()
    p.record_consent(consent(), audit())
    return p


def sequence() -> AllocationSequence:
    return AllocationSequence.open(PROTOCOL.study_id, "CASE", audit())


@pytest.mark.parametrize(("field", "state", "command"), [
    ("signed_on", screened, lambda p, a: p.record_consent(consent(TOMORROW), a)),
    ("registered_on", consented, lambda p, a: p.randomize(
        {"registered_on": date(9999, 12, 20)}, sequence(), SEED, PROTOCOL, a)),
    ("collected_at", consented, lambda p, a: p.record_blood_sample(
        {"timepoint": "baseline", "collected_at": datetime(2026, 6, 1, 13, tzinfo=UTC)},
        PROTOCOL, a)),
    ("taken_on", randomized, lambda p, a: p.record_dose(dose(TOMORROW), a)),
    ("completed_on", randomized, lambda p, a: p.complete_visit(
        visit("follow_up", TOMORROW), PROTOCOL, a)),
    ("started_on", screened, lambda p, a: p.report_medication(
        {"drug": "x", "started_on": TOMORROW, "stopped_on": None, "contains_b12": False}, a)),
    ("stopped_on", screened, lambda p, a: p.report_medication(
        {"drug": "x", "started_on": None, "stopped_on": TOMORROW, "contains_b12": True}, a)),
    ("withdrawn_on", randomized, lambda p, a: p.withdraw(
        {"withdrawn_on": TOMORROW, "scope": "treatment", "reason_code": "ae"}, a)),
])
def test_every_date_a_command_records_must_not_be_after_today(field, state, command):
    p = state()
    before = p.version
    with pytest.raises(ValidationFailed) as refused:
        command(p, audit(at=TODAY))
    assert list(refused.value.fields) == [f"data.{field}"]
    assert p.version == before


def everything_recorded() -> Participant:
    """A participant with a record of every kind, each dated well before TODAY."""
    p = randomized()
    p.record_dose(dose(on_day(1)), audit())
    p.complete_visit(visit("baseline", REGISTERED), PROTOCOL, audit())
    p.record_blood_sample({"timepoint": "baseline",
                           "collected_at": datetime(2026, 3, 4, 8, tzinfo=UTC)},
                          PROTOCOL, audit())
    p.report_medication({"drug": "x", "started_on": date(2026, 1, 1),
                         "stopped_on": date(2026, 2, 1), "contains_b12": False}, audit())
    p.withdraw({"withdrawn_on": on_day(60), "scope": "treatment", "reason_code": "ae"},
               audit())
    return p


def record_of(p: Participant, kind: str) -> str:
    return next(e for e, _ in p.records_of(kind))


@pytest.mark.parametrize(("kind", "field", "value"), [
    ("ParticipantScreened", "screened_on", "2026-06-03"),
    ("ParticipantScreened", "birth_date", "2026-06-03"),
    ("ParticipantScreened", "eligibility.substance_abuse_last_on", TOMORROW),
    ("ParticipantScreened", "eligibility.aromatase_inhibitor.started_on", "2026-06-03"),
    ("ParticipantScreened", "eligibility.analgesics",
     [{"drug": "gabapentin", "stable_since": TOMORROW}]),
    ("ConsentRecorded", "signed_on", "2026-06-03"),
    ("ParticipantRandomized", "registered_on", "9999-12-20"),
    ("DoseRecorded", "taken_on", "2026-06-03"),
    ("VisitCompleted", "completed_on", "2026-06-03"),
    ("BloodSampleCollected", "collected_at", "2026-06-01T13:00:00+00:00"),
    ("MedicationReported", "started_on", "2026-06-03"),
    ("MedicationReported", "stopped_on", "2026-06-03"),
    ("ParticipantWithdrawn", "withdrawn_on", "2026-06-03"),
])
def test_a_correction_may_not_date_anything_after_today(kind, field, value):
    p = everything_recorded()
    before = p.version
    with pytest.raises(ValidationFailed) as refused:
        p.correct_data({"event_id": record_of(p, kind), "field": field, "value": value},
                       audit(reason="typo", at=TODAY))
    assert list(refused.value.fields) == ["data.value"]
    assert "after " in refused.value.fields["data.value"][0]
    assert p.version == before


def test_today_is_the_latest_date_anywhere_and_a_time_is_an_instant():
    """A site east of UTC records its own today while UTC's is still yesterday; an instant
    is compared as one (a few minutes of a client's clock ahead allowed)."""
    late_evening = audit(at=datetime(2026, 6, 1, 23, 30, tzinfo=UTC))  # 09:30 in Sydney
    p = randomized()
    p.complete_visit(visit("baseline", date(2026, 6, 2)), PROTOCOL, late_evening)
    with pytest.raises(ValidationFailed) as refused:
        p.complete_visit(visit("week6", date(2026, 6, 3)), PROTOCOL, late_evening)
    assert refused.value.fields == {"data.completed_on": [
        "must not be after today (2026-06-02, the latest date anywhere now)"]}
    sample = {"timepoint": "baseline", "collected_at": datetime(2026, 6, 1, 23, 33,
                                                                 tzinfo=UTC)}
    p.record_blood_sample(sample, PROTOCOL, late_evening)  # a clock 3 minutes ahead
    with pytest.raises(ValidationFailed) as refused:
        p.record_blood_sample({**sample, "collected_at": datetime(2026, 6, 1, 23, 36,
                                                                   tzinfo=UTC)},
                              PROTOCOL, late_evening)
    assert list(refused.value.fields) == ["data.collected_at"]


def test_no_date_before_1900_is_recorded():
    with pytest.raises(ValidationFailed) as refused:
        Participant.screen("CASE-0001", {**screening(), "birth_date": date(1, 1, 1)},
                           PROTOCOL, audit())
    assert list(refused.value.fields) == ["data.birth_date"]
    p = randomized()
    with pytest.raises(ValidationFailed):
        p.correct_data({"event_id": p.registration_event, "field": "registered_on",
                        "value": "0001-01-02"}, audit(reason="typo"))


def test_the_birth_date_is_before_the_screening():
    with pytest.raises(ValidationFailed) as refused:
        Participant.screen("CASE-0001", {**screening(), "birth_date": SCREENED_ON}, PROTOCOL,
                           audit())
    assert list(refused.value.fields) == ["data.birth_date"]
    p = screened()
    for field, value in (("birth_date", "2026-03-01"), ("screened_on", "1958-06-15")):
        with pytest.raises(ValidationFailed) as refused:
            p.correct_data({"event_id": p.screening_event, "field": field, "value": value},
                           audit(reason="typo"))
        assert list(refused.value.fields) == ["data.value"]


def test_a_randomization_is_not_dated_before_the_consent():
    p = screened()
    p.record_consent(consent(date(2026, 3, 3)), audit())
    with pytest.raises(ValidationFailed) as refused:
        randomize(p, date(2026, 3, 2))
    assert list(refused.value.fields) == ["data.registered_on"]
    assert "2026-03-03" in refused.value.fields["data.registered_on"][0]
    randomize(p, date(2026, 3, 3))  # the same day


@pytest.mark.parametrize(("kind", "field", "value"), [
    ("ConsentRecorded", "signed_on", "2026-03-05"),
    ("ParticipantRandomized", "registered_on", "2026-03-01"),
])
def test_a_correction_keeps_the_randomization_on_or_after_the_consent(kind, field, value):
    p = randomized()  # consent signed on 2026-03-02, registered on 2026-03-04
    with pytest.raises(ValidationFailed) as refused:
        p.correct_data({"event_id": record_of(p, kind), "field": field, "value": value},
                       audit(reason="typo"))
    assert list(refused.value.fields) == ["data.value"]


@pytest.mark.parametrize("scope", ["treatment", "study"])
def test_a_dose_correction_may_not_move_it_after_a_withdrawal(scope):
    p = randomized()
    p.record_dose(dose(on_day(1)), audit())
    p.withdraw({"withdrawn_on": on_day(6), "scope": scope, "reason_code": "ae"}, audit())
    correction = {"event_id": record_of(p, "DoseRecorded"), "field": "taken_on"}
    with pytest.raises(InvalidTransition, match=f"after the {scope} withdrawal on 2026-03-10"):
        p.correct_data({**correction, "value": on_day(8).isoformat()}, audit(reason="typo"))
    p.correct_data({**correction, "value": on_day(6).isoformat()}, audit(reason="typo"))


def test_a_withdrawal_is_recorded_on_its_day_whatever_doses_came_after_it():
    """Its date is what happened: doses recorded after it (a diary kept on) don't stop a
    withdrawal, nor its correction, being dated truly; only new doses after it are
    refused."""
    p = randomized()
    p.record_dose(dose(on_day(5), taken=False), audit())
    p.withdraw({"withdrawn_on": on_day(3), "scope": "treatment", "reason_code": "ae"},
               audit())
    assert p.withdrawn_on("treatment") == on_day(3)
    p.correct_data({"event_id": record_of(p, "ParticipantWithdrawn"),
                    "field": "withdrawn_on", "value": on_day(2).isoformat()},
                   audit(reason="typo"))
    assert p.withdrawn_on("treatment") == on_day(2)
    with pytest.raises(InvalidTransition, match="after the treatment withdrawal"):
        p.record_dose(dose(on_day(6)), audit())


def test_a_screening_corrected_to_ineligible_refuses_consent():
    from domain import commands as c
    from domain.service import TrialService

    service = TrialService(PROTOCOL, SEED)
    service.execute(c.ScreenParticipant("CASE-0001", screening()), audit())
    event_id = service.get_participant("CASE-0001").screening_event
    service.execute(c.CorrectData("CASE-0001", {"event_id": event_id,
                                                "field": "eligibility.stage", "value": "IV"}),
                    audit(reason="staging report"))
    with pytest.raises(NotEligible) as refused:
        service.execute(c.RecordConsent("CASE-0001", consent()), audit())
    assert refused.value.details["failed_criteria"] == ["stage"]
    participant = service.get_participant("CASE-0001")
    assert (participant.status, participant.failed_criteria) == ("screen_failed", ["stage"])


def test_a_medication_is_not_stopped_before_it_was_started_nor_corrected_to_be():
    p = randomized()
    with pytest.raises(ValidationFailed) as refused:
        p.report_medication({"drug": "x", "contains_b12": False,
                             "started_on": date(2026, 5, 1), "stopped_on": date(2026, 4, 1)},
                            audit())
    assert list(refused.value.fields) == ["data.stopped_on"]
    p.report_medication({"drug": "x", "contains_b12": False, "started_on": date(2026, 3, 1),
                         "stopped_on": date(2026, 4, 1)}, audit())
    reported = next(e for e, _ in p.records_of("MedicationReported"))
    with pytest.raises(ValidationFailed) as refused:
        p.correct_data({"event_id": reported, "field": "stopped_on",
                        "value": date(2025, 4, 1)}, audit(reason="typo"))
    assert list(refused.value.fields) == ["data.value"]


def test_a_date_rule_refusal_never_quotes_the_birth_date():
    """A contact detail: a refusal naming it must not read it back (a role that may not
    see contact details gets the same message)."""
    p = screened()
    with pytest.raises(ValidationFailed) as refused:
        p.correct_data({"event_id": p.screening_event, "field": "screened_on",
                        "value": date(1950, 1, 1)}, audit(reason="typo"))
    message = refused.value.fields["data.value"][0]
    assert "birth_date" in message and "1958" not in message


@pytest.mark.parametrize("scope, before", [("treatment", REGISTERED - timedelta(days=1)),
                                           ("study", SCREENED_ON - timedelta(days=1))])
def test_a_withdrawal_is_not_dated_before_what_it_ends_began(scope, before):
    """A treatment withdrawal typed 2019 refused every real dose after it."""
    p = randomized()
    data = {"withdrawn_on": before, "scope": scope, "reason_code": "moved"}
    with pytest.raises(ValidationFailed) as refused:
        p.withdraw(data, audit())
    assert list(refused.value.fields) == ["data.withdrawn_on"]
    p.withdraw({**data, "withdrawn_on": REGISTERED}, audit())
    withdrawal = p.event_id_of(p.withdrawals[scope])
    with pytest.raises(ValidationFailed):
        p.correct_data({"event_id": withdrawal, "field": "withdrawn_on", "value": before},
                       audit(reason="typo"))


def test_a_rescreen_is_not_dated_before_the_screening_it_follows():
    failed = screened(zubrod=3)
    with pytest.raises(ValidationFailed) as refused:
        failed.rescreen({**screening(), "screened_on": SCREENED_ON - timedelta(days=1)},
                        PROTOCOL, audit())
    assert list(refused.value.fields) == ["data.screened_on"]
    failed.rescreen(screening(), PROTOCOL, audit())


def test_a_registration_is_not_corrected_to_after_a_withdrawal():
    p = randomized()
    p.withdraw({"withdrawn_on": REGISTERED + timedelta(days=5), "scope": "treatment",
                "reason_code": "moved"}, audit())
    with pytest.raises(ValidationFailed) as refused:
        p.correct_data({"event_id": p.registration_event, "field": "registered_on",
                        "value": REGISTERED + timedelta(days=10)}, audit(reason="typo"))
    assert "treatment withdrawal" in refused.value.fields["data.value"][0]
    p.correct_data({"event_id": p.registration_event, "field": "registered_on",
                    "value": REGISTERED + timedelta(days=5)}, audit(reason="typo"))


def test_a_screening_date_is_not_corrected_out_of_the_order_of_screenings():
    p = screened(zubrod=3)
    first = p.screening_event
    p.rescreen({**screening(), "screened_on": SCREENED_ON + timedelta(days=10)}, PROTOCOL,
               audit())
    rescreen = p.screening_event
    for target, day in ((rescreen, SCREENED_ON - timedelta(days=1)),
                        (first, SCREENED_ON + timedelta(days=11))):
        with pytest.raises(ValidationFailed) as refused:
            p.correct_data({"event_id": target, "field": "screened_on", "value": day},
                           audit(reason="typo"))
        assert list(refused.value.fields) == ["data.value"]
    p.correct_data({"event_id": rescreen, "field": "screened_on",
                    "value": SCREENED_ON + timedelta(days=9)}, audit(reason="typo"))


def _service_with_a_randomized_participant():
    from domain import commands as c
    from domain.service import TrialService

    service = TrialService(PROTOCOL, SEED)
    service.execute(c.ScreenParticipant("CASE-0001", screening()), audit())
    service.execute(c.RecordConsent("CASE-0001", consent()), audit())
    service.execute(c.RandomizeParticipant("CASE-0001", {"registered_on": REGISTERED}),
                    audit())
    return service


def _correct_visit(service, event_id: str, code: str) -> None:
    from domain import commands as c

    service.execute(c.CorrectData("CASE-0001", {"event_id": event_id, "field": "visit",
                                                "value": code}), audit(reason="keyed wrong"))


def test_a_visit_keyed_under_the_last_visit_s_code_is_corrected_and_the_study_reopens():
    """Week 6's data keyed as follow_up on day 42 completed the study for good: no
    reminders, no missed visits, no withdrawal, no casebook signature. The code can now be
    corrected, and the status follows."""
    from domain import commands as c

    service = _service_with_a_randomized_participant()
    service.execute(c.CompleteVisit("CASE-0001", visit("follow_up", REGISTERED + timedelta(
        days=42))), audit())
    participant = service.get_participant("CASE-0001")
    assert participant.status == "completed"
    keyed = next(iter(participant.completed_visits().values()))["event_id"]

    _correct_visit(service, keyed, "week6")
    participant = service.get_participant("CASE-0001")
    assert participant.status == "randomized"
    assert list(participant.completed_visits()) == ["week6"]
    assert {"week6", "follow_up"} <= participant.changed.keys()  # both visits' data changed

    _correct_visit(service, keyed, "follow_up")  # and back: the study completes again
    assert service.get_participant("CASE-0001").status == "completed"


def test_a_visit_is_not_corrected_onto_a_visit_already_completed():
    from domain import commands as c

    service = _service_with_a_randomized_participant()
    for code, day in (("baseline", 0), ("week6", 42)):
        service.execute(c.CompleteVisit("CASE-0001", visit(code, REGISTERED + timedelta(
            days=day))), audit())
    week6 = service.get_participant("CASE-0001").completed_visits()["week6"]["event_id"]
    with pytest.raises(InvalidTransition, match="visit baseline is already completed"):
        _correct_visit(service, week6, "baseline")


def test_a_participant_off_treatment_goes_back_to_off_treatment_when_the_study_reopens():
    from domain import commands as c

    service = _service_with_a_randomized_participant()
    service.execute(c.WithdrawParticipant("CASE-0001", {
        "withdrawn_on": REGISTERED + timedelta(days=20), "scope": "treatment",
        "reason_code": "toxicity"}), audit())
    service.execute(c.CompleteVisit("CASE-0001", visit("follow_up", REGISTERED + timedelta(
        days=90))), audit())
    keyed = service.get_participant("CASE-0001").completed_visits()["follow_up"]["event_id"]
    _correct_visit(service, keyed, "end_of_treatment")
    assert service.get_participant("CASE-0001").status == "off_treatment"


def test_a_randomized_participant_s_study_withdrawal_is_not_dated_before_the_registration():
    """It was held only to the screening, while a registration corrected to after it was
    refused: the record could be made that no correction could make right."""
    p = randomized()
    with pytest.raises(ValidationFailed) as refused:
        p.withdraw({"withdrawn_on": REGISTERED - timedelta(days=1), "scope": "study",
                    "reason_code": "moved"}, audit())
    assert "registered_on" in refused.value.fields["data.withdrawn_on"][0]


def test_a_study_withdrawal_is_not_dated_before_the_treatment_withdrawal():
    """Off treatment on day 30, then out of the study typed as day 20: the record said she
    stayed on treatment ten days after leaving the study. Nor is a treatment withdrawal
    corrected to after the study withdrawal."""
    p = randomized()
    p.withdraw({"withdrawn_on": REGISTERED + timedelta(days=30), "scope": "treatment",
                "reason_code": "toxicity"}, audit())
    with pytest.raises(ValidationFailed) as refused:
        p.withdraw({"withdrawn_on": REGISTERED + timedelta(days=20), "scope": "study",
                    "reason_code": "moved"}, audit())
    off_treatment = REGISTERED + timedelta(days=30)
    assert refused.value.fields == {"data.withdrawn_on": [
        f"withdrawn_on must not be before the treatment withdrawal ({off_treatment})"]}
    p.withdraw({"withdrawn_on": REGISTERED + timedelta(days=30), "scope": "study",
                "reason_code": "moved"}, audit())  # the same day: both at once
    for scope, day in (("study", 29), ("treatment", 31)):
        with pytest.raises(ValidationFailed) as refused:
            p.correct_data({"event_id": p.event_id_of(p.withdrawals[scope]),
                            "field": "withdrawn_on", "value": REGISTERED + timedelta(days=day)},
                           audit(reason="typo"))
        assert list(refused.value.fields) == ["data.value"]
        assert ("treatment withdrawal" if scope == "study" else "study withdrawal") in (
            refused.value.fields["data.value"][0])


def test_a_screening_a_rescreen_followed_keeps_its_birth_date_before_its_day():
    """Only the current screening's dates were held in order when corrected."""
    p = screened(zubrod=3)
    first = p.screening_event
    p.rescreen(screening(), PROTOCOL, audit())
    for field, value in (("birth_date", SCREENED_ON + timedelta(days=1)),
                         ("screened_on", date(1950, 1, 1))):
        with pytest.raises(ValidationFailed) as refused:
            p.correct_data({"event_id": first, "field": field, "value": value},
                           audit(reason="typo"))
        assert list(refused.value.fields) == ["data.value"]
        assert "1958" not in refused.value.fields["data.value"][0]  # no birth date shown
    p.correct_data({"event_id": first, "field": "birth_date", "value": date(1958, 6, 16)},
                   audit(reason="typo"))


def test_a_reason_of_white_space_alone_is_no_reason():
    p = screened()
    with pytest.raises(ValidationFailed) as refused:
        p.correct_data({"event_id": p.screening_event, "field": "birth_date",
                        "value": date(1958, 6, 16)}, audit(reason=" \t\n"))
    assert refused.value.fields == {"reason": ["is required for CorrectData"]}
