"""The deviation monitor: event-driven rules run as events arrive (a follower of the
notification log whose flags commit with its position), clock-driven rules from a scan."""

from __future__ import annotations

from datetime import date
from typing import Any

from sqlalchemy import exists, or_, select
from sqlalchemy.orm import Session

from domain import commands as c
from domain.deviations import CLOCK_DRIVEN, RULES, detect
from domain.errors import DatabaseLocked, Locked
from domain.management import CASEBOOK
from domain.participant import Participant, participant_uuid
from domain.schedule import window_ends
from infrastructure.readside.projections import LogFollower
from infrastructure.readside.quarantine import quarantined_ids, release, set_aside
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.outages import is_unavailable
from infrastructure.store.tables import participants, visits

ACTOR = "deviation-monitor"
SCAN = "deviation_scan"  # the clock-driven rules' quarantine, apart from the follower's
EVENT_DRIVEN = tuple(code for code in RULES if code not in CLOCK_DRIVEN)
# Events the monitor writes or that can't change what a rule decides.
QUIET = frozenset({"DeviationFlagged", "DeviationResolved", "ReminderSent", "VisitMissed",
                   "VisitMissedRetracted"})


def flag(t: Trialog, participant: Participant, today: date,
         codes: tuple[str, ...] = tuple(RULES)) -> list[str]:
    """Flags each deviation the record shows that is not flagged yet; their codes."""
    flagged = []
    for finding in detect(participant, t.protocol, today, codes):
        deviation_id = finding.deviation_id(participant)
        t.bus.dispatch(
            c.FlagDeviation(participant.participant_id, {
                "deviation_id": deviation_id, "code": finding.code,
                "severity": finding.severity, "evidence": list(finding.evidence),
                "detail": finding.detail}),
            command_id=t.derived_command_id("flag", deviation_id), actor=ACTOR,
        )
        flagged.append(finding.code)
    return flagged


class DeviationMonitor(LogFollower):
    """Runs the event-driven rules for each participant a batch of events touched; the
    flags join the batch's transaction, so they and the position commit together."""

    name = "deviation_monitor"

    def evaluates(self, event: Any) -> bool:
        return type(event).__name__ not in QUIET

    def apply(self, session: Session, batch: list[tuple[int, Any]]) -> None:
        touched = {event.originator_id for _, event in batch if self.evaluates(event)}
        for originator_id in touched:
            participant: Participant = self.service.repository.get(originator_id)
            flag(self.trialog, participant, self.trialog.ended_everywhere(), EVENT_DRIVEN)


def scan_clock(t: Trialog, today: date) -> dict[str, int]:
    """The clock-driven rules over every participant still in the study, and every one who
    left it or completed it with a window closed and neither done nor marked missed (one
    that closed before a withdrawal, or skipped before the last visit): a closed window
    with no visit is recorded as missed and flagged; poor adherence is flagged. ``today``
    is the earliest date anywhere (``Trialog.ended_everywhere``). None while the database
    is locked: the record is frozen for analysis, and what the clock finds then is found
    once it is unlocked."""
    counts = {"participants": 0, "missed": 0, "flagged": 0, "quarantined": 0}
    database = t.service.database()
    if database is not None and database.locked:
        return {**counts, "database_locked": True}

    def unmarked(*closed: Any) -> Any:
        return exists().where(visits.c.participant_id == participants.c.participant_id,
                              visits.c.window_end < today, *closed,
                              visits.c.completed_on.is_(None), visits.c.missed.is_(False))

    with t.engine.connect() as connection:
        ids = list(connection.execute(select(participants.c.participant_id).where(or_(
            participants.c.status.in_(("randomized", "off_treatment")),
            (participants.c.status == "completed") & unmarked(),
            # A window closing after the withdrawal is cancelled, never missed (a row
            # written before the day was kept, with none, is looked at until rewritten).
            (participants.c.status == "withdrawn") & unmarked(
                participants.c.left_on.is_(None)
                | (visits.c.window_end < participants.c.left_on))))).scalars())
    counts["participants"] = len(ids)
    with t.engine.connect() as connection:
        held = quarantined_ids(connection, SCAN)
    for participant_id in ids:
        key = participant_uuid(participant_id)
        try:
            _scan_one(t, participant_id, today, counts)
        except Exception as error:
            if is_unavailable(error):
                raise
            counts["quarantined"] += 1
            with t.service.recorder.transaction(commit=True) as session:  # type: ignore
                set_aside(session, SCAN, key, participant_id, None, None, error)
        else:
            if str(key) in held:
                with t.service.recorder.transaction(commit=True) as session:  # type: ignore
                    release(session, SCAN, {key})
    return counts


def _scan_one(t: Trialog, participant_id: str, today: date, counts: dict[str, int]) -> None:
    participant = t.service.get_participant(participant_id)
    if CASEBOOK in participant.locks:  # frozen, as a locked database is: found once unlocked
        return
    # The visits to mark missed: not those marked (a mark retracted when the registration
    # date moved is made again if the new window closes unvisited).
    missed = [finding for finding in RULES["visit_missed"](participant, t.protocol, today)
              if finding.key not in participant.missed_visits]
    ends = window_ends(t.protocol, participant.registered_on) if missed else {}
    for marked, finding in enumerate(missed):
        # One command per mark: a mark retracted (the registration date corrected) is made
        # again by a command of its own (its generation), and so is one whose command
        # wrote nothing, its window open again by then (its window's end) or the
        # participant withdrawn before it closed by then (the withdrawal's day, which a
        # correction may move after it).
        left_on = participant.withdrawn_on("study")
        try:
            t.bus.dispatch(c.RecordVisitMissed(participant_id, {"visit": finding.key}),
                           command_id=t.derived_command_id(
                               "missed", str(participant.id), finding.key,
                               str(finding.generation), ends[finding.key].isoformat(),
                               left_on.isoformat() if left_on else ""),
                           actor=ACTOR)
        except (Locked, DatabaseLocked):  # locked since the record was read: found once
            # unlocked, as above
            counts["missed"] += marked
            return
    if missed:
        counts["missed"] += len(missed)
        participant = t.service.get_participant(participant_id)
    counts["flagged"] += len(flag(t, participant, today, CLOCK_DRIVEN))
