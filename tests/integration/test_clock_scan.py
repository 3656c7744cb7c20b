"""The clock scan over participants who left the study or completed it: a window that
closed before they left, with no visit, is recorded as missed, as it is for those still in
the study."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from domain import commands as c
from infrastructure.jobs.monitor import scan_clock
from infrastructure.readside.projections import TrialProjection
from tests.integration.helpers import REGISTERED, enrol, send


def day(n: int):
    return REGISTERED + timedelta(days=n)


def at_noon(t, n: int) -> None:
    """The application's clock at 12:00 UTC on day ``n`` (the day has ended everywhere)."""
    moment = datetime.combine(day(n), datetime.min.time(), UTC) + timedelta(hours=12)
    t.bus.clock = lambda: moment


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
    TrialProjection(isolated).catch_up()
    # Its other windows closed after it left: cancelled, never looked at again.
    assert scan_clock(isolated, day(400))["participants"] == 0


def test_a_locked_casebook_gets_nothing_from_the_clock_until_it_is_unlocked(isolated):
    """A casebook locked after the participant left, with a window that closed before:
    the record is frozen, and the scan writes nothing into it (no mark, no flag); once
    unlocked, the scan finds what it holds."""
    pid = enrol(isolated)
    send(isolated, c.WithdrawParticipant(pid, {"withdrawn_on": day(60), "scope": "study",
                                               "reason_code": "moved"}))
    send(isolated, c.LockCasebook(pid, {}), actor="dm")
    TrialProjection(isolated).catch_up()
    version = isolated.service.get_participant(pid).version
    scan_clock(isolated, day(61))
    assert isolated.service.get_participant(pid).version == version
    send(isolated, c.UnlockCasebook(pid, {}), actor="dm", reason="week 6 form found")
    TrialProjection(isolated).catch_up()
    scan_clock(isolated, day(62))  # no baseline visit was recorded either
    assert isolated.service.get_participant(pid).missed_visits == ["baseline", "week6"]


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
    pid = enrol(isolated)
    send(isolated, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": day(0)}))
    TrialProjection(isolated).catch_up()
    at = datetime.combine(day(50), datetime.min.time(), UTC) + timedelta(hours=1, minutes=30)
    isolated.bus.clock = lambda: at
    assert isolated.ended_everywhere() == day(49)  # (the UTC date is day 50)

    scan_clock(isolated, isolated.ended_everywhere())
    assert isolated.service.get_participant(pid).missed_visits == []  # week6 ends day 49

    isolated.bus.clock = lambda: at + timedelta(hours=11)  # 12:30 UTC: the 49th has ended
    scan_clock(isolated, isolated.ended_everywhere())
    assert isolated.service.get_participant(pid).missed_visits == ["week6"]


def test_a_miss_the_corrected_registration_date_voids_is_retracted_and_marked_again(isolated):
    """Registration typed 03-04 for 03-14: the scan on day 50 marks week 6 missed (its
    window then ended on day 49); the correction moves the window to days 45-59, open that
    day. The mark stayed, the visit showed missed and its reminders stopped. Now the mark is
    retracted by an event saying why; the scan marks the visit again once its new window
    closes unvisited, and the ODM export removes the retracted mark's form."""
    from lxml import etree

    from domain.views import participant_state
    from infrastructure.audit.history import history
    from infrastructure.audit.odm import odm_document
    from tests.integration.test_exports import ODM_XSD

    pid = enrol(isolated)
    send(isolated, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": day(0)}))
    at_noon(isolated, 50)
    TrialProjection(isolated).catch_up()
    scan_clock(isolated, isolated.ended_everywhere())
    participant = isolated.service.get_participant(pid)
    assert participant.missed_visits == ["week6"]

    send(isolated, c.CorrectData(pid, {"event_id": participant.registration_event,
                                       "field": "registered_on", "value": day(10).isoformat()}),
         reason="registration date mistyped")
    participant = isolated.service.get_participant(pid)
    assert participant.missed_visits == []
    state = participant_state(participant, isolated.protocol, day(50))
    assert {v["code"]: v["status"] for v in state["visits"]}["week6"] == "open"
    entries = history(isolated.service, pid, veil=str)
    cause = f"registration date corrected to {day(10)}: the window now ends on {day(59)}"
    assert [e["type"] for e in entries[-3:]] == ["DataCorrected", "VisitMissedRetracted",
                                                 "DeviationResolved"]
    assert entries[-2]["data"] == {"visit": "week6", "cause": cause}
    assert entries[-1]["data"]["resolution"] == f"missed mark retracted: {cause}"

    at_noon(isolated, 60)  # the new window ended on day 59, unvisited
    TrialProjection(isolated).catch_up()
    scan_clock(isolated, isolated.ended_everywhere())
    participant = isolated.service.get_participant(pid)
    assert participant.missed_visits == ["week6"]
    flags = [(d["status"], d["detail"]) for d in participant.deviations.values()
             if d["code"] == "visit_missed"]
    assert flags == [("resolved", f"week6 window closed on {day(49)}"),
                     ("open", f"week6 window closed on {day(59)}")]

    root = etree.fromstring("".join(odm_document(isolated)).encode())
    assert etree.XMLSchema(etree.parse(str(ODM_XSD))).validate(root)
    ns = {"odm": "http://www.cdisc.org/ns/odm/v1.3"}
    subject = root.find(f".//odm:SubjectData[@SubjectKey='{pid}']", ns)
    marks = [(f.get("TransactionType"), f.get("FormRepeatKey"))
             for f in subject.iterfind(".//odm:FormData[@FormOID='F.VISIT_MISSED']", ns)]
    assert [kind for kind, _ in marks] == ["Insert", "Remove", "Insert"]
    assert marks[0][1] == marks[1][1] != marks[2][1]  # the first mark's form removed


def test_a_visit_s_data_moved_onto_a_visit_marked_missed_retracts_the_mark(isolated):
    """Week 6 was held on day 44 but keyed as the end of treatment; the scan on day 50
    marked week 6 missed. Corrected onto week 6, the record said the visit was both
    missed (its major deviation open) and held in its window; the ODM export gave both
    forms."""
    from domain.views import participant_state
    from infrastructure.audit.history import history

    pid = enrol(isolated)
    send(isolated, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": day(0)}))
    send(isolated, c.CompleteVisit(pid, {"visit": "end_of_treatment",
                                         "completed_on": day(44)}))
    at_noon(isolated, 50)
    TrialProjection(isolated).catch_up()
    scan_clock(isolated, isolated.ended_everywhere())
    participant = isolated.service.get_participant(pid)
    assert participant.missed_visits == ["week6"]
    keyed = participant.completed_visits()["end_of_treatment"]["event_id"]

    send(isolated, c.CorrectData(pid, {"event_id": keyed, "field": "visit",
                                       "value": "week6"}), reason="keyed under wrong visit")
    participant = isolated.service.get_participant(pid)
    assert participant.missed_visits == []
    visits = participant_state(participant, isolated.protocol, day(50))["visits"]
    assert {v["code"]: v["status"] for v in visits}["week6"] == "completed"
    cause = f"a correction moved the data of the visit held on {day(44)} here"
    entries = history(isolated.service, pid, veil=str)
    assert [e["type"] for e in entries[-3:]] == ["DataCorrected", "VisitMissedRetracted",
                                                 "DeviationResolved"]
    assert entries[-2]["data"] == {"visit": "week6", "cause": cause}
    assert entries[-1]["data"]["resolution"] == f"missed mark retracted: {cause}"
    assert [d["status"] for d in participant.deviations.values()
            if d["code"] == "visit_missed"] == ["resolved"]
    at_noon(isolated, 51)  # held: the scan marks it no more
    TrialProjection(isolated).catch_up()
    assert scan_clock(isolated, isolated.ended_everywhere())["missed"] == 0
    assert isolated.service.get_participant(pid).missed_visits == []


def test_a_visit_recorded_after_its_missed_mark_retracts_the_mark_once(isolated):
    """Week 6, held on day 44, was entered on day 55, after the scan marked it missed: the
    record said it was both missed and held (and an unrelated visit-code correction
    later retracted the mark saying data had been moved there)."""
    from infrastructure.audit.history import history

    pid = enrol(isolated)
    send(isolated, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": day(0)}))
    at_noon(isolated, 50)
    TrialProjection(isolated).catch_up()
    scan_clock(isolated, isolated.ended_everywhere())
    at_noon(isolated, 55)
    send(isolated, c.CompleteVisit(pid, {"visit": "week6", "completed_on": day(44)}))
    participant = isolated.service.get_participant(pid)
    assert participant.missed_visits == []
    cause = f"the visit held on {day(44)} was recorded after the mark"
    entries = history(isolated.service, pid, veil=str)
    assert [e["type"] for e in entries[-3:]] == ["VisitCompleted", "VisitMissedRetracted",
                                                 "DeviationResolved"]
    assert entries[-2]["data"] == {"visit": "week6", "cause": cause}
    send(isolated, c.CompleteVisit(pid, {"visit": "end_of_treatment",
                                         "completed_on": day(50)}))
    keyed = isolated.service.get_participant(pid).completed_visits()["end_of_treatment"]
    send(isolated, c.CorrectData(pid, {"event_id": keyed["event_id"], "field": "visit",
                                       "value": "follow_up"}), reason="wrong visit")
    types = [e["type"] for e in history(isolated.service, pid, veil=str)]
    assert types[-2:] == ["DataCorrected", "StudyCompletionReassessed"]
    assert types.count("VisitMissedRetracted") == 1  # nothing retracted again


def test_a_miss_the_corrected_registration_date_keeps_closed_stays(isolated):
    """Registration corrected to an earlier day: week 6 closed even sooner; the mark
    holds."""
    pid = enrol(isolated)
    at_noon(isolated, 50)
    TrialProjection(isolated).catch_up()
    scan_clock(isolated, isolated.ended_everywhere())
    participant = isolated.service.get_participant(pid)
    assert "week6" in participant.missed_visits
    send(isolated, c.CorrectData(pid, {"event_id": participant.registration_event,
                                       "field": "registered_on", "value": day(-1).isoformat()}),
         reason="registration date mistyped")
    assert "week6" in isolated.service.get_participant(pid).missed_visits


def test_a_correction_corrected_back_marks_and_flags_the_visit_again(isolated):
    """Registration moved 10 days later (the mark retracted), then back: the window closed
    after all. The scan's command for the mark was the first one's again, answered as a
    replay: nothing written, the visit left overdue for ever (and the casebook unsignable)."""
    pid = enrol(isolated)
    send(isolated, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": day(0)}))
    at_noon(isolated, 50)
    TrialProjection(isolated).catch_up()
    scan_clock(isolated, isolated.ended_everywhere())
    registration = isolated.service.get_participant(pid).registration_event
    for registered in (day(10), day(0)):
        send(isolated, c.CorrectData(pid, {"event_id": registration, "field": "registered_on",
                                           "value": registered.isoformat()}), reason="typo")
    assert isolated.service.get_participant(pid).missed_visits == []
    at_noon(isolated, 51)
    TrialProjection(isolated).catch_up()
    assert scan_clock(isolated, isolated.ended_everywhere())["missed"] == 1
    participant = isolated.service.get_participant(pid)
    assert participant.missed_visits == ["week6"]
    assert [d["status"] for d in participant.deviations.values()
            if d["code"] == "visit_missed"] == ["resolved", "open"]


def test_a_correction_that_would_retract_a_locked_visit_s_mark_is_refused(isolated):
    """The mark is the locked visit's record: the correction retracted it (and resolved
    its deviation) inside the lock."""
    from domain.errors import Locked

    pid = enrol(isolated)
    at_noon(isolated, 50)
    TrialProjection(isolated).catch_up()
    scan_clock(isolated, isolated.ended_everywhere())
    send(isolated, c.LockVisit(pid, {"visit": "week6"}), actor="dm")
    registration = isolated.service.get_participant(pid).registration_event
    version = isolated.service.get_participant(pid).version
    with pytest.raises(Locked, match="visit week6"):
        send(isolated, c.CorrectData(pid, {"event_id": registration, "field": "registered_on",
                                           "value": day(10).isoformat()}), reason="typo")
    participant = isolated.service.get_participant(pid)
    assert participant.version == version and "week6" in participant.missed_visits


def scanned_then(t, pid: str, meanwhile):
    """The clock scan, with ``meanwhile`` committed just after it reads ``pid``'s record:
    its counts, and the record it read."""
    read = t.service.get_participant
    scanned = []

    def read_then(participant_id, *args, **kwargs):
        participant = read(participant_id, *args, **kwargs)
        if participant_id == pid and not scanned:
            scanned.append(participant)
            meanwhile()
        return participant

    t.service.get_participant = read_then
    try:
        return scan_clock(t, t.ended_everywhere()), scanned
    finally:
        del t.service.get_participant


def test_a_casebook_locked_after_the_scan_read_it_gets_no_mark_and_nobody_is_set_aside(
        isolated):
    """The scan read the record, then a data manager locked the casebook: the mark would
    change the locked record. It is refused (409 locked, as every change of its data), the
    scan moves on without setting the participant aside, and marks the visit once the
    casebook is unlocked."""
    from domain.errors import Locked

    pid = enrol(isolated)
    send(isolated, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": day(0)}))
    at_noon(isolated, 50)
    TrialProjection(isolated).catch_up()
    read = isolated.service.get_participant
    counts, scanned = scanned_then(isolated, pid, lambda: send(
        isolated, c.LockCasebook(pid, {}), actor="dm"))
    participant = read(pid)
    assert not scanned[0].locks and "casebook" in participant.locks  # the race
    assert (counts["quarantined"], participant.missed_visits) == (0, [])
    with pytest.raises(Locked, match="casebook"):
        send(isolated, c.RecordVisitMissed(pid, {"visit": "week6"}), actor="deviation-monitor")
    send(isolated, c.UnlockCasebook(pid, {}), actor="dm", reason="checked")
    TrialProjection(isolated).catch_up()
    scan_clock(isolated, isolated.ended_everywhere())
    assert read(pid).missed_visits == ["week6"]


def test_a_database_locked_after_the_scan_began_gets_no_mark_and_nobody_is_set_aside(
        isolated):
    """The scan checks the database lock as it begins; a lock committed after that let its
    marks through (a mark was no data command to the bus's check of the lock)."""
    import uuid

    pid = enrol(isolated)
    send(isolated, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": day(0)}))
    at_noon(isolated, 50)
    TrialProjection(isolated).catch_up()
    read = isolated.service.get_participant
    counts, scanned = scanned_then(isolated, pid, lambda: isolated.bus.dispatch_trial(
        "LockDatabase", command_id=str(uuid.uuid4()), actor="dm", reason="interim analysis"))
    assert scanned and (counts["quarantined"], read(pid).missed_visits) == (0, [])
    isolated.bus.dispatch_trial("UnlockDatabase", command_id=str(uuid.uuid4()), actor="dm",
                                reason="analysis done")
    TrialProjection(isolated).catch_up()
    scan_clock(isolated, isolated.ended_everywhere())
    assert read(pid).missed_visits == ["week6"]


def test_a_mark_for_a_window_open_again_by_the_time_it_is_written_writes_nothing(isolated):
    """The scan read the record, then a correction moved the window: its command found the
    visit missed on a record that no longer says so."""
    pid = enrol(isolated)
    at_noon(isolated, 50)
    registration = isolated.service.get_participant(pid).registration_event
    send(isolated, c.CorrectData(pid, {"event_id": registration, "field": "registered_on",
                                       "value": day(10).isoformat()}), reason="typo")
    version = isolated.service.get_participant(pid).version
    send(isolated, c.RecordVisitMissed(pid, {"visit": "week6"}), actor="deviation-monitor")
    assert isolated.service.get_participant(pid).version == version


def test_a_mark_for_a_window_that_closed_after_a_withdrawal_recorded_meanwhile_writes_nothing(
        isolated):
    """The scan read the record, then a withdrawal dated before the window's end was
    recorded: a visit after the participant left is cancelled, never missed."""
    pid = enrol(isolated)
    at_noon(isolated, 50)
    send(isolated, c.WithdrawParticipant(pid, {"withdrawn_on": day(20), "scope": "study",
                                               "reason_code": "moved"}))
    version = isolated.service.get_participant(pid).version
    send(isolated, c.RecordVisitMissed(pid, {"visit": "week6"}), actor="deviation-monitor")
    participant = isolated.service.get_participant(pid)
    assert (participant.version, participant.missed_visits) == (version, [])


def test_a_mark_that_wrote_nothing_for_a_withdrawal_since_corrected_is_made_later(isolated):
    """The scan read the record; a withdrawal dated before the window's end was recorded
    meanwhile, so its command wrote nothing; the withdrawal was then corrected to after
    the window's end. The scan's next command had the same id as the first, and was
    answered as its replay: the visit never marked, the casebook never signable."""
    from infrastructure.audit.history import history

    pid = enrol(isolated)
    send(isolated, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": day(0)}))
    at_noon(isolated, 50)
    TrialProjection(isolated).catch_up()
    dispatch = isolated.bus.dispatch
    withdrawals = []

    def withdrawn_meanwhile(command, **kwargs):
        if isinstance(command, c.RecordVisitMissed) and not withdrawals:
            withdrawals.append(send(isolated, c.WithdrawParticipant(
                pid, {"withdrawn_on": day(20), "scope": "study", "reason_code": "moved"})))
        return dispatch(command, **kwargs)

    isolated.bus.dispatch = withdrawn_meanwhile
    try:
        scan_clock(isolated, isolated.ended_everywhere())
    finally:
        isolated.bus.dispatch = dispatch
    assert withdrawals and isolated.service.get_participant(pid).missed_visits == []
    withdrawal = next(e for e in history(isolated.service, pid, veil=str)
                      if e["type"] == "ParticipantWithdrawn")
    send(isolated, c.CorrectData(pid, {"event_id": withdrawal["event_id"],
                                       "field": "withdrawn_on",
                                       "value": day(50).isoformat()}), reason="typo")
    TrialProjection(isolated).catch_up()
    scan_clock(isolated, isolated.ended_everywhere())
    assert isolated.service.get_participant(pid).missed_visits == ["week6"]


def test_a_withdrawn_participant_s_row_from_before_its_day_was_kept_is_looked_at(isolated):
    """Rows written before migration 0022 hold no withdrawal day: they were never looked
    at, and a window closed before the withdrawal stayed unmarked for ever."""
    from sqlalchemy import update

    from infrastructure.store.tables import participants

    pid = enrol(isolated)
    send(isolated, c.WithdrawParticipant(pid, {"withdrawn_on": day(60), "scope": "study",
                                               "reason_code": "moved"}))
    TrialProjection(isolated).catch_up()
    with isolated.engine.begin() as connection:  # as the migration leaves an older row
        connection.execute(update(participants).where(participants.c.participant_id == pid)
                           .values(left_on=None))
    scan_clock(isolated, day(61))
    assert "week6" in isolated.service.get_participant(pid).missed_visits


def test_a_mark_that_wrote_nothing_does_not_keep_the_visit_from_being_marked_later(
        isolated, monkeypatch):
    """The scan read the record (week 6 closed), then a correction moved the window before
    its command was written: the command wrote nothing, but its record kept its id, and
    the scan sent that id again when the new window closed: a replay, nothing written,
    the visit never marked."""
    pid = enrol(isolated)
    send(isolated, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": day(0)}))
    registration = isolated.service.get_participant(pid).registration_event
    at_noon(isolated, 50)
    TrialProjection(isolated).catch_up()
    dispatch = isolated.bus.dispatch

    def corrected_first(command, **kwargs):
        if isinstance(command, c.RecordVisitMissed):
            monkeypatch.setattr(isolated.bus, "dispatch", dispatch)
            send(isolated, c.CorrectData(pid, {"event_id": registration,
                                               "field": "registered_on",
                                               "value": day(10).isoformat()}), reason="typo")
        return dispatch(command, **kwargs)

    monkeypatch.setattr(isolated.bus, "dispatch", corrected_first)
    scan_clock(isolated, isolated.ended_everywhere())
    assert isolated.service.get_participant(pid).missed_visits == []  # open again

    at_noon(isolated, 60)  # the new window ended on day 59, unvisited
    TrialProjection(isolated).catch_up()
    scan_clock(isolated, isolated.ended_everywhere())
    assert isolated.service.get_participant(pid).missed_visits == ["week6"]
