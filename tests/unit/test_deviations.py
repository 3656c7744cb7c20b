"""Each of the 12 deviation rules fires on its positive case and stays silent on its
negative case (no I/O: aggregates in memory)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from domain.deviations import RULES, SEVERITY, detect
from domain.participant import Participant
from domain.randomization import AllocationSequence
from tests.factories import audit, consent, protocol, screening

PROTOCOL = protocol()
REGISTERED = date(2026, 3, 4)
LATER = REGISTERED + timedelta(days=400)


def day(n: int) -> date:
    return REGISTERED + timedelta(days=n)


def randomized(arm: str = "b12") -> Participant:
    """A randomized participant in ``arm`` (the seed is chosen to draw it)."""
    for n in range(100):
        p = Participant.screen("CASE-0001", screening(), PROTOCOL, audit())
        p.record_consent(consent(), audit())
        sequence = AllocationSequence.open(PROTOCOL.study_id, p.site_id, audit())
        p.randomize({"registered_on": REGISTERED}, sequence, f"seed-{n}".encode(), PROTOCOL,
                    audit())
        if p.arm == arm:
            return p
    raise AssertionError(f"no seed draws {arm}")


def dose(p: Participant, n: int, mcg: float = 1000) -> None:
    p.record_dose({"taken_on": day(n), "taken": True, "dose_mcg": mcg}, audit())


def codes(p: Participant, today: date = LATER) -> set[str]:
    return {f.code for f in detect(p, PROTOCOL, today)}


def correct(p: Participant, field: str, value) -> None:
    p.correct_data({"event_id": p.screening_event, "field": field, "value": value},
                   audit(reason="source document check"))


def multivitamin(stopped_on: date | None, started_on: date | None = None) -> dict:
    return {"drug": "multivitamin with B12", "started_on": started_on, "stopped_on": stopped_on,
            "contains_b12": True}


def test_the_catalogue_has_thirteen_codes_each_with_a_severity():
    assert len(RULES) == 13 and set(RULES) == set(SEVERITY)
    assert set(SEVERITY.values()) == {"major", "minor"}


def test_washout_incomplete_fires_for_the_seed_case_reported_after_randomization():
    p = randomized()
    p.report_medication(multivitamin(stopped_on=REGISTERED - timedelta(days=5)), audit())
    assert "washout_incomplete" in codes(p)


def test_washout_incomplete_is_silent_after_a_two_week_washout():
    p = randomized()
    p.report_medication(multivitamin(stopped_on=REGISTERED - timedelta(days=20)), audit())
    assert "washout_incomplete" not in codes(p)


def test_ai_duration_short_fires_when_a_correction_moves_the_ai_start_late():
    p = randomized()
    correct(p, "eligibility.aromatase_inhibitor.started_on", REGISTERED - timedelta(days=5))
    assert "ai_duration_short" in codes(p)
    assert "ai_duration_short" not in codes(randomized())


def test_analgesic_unstable_fires_when_a_correction_moves_the_stable_date_late():
    p = randomized()
    correct(p, "eligibility.analgesics", [{"drug": "gabapentin",
                                          "stable_since": REGISTERED - timedelta(days=10)}])
    assert "analgesic_unstable" in codes(p)
    assert "analgesic_unstable" not in codes(randomized())


def test_procedure_before_consent_fires_for_blood_drawn_before_signing():
    p = randomized()
    p.record_blood_sample({"timepoint": "baseline",
                           "collected_at": datetime(2026, 3, 1, 9, 0)}, PROTOCOL, audit())
    assert "procedure_before_consent" in codes(p)
    q = randomized()
    q.record_blood_sample({"timepoint": "baseline", "collected_at": datetime(2026, 3, 4, 8)},
                          PROTOCOL, audit())
    assert "procedure_before_consent" not in codes(q)


def test_a_reconsent_does_not_make_earlier_procedures_late():
    p = randomized()
    p.record_blood_sample({"timepoint": "baseline", "collected_at": datetime(2026, 3, 4, 8)},
                          PROTOCOL, audit())
    p.record_consent(consent(signed_on=date(2026, 5, 1)), audit())  # protocol amendment
    assert p.consented_on == date(2026, 5, 1)
    assert "procedure_before_consent" not in codes(p)


def test_a_correction_that_makes_a_randomized_participant_ineligible_is_flagged_major():
    p = randomized()
    assert "ineligible_randomized" not in codes(p)
    correct(p, "eligibility.zubrod", 3)
    findings = [f for f in detect(p, PROTOCOL, LATER) if f.code == "ineligible_randomized"]
    assert [(f.severity, f.evidence) for f in findings] == [
        ("major", (p.screening_event, p.registration_event))]
    assert "zubrod" in findings[0].detail


def test_recent_substance_abuse_found_by_a_correction_is_flagged_ineligible_randomized():
    p = randomized()
    correct(p, "eligibility.substance_abuse_last_on", date(2026, 1, 1))
    findings = [f for f in detect(p, PROTOCOL, LATER) if f.code == "ineligible_randomized"]
    assert len(findings) == 1 and "no_recent_substance_abuse" in findings[0].detail
    q = randomized()  # a criterion with a code of its own is flagged by that code only
    correct(q, "eligibility.aromatase_inhibitor.started_on", REGISTERED - timedelta(days=5))
    assert "ai_duration_short" in codes(q) and "ineligible_randomized" not in codes(q)


def test_a_screen_failure_or_a_participant_not_randomized_is_not_ineligible_randomized():
    p = Participant.screen("CASE-0002", screening(), PROTOCOL, audit())
    correct(p, "eligibility.zubrod", 3)
    assert "ineligible_randomized" not in codes(p)


def test_baseline_blood_after_the_first_dose_fires():
    p = randomized()
    dose(p, 0)
    p.record_blood_sample({"timepoint": "baseline", "collected_at": datetime(2026, 3, 5, 9)},
                          PROTOCOL, audit())
    assert "baseline_blood_after_dose" in codes(p)
    q = randomized()
    q.record_blood_sample({"timepoint": "baseline", "collected_at": datetime(2026, 3, 4, 8)},
                          PROTOCOL, audit())
    dose(q, 0)
    assert "baseline_blood_after_dose" not in codes(q)


def test_a_sample_is_dated_on_its_site_s_calendar_whatever_the_zone_it_was_written_in():
    """CASE keeps New York's time: 02:00 UTC on 5 March, or 11:00 in Tokyo that day, is
    still 4 March there, the day of the first dose; 06:00 UTC on 5 March is 5 March."""
    for collected_at, late in [(datetime(2026, 3, 5, 2, tzinfo=UTC), False),
                               (datetime.fromisoformat("2026-03-05T11:00+09:00"), False),
                               (datetime.fromisoformat("2026-03-04T21:00-05:00"), False),
                               (datetime(2026, 3, 5, 2), False),  # no zone: UTC
                               (datetime(2026, 3, 5, 6, tzinfo=UTC), True)]:
        p = randomized()
        p.record_blood_sample({"timepoint": "baseline", "collected_at": collected_at},
                              PROTOCOL, audit())
        dose(p, 0)
        assert ("baseline_blood_after_dose" in codes(p)) is late, collected_at


def test_a_sample_before_consent_on_the_site_s_calendar_is_flagged():
    """Consent signed 2 March (the factories' date); a sample at 03:00 UTC on 2 March was
    drawn in New York the evening before."""
    p = randomized()
    assert p.first_consented_on == date(2026, 3, 2)
    p.record_blood_sample({"timepoint": "baseline",
                           "collected_at": datetime(2026, 3, 2, 3, tzinfo=UTC)}, PROTOCOL,
                          audit())
    findings = [f for f in detect(p, PROTOCOL, LATER) if f.code == "procedure_before_consent"]
    assert [f.detail for f in findings] == ["procedure on 2026-03-01, consent signed 2026-03-02"]


def test_a_dose_in_the_control_arm_fires_and_not_in_the_b12_arm():
    control, b12 = randomized("control"), randomized("b12")
    dose(control, 1)
    dose(b12, 1)
    assert "dose_in_control_arm" in codes(control)
    assert "dose_in_control_arm" not in codes(b12)


def test_a_dose_dated_before_registration_fires():
    p, q = randomized(), randomized()
    dose(p, -1)
    dose(q, 0)
    assert "dose_before_randomization" in codes(p)
    assert "dose_before_randomization" not in codes(q)


def test_a_dose_of_another_strength_fires():
    p, q = randomized(), randomized()
    dose(p, 1, mcg=500)
    dose(q, 1, mcg=1000)
    assert "wrong_dose" in codes(p)
    assert "wrong_dose" not in codes(q)


def test_a_visit_outside_its_window_fires():
    p, q = randomized(), randomized()
    p.complete_visit({"visit": "week6", "completed_on": day(30)}, PROTOCOL, audit())
    q.complete_visit({"visit": "week6", "completed_on": day(42)}, PROTOCOL, audit())
    assert "visit_out_of_window" in codes(p)
    assert "visit_out_of_window" not in codes(q)


def test_a_visit_missed_fires_once_its_window_has_closed():
    p = randomized()
    p.complete_visit({"visit": "baseline", "completed_on": day(0)}, PROTOCOL, audit())
    assert "visit_missed" not in codes(p, today=day(49))  # last day of the week6 window
    missed = {f.key for f in detect(p, PROTOCOL, day(50), ("visit_missed",))}
    assert missed == {"week6"}
    p.complete_visit({"visit": "week6", "completed_on": day(49)}, PROTOCOL, audit())
    assert "visit_missed" not in codes(p, today=day(50))


def test_poor_adherence_fires_past_the_missed_dose_threshold():
    p, q = randomized(), randomized()
    for n in range(30):
        if n % 3 == 0:
            dose(p, n)
        dose(q, n)
    assert "poor_adherence" in codes(p, today=day(30))
    assert "poor_adherence" not in codes(q, today=day(30))


def test_poor_adherence_counts_no_dose_after_a_withdrawal_from_the_study():
    """Thirty days of doses, then the study withdrawal: the days after it are not missed
    doses (the scan now looks at participants who left the study)."""
    p = randomized()
    for n in range(30):
        dose(p, n)
    p.withdraw({"withdrawn_on": day(29), "scope": "study", "reason_code": "moved"}, audit())
    assert "poor_adherence" not in codes(p, today=day(80))


def test_the_clock_judges_by_the_day_that_has_ended_everywhere():
    """At 01:30 UTC on the 23rd it is still the 22nd in Cleveland (and until 12:00 UTC on
    Baker Island): a window ending on the 22nd has not closed everywhere yet."""
    from datetime import UTC

    from domain.schedule import ended_everywhere

    assert ended_everywhere(datetime(2026, 4, 23, 1, 30, tzinfo=UTC)) == date(2026, 4, 22)
    assert ended_everywhere(datetime(2026, 4, 23, 11, 59, tzinfo=UTC)) == date(2026, 4, 22)
    assert ended_everywhere(datetime(2026, 4, 23, 12, 0, tzinfo=UTC)) == date(2026, 4, 23)


def test_poor_adherence_waits_for_enough_expected_doses():
    p = randomized()
    assert "poor_adherence" not in codes(p, today=day(10))


def test_b12_use_in_the_control_arm_fires_and_not_in_the_b12_arm():
    control, b12 = randomized("control"), randomized("b12")
    for p in (control, b12):
        p.report_medication(multivitamin(stopped_on=None, started_on=day(10)), audit())
    assert "b12_use_in_control" in codes(control)
    assert "b12_use_in_control" not in codes(b12)


def test_b12_started_after_a_control_participant_left_the_study_is_not_a_deviation():
    """A product started after the follow-up visit that completed the study, or after a
    study withdrawal, was not taken during the study; one started on the last day was."""
    completed, last_day, withdrawn = (randomized("control"), randomized("control"),
                                      randomized("control"))
    for p in (completed, last_day):
        p.complete_visit({"visit": "follow_up", "completed_on": day(180)}, PROTOCOL, audit())
        assert p.status == "completed"
    completed.report_medication(multivitamin(stopped_on=None, started_on=day(181)), audit())
    last_day.report_medication(multivitamin(stopped_on=None, started_on=day(180)), audit())
    withdrawn.report_medication(multivitamin(stopped_on=day(90), started_on=day(61)), audit())
    withdrawn.withdraw({"withdrawn_on": day(60), "scope": "study", "reason_code": "moved"},
                       audit())  # recorded late: she had left the day before
    assert "b12_use_in_control" not in codes(completed)
    assert "b12_use_in_control" in codes(last_day)
    assert "b12_use_in_control" not in codes(withdrawn)


@pytest.mark.parametrize("code", sorted(RULES))
def test_a_flagged_deviation_is_not_found_again(code):
    p = randomized("control")
    dose(p, 1)
    for finding in detect(p, PROTOCOL, LATER):
        p.flag_deviation(finding.deviation_id(p), finding.code, finding.severity,
                         list(finding.evidence), finding.detail, audit())
    assert detect(p, PROTOCOL, LATER) == []
