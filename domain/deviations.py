"""Protocol deviations: rules over a participant's record, each flagged once.

Event-driven rules look only at recorded data; clock-driven rules (``visit_missed``,
``poor_adherence``) also need today's date, passed in by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from domain.eligibility import days_between
from domain.participant import Participant, deviation_uuid
from domain.protocol import Protocol
from domain.schedule import schedule

SEVERITY = {
    "washout_incomplete": "major", "ai_duration_short": "major",
    "analgesic_unstable": "major", "procedure_before_consent": "major",
    "baseline_blood_after_dose": "major", "dose_in_control_arm": "major",
    "dose_before_randomization": "major", "wrong_dose": "minor",
    "visit_out_of_window": "minor", "visit_missed": "major", "poor_adherence": "minor",
    "b12_use_in_control": "major", "ineligible_randomized": "major",
}
CLOCK_DRIVEN = ("visit_missed", "poor_adherence")
# The criteria whose failure at registration is flagged by a code of its own.
OWN_CODES = {"ai_duration": "ai_duration_short", "analgesics_stable": "analgesic_unstable",
             "b12_washout": "washout_incomplete"}


@dataclass(frozen=True)
class Finding:
    code: str
    key: str
    evidence: tuple[str, ...]
    detail: str
    # How many times what this finding is about was found before and retracted (a visit's
    # missed mark, when the registration date moved): each time is a deviation of its own.
    generation: int = 0

    @property
    def severity(self) -> str:
        return SEVERITY[self.code]

    def deviation_id(self, participant: Participant) -> str:
        return deviation_uuid(participant.id, self.code, self.key, self.generation)


Rule = Callable[[Participant, Protocol, date], Iterator[Finding]]


def _day(p: Participant, protocol: Protocol, value: date) -> date:
    """The participant's site's calendar day of a date or a time (a site no longer in the
    protocol counts in UTC)."""
    return protocol.day_at(p.site_id, value)


def _b12_products(p: Participant) -> Iterator[tuple[str, dict[str, Any]]]:
    return ((e, d) for e, d in p.records_of("MedicationReported") if d["contains_b12"])


def washout_incomplete(p: Participant, protocol: Protocol, today: date) -> Iterator[Finding]:
    """B12 or a B12-containing multivitamin not stopped two weeks before registration."""
    registered, reg_event = p.registered_on, p.registration_event
    if registered is None or reg_event is None:
        return
    minimum = protocol.eligibility.b12_washout_min_days
    stopped = p.screening["eligibility"].get("b12_supplement_stopped_on")
    if stopped is not None and days_between(stopped, registered) < minimum:
        yield Finding("washout_incomplete", "screening", (p.screening_event, reg_event),
                      f"B12 stopped on {stopped}, {days_between(stopped, registered)} days "
                      f"before registration")
    for event_id, med in _b12_products(p):
        started, ended = med.get("started_on"), med.get("stopped_on")
        if started is not None and started >= registered:
            continue
        if ended is None or days_between(ended, registered) < minimum:
            yield Finding("washout_incomplete", event_id, (event_id, reg_event),
                          f"{med['drug']} stopped {ended or 'never'}; registration {registered}")


def _time_relative(code: str, dates: Callable[[Participant], list[date]],
                   minimum: Callable[[Protocol], int], what: str) -> Rule:
    def rule(p: Participant, protocol: Protocol, today: date) -> Iterator[Finding]:
        registered = p.registered_on
        if registered is None or p.registration_event is None:
            return
        for day in dates(p):
            if days_between(day, registered) < minimum(protocol):
                yield Finding(code, "registration", (p.screening_event, p.registration_event),
                              f"{what} {day}, {days_between(day, registered)} days before "
                              f"registration on {registered}")
                return
    rule.__name__ = code
    return rule


ai_duration_short = _time_relative(
    "ai_duration_short",
    lambda p: [p.screening["eligibility"]["aromatase_inhibitor"]["started_on"]],
    lambda protocol: protocol.eligibility.ai_min_days_before_registration,
    "aromatase inhibitor started on",
)
analgesic_unstable = _time_relative(
    "analgesic_unstable",
    lambda p: [a["stable_since"] for a in p.screening["eligibility"].get("analgesics") or ()],
    lambda protocol: protocol.eligibility.analgesic_min_stable_days,
    "analgesic dose stable since",
)


def procedure_before_consent(p: Participant, protocol: Protocol,
                             today: date) -> Iterator[Finding]:
    """A blood sample or a visit dated before the consent was first signed (a re-consent
    after a protocol amendment does not make the earlier procedures late)."""
    consented = p.first_consented_on
    procedures = [(e, _day(p, protocol, d["collected_at"]))
                  for e, d in p.records_of("BloodSampleCollected")]
    procedures += [(e, d["completed_on"]) for e, d in p.records_of("VisitCompleted")]
    for event_id, day in procedures:
        if consented is None or day < consented:
            yield Finding("procedure_before_consent", event_id, (event_id,),
                          f"procedure on {day}, consent signed {consented or 'never'}")


def baseline_blood_after_dose(p: Participant, protocol: Protocol,
                              today: date) -> Iterator[Finding]:
    """Baseline blood must be drawn before the first dose."""
    doses = sorted((d["taken_on"], e) for e, d in p.records_of("DoseRecorded") if d["taken"])
    if not doses:
        return
    first_day, first_event = doses[0]
    baseline = protocol.visits[0].code
    for event_id, sample in p.records_of("BloodSampleCollected"):
        collected = _day(p, protocol, sample["collected_at"])
        if sample["timepoint"] == baseline and collected > first_day:
            yield Finding("baseline_blood_after_dose", event_id, (event_id, first_event),
                          f"baseline blood on {collected}, "
                          f"first dose on {first_day}")


def dose_in_control_arm(p: Participant, protocol: Protocol, today: date) -> Iterator[Finding]:
    """A dose recorded as taken by a participant of an arm that receives no dose."""
    if p.arm is None or protocol.arm(p.arm).receives_dose:
        return
    taken = [e for e, d in p.records_of("DoseRecorded") if d["taken"]]
    if taken:
        yield Finding("dose_in_control_arm", "arm", tuple(taken[:20]),
                      f"{len(taken)} dose(s) recorded for the {p.arm} arm")


def dose_before_randomization(p: Participant, protocol: Protocol,
                              today: date) -> Iterator[Finding]:
    """A dose dated before registered_on."""
    registered = p.registered_on
    if registered is None:
        return
    for event_id, dose in p.records_of("DoseRecorded"):
        if dose["taken"] and dose["taken_on"] < registered:
            yield Finding("dose_before_randomization", event_id, (event_id,),
                          f"dose on {dose['taken_on']}, registration on {registered}")


def wrong_dose(p: Participant, protocol: Protocol, today: date) -> Iterator[Finding]:
    """A dose taken at another strength than the protocol's."""
    for event_id, dose in p.records_of("DoseRecorded"):
        given = dose.get("dose_mcg")
        if dose["taken"] and given is not None and float(given) != protocol.dose_mcg:
            yield Finding("wrong_dose", event_id, (event_id,),
                          f"{given} mcg instead of {protocol.dose_mcg:g} mcg")


def visit_out_of_window(p: Participant, protocol: Protocol, today: date) -> Iterator[Finding]:
    """A visit completed outside its window."""
    if p.registered_on is None:
        return
    completed = p.completed_visits()
    for visit in schedule(protocol, p.registered_on):
        done = completed.get(visit.code)
        if done and not visit.in_window(done["completed_on"]):
            yield Finding("visit_out_of_window", visit.code, (done["event_id"],),
                          f"{visit.code} on {done['completed_on']}, window "
                          f"{visit.window_start}..{visit.window_end}")


def visit_missed(p: Participant, protocol: Protocol, today: date) -> Iterator[Finding]:
    """A visit window that closed with no visit (not for participants off the study)."""
    if p.registered_on is None or p.registration_event is None:
        return
    left_on = p.withdrawn_on("study")
    completed = p.completed_visits()
    for visit in schedule(protocol, p.registered_on):
        closed = visit.window_end < today
        if closed and visit.code not in completed and (left_on is None
                                                       or left_on > visit.window_end):
            yield Finding("visit_missed", visit.code, (p.registration_event,),
                          f"{visit.code} window closed on {visit.window_end}",
                          p.missed_retractions.get(visit.code, 0))


def poor_adherence(p: Participant, protocol: Protocol, today: date) -> Iterator[Finding]:
    """More missed daily doses than the protocol's threshold over the treatment so far."""
    if p.arm is None or p.registered_on is None or not protocol.arm(p.arm).receives_dose:
        return
    treatment = protocol.visit(protocol.treatment_ends_at) or protocol.visits[-1]
    end = min(today - timedelta(days=1),
              p.registered_on + timedelta(days=treatment.target_day),
              p.withdrawn_on("treatment") or date.max, p.withdrawn_on("study") or date.max)
    expected = (end - p.registered_on).days + 1
    if expected < protocol.deviations.adherence_min_expected_doses:
        return
    taken_events = [e for e, d in p.records_of("DoseRecorded")
                    if d["taken"] and p.registered_on <= d["taken_on"] <= end]
    missed = 1 - len(taken_events) / expected
    if missed > protocol.deviations.max_missed_dose_fraction:
        yield Finding("poor_adherence", "treatment", tuple(taken_events[-5:]) or
                      (p.registration_event or p.screening_event,),
                      f"{expected - len(taken_events)} of {expected} doses missed")


def b12_use_in_control(p: Participant, protocol: Protocol, today: date) -> Iterator[Finding]:
    """A control participant reporting B12 use during the study: from registration to the
    day they left it (a study withdrawal's day, or the last visit's that completed it)."""
    if p.arm is None or p.registered_on is None or protocol.arm(p.arm).receives_dose:
        return
    left = p.withdrawn_on("study") or p.completed_visits().get(
        protocol.visits[-1].code, {}).get("completed_on")
    for event_id, med in _b12_products(p):
        started, ended = med.get("started_on"), med.get("stopped_on")
        if left is not None and started is not None and started > left:
            continue  # begun after the study, for this participant
        if ended is None or ended >= p.registered_on:
            yield Finding("b12_use_in_control", event_id, (event_id,),
                          f"{med['drug']} (contains B12) reported by a {p.arm} participant")


def ineligible_randomized(p: Participant, protocol: Protocol,
                          today: date) -> Iterator[Finding]:
    """A randomized participant whose record, as corrected, fails a criterion as
    randomization checks them (the time-relative ones on the registration date), other than
    those flagged by a code of their own (OWN_CODES). Only a correction can show it: a record
    never corrected passed randomization."""
    registered = p.registered_on
    corrected = {p.screening_record, p.registration_record} & set(p.corrected)
    if p.registration_event is None or registered is None or not corrected:
        return
    failed = [c for c in p.failed_on(registered, protocol) if c not in OWN_CODES]
    if failed:
        yield Finding("ineligible_randomized", "screening",
                      (p.screening_event, p.registration_event),
                      "the corrected screening record fails: " + ", ".join(failed))


RULES: dict[str, Rule] = {
    r.__name__: r
    for r in (
        washout_incomplete, ai_duration_short, analgesic_unstable, procedure_before_consent,
        baseline_blood_after_dose, dose_in_control_arm, dose_before_randomization, wrong_dose,
        visit_out_of_window, visit_missed, poor_adherence, b12_use_in_control,
        ineligible_randomized,
    )
}


def detect(p: Participant, protocol: Protocol, today: date,
           codes: tuple[str, ...] | None = None) -> list[Finding]:
    """The deviations the record shows that are not flagged yet."""
    findings = []
    for code in codes or tuple(RULES):
        for finding in RULES[code](p, protocol, today):
            if finding.deviation_id(p) not in p.deviations:
                findings.append(finding)
    return findings
