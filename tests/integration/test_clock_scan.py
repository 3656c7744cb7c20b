"""The clock scan over participants who left the study or completed it: a window that
closed before they left, with no visit, is recorded as missed, as it is for those still in
the study."""

from __future__ import annotations

from datetime import timedelta

from domain import commands as c
from infrastructure.jobs.monitor import scan_clock
from infrastructure.readside.projections import TrialProjection
from tests.integration.helpers import REGISTERED, enrol, send


def day(n: int):
    return REGISTERED + timedelta(days=n)


def test_a_window_that_closed_before_a_withdrawal_is_marked_missed_after_it(isolated):
    """The week-6 window closed on day 49 unseen (no scan ran, or the withdrawal came
    first); the participant left on day 60. The visit was left `overdue` for ever, and
    the casebook could never be signed (every visit must be completed or missed)."""
    pid = enrol(isolated)
    send(isolated, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": day(0)}))
    send(isolated, c.WithdrawParticipant(pid, {"withdrawn_on": day(60), "scope": "study",
                                               "reason_code": "moved"}))
    TrialProjection(isolated).catch_up()

    counts = scan_clock(isolated, day(61))

    participant = isolated.service.get_participant(pid)
    assert participant.missed_visits == ["week6"]  # the later windows: cancelled, not missed
    assert counts["missed"] == 1
    flagged = [d for d in participant.deviations.values() if d["code"] == "visit_missed"]
    assert [d["detail"] for d in flagged] == [f"week6 window closed on {day(49)}"]


def test_a_visit_skipped_before_the_last_one_is_marked_missed_after_completion(isolated):
    pid = enrol(isolated)
    for code, n in (("baseline", 0), ("end_of_treatment", 90), ("follow_up", 180)):
        send(isolated, c.CompleteVisit(pid, {"visit": code, "completed_on": day(n)}))
    assert isolated.service.get_participant(pid).status == "completed"
    TrialProjection(isolated).catch_up()

    scan_clock(isolated, day(200))

    assert isolated.service.get_participant(pid).missed_visits == ["week6"]
    TrialProjection(isolated).catch_up()
    assert scan_clock(isolated, day(201))["participants"] == 0  # nothing left to mark


def test_the_scans_day_is_the_one_ended_everywhere_not_the_utc_date(isolated):
    """At 01:30 UTC it is still yesterday west of UTC: a window ending yesterday (UTC) is
    still open at a site in Cleveland, and the scan (the worker's and the CLI's) must not
    mark its visit missed yet."""
    from datetime import UTC, datetime

    pid = enrol(isolated)
    send(isolated, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": day(0)}))
    TrialProjection(isolated).catch_up()
    at = datetime.combine(day(50), datetime.min.time(), UTC) + timedelta(hours=1, minutes=30)
    isolated.bus.clock = lambda: at
    assert isolated.today() == day(50) and isolated.ended_everywhere() == day(49)

    scan_clock(isolated, isolated.ended_everywhere())
    assert isolated.service.get_participant(pid).missed_visits == []  # week6 ends day 49

    isolated.bus.clock = lambda: at + timedelta(hours=11)  # 12:30 UTC: the 49th has ended
    scan_clock(isolated, isolated.ended_everywhere())
    assert isolated.service.get_participant(pid).missed_visits == ["week6"]
