"""The trial's flow as CONSORT 2025 draws it, counted from the events as recorded up to a
moment: assessed for eligibility, excluded (failed criteria counted, withdrawals before
randomization by reason), randomized, allocated per arm, received the allocation,
discontinued the intervention or left the study (by reason), analysed; and enrolment by
site over time.

Only the events that decide these facts are read (screenings, randomizations,
withdrawals, completed visits, corrections), stream by stream; of the doses, which are
most of a record, each randomized participant's first few only (read on while none of
them was taken). A participant whose record was corrected is
replayed through the aggregate, so that a corrected screening counts as it now stands. A
participant with an event the store can't give (a damaged or altered row) is counted as
assessed and as unreadable, in no other box, and stops no one else's count.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from domain.access import Scope
from domain.chain import canonical_json
from domain.participant import Participant
from infrastructure.audit.history import participant_as_of
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.outages import is_unavailable, the_databases
from infrastructure.store.stored import (
    PARTICIPANT_TOPIC,
    Upcast,
    as_bytes,
    decode,
    events_table,
    replayed,
)
from infrastructure.store.stored import plain_state as _plain_state

SCREENINGS = ("ParticipantScreened", "ParticipantRescreened")
READ = (*SCREENINGS, "ParticipantRandomized", "ParticipantWithdrawn", "VisitCompleted",
        "DataCorrected")
DOSE = PARTICIPANT_TOPIC + "DoseRecorded"
FIRST_DOSES = 3
log = logging.getLogger("trialog.consort")


@dataclass
class Course:
    """What the flow needs to know of one participant."""

    participant_id: str
    site_id: str
    eligible: bool = False
    failed_criteria: list[str] = field(default_factory=list)
    arm: str | None = None
    registered_on: str | None = None
    withdrawn: dict[str, tuple[str, bool]] = field(default_factory=dict)  # scope -> reason,
    # and whether it came after randomization
    dose_taken: bool = False
    primary_done: bool = False
    corrected: bool = False
    unreadable: bool = False  # an event the store can't give, or the rules can't apply


def _plain(t: Trialog, row: Any) -> dict[str, Any]:
    state = as_bytes(row.state)
    try:
        return _plain_state(t.service.mapper, state, row.topic)
    except Upcast:
        event = decode(t.service.mapper, row.originator_id, row.originator_version,
                       row.topic, state)
        return dict(json.loads(canonical_json(vars(event))))


def _readable(t: Trialog, row: Any) -> dict[str, Any] | None:
    """A row's content; None when the store can't give it (a damaged or altered row)."""
    try:
        return _plain(t, row)
    except Exception as error:
        if is_unavailable(error):
            raise
        log.warning("event %s of stream %s can't be read; its participant is counted as "
                    "unreadable", row.originator_version, row.originator_id)
        return None


def _moment(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


class _Fold:
    """Folds one participant's rows into a Course, stopping at ``as_of``."""

    def __init__(self, t: Trialog, as_of: datetime | None) -> None:
        self.t, self.as_of = t, as_of
        self.course: Course | None = None
        self.past_moment = False
        self.unreadable = False

    def row(self, row: Any) -> None:
        name = row.topic.rsplit(".", 1)[-1]
        course = self.course
        if self.past_moment or self.unreadable:
            return
        content = _readable(self.t, row)
        if content is None:
            self.unreadable = True
            return
        if self.as_of is not None and _moment(content["timestamp"]) > self.as_of:
            self.past_moment = True  # a stream's events are recorded in version order
            return
        data = content.get("data") or {}
        if name in SCREENINGS:
            if course is None:
                course = self.course = Course(content.get("participant_id", ""),
                                              data["site_id"])
            course.eligible = bool(content["eligible"])
            course.failed_criteria = list(content["failed_criteria"])
        elif course is None:
            return
        elif name == "ParticipantRandomized":
            course.arm, course.registered_on = content["arm"], data["registered_on"]
        elif name == "ParticipantWithdrawn":
            course.withdrawn[data["scope"]] = (data["reason_code"], course.arm is not None)
        elif name == "VisitCompleted":
            if data.get("visit") == self.t.protocol.treatment_ends_at:
                course.primary_done = _has_primary(data)
        elif name == "DataCorrected":
            course.corrected = True


def _has_primary(data: dict[str, Any]) -> bool:
    """The primary endpoint: BPI average pain at the end of treatment."""
    bpi = data.get("bpi_sf") or {}
    return isinstance(bpi, dict) and bpi.get("average") is not None


def _replayed(t: Trialog, course: Course, as_of: datetime | None) -> Course:
    """A corrected record's facts from the aggregate, as its records now stand; one that
    can't be replayed (an event the store can't give, or the rules can't apply) is
    unreadable."""
    p: Participant | None
    try:
        if as_of is None:
            p = replayed(t.service, course.participant_id)
        else:
            p = participant_as_of(t.service, course.participant_id, as_of)
    except Exception as error:
        if the_databases(error):
            raise
        log.warning("participant %s can't be replayed; counted as unreadable",
                    course.participant_id)
        course.unreadable = True
        return course
    if p is None:
        return course
    eligible, failed = p.eligibility_now(t.protocol)
    withdrawn = {}
    registration = p.registration_record or 0
    for scope, version in p.withdrawals.items():
        withdrawn[scope] = (p.data_of(version)["reason_code"],
                            bool(registration) and version > registration)
    primary = p.completed_visits().get(t.protocol.treatment_ends_at)
    registered_on = p.registered_on
    return Course(
        course.participant_id, p.site_id, eligible, list(failed), p.arm,
        registered_on.isoformat() if registered_on else None, withdrawn,
        any(d.get("taken") for _, d in p.records_of("DoseRecorded")),
        primary is not None and _has_primary(primary), True)


def courses(t: Trialog, scope: Scope, as_of: datetime | None = None) -> list[Course]:
    """Every participant of the scope's sites screened at or before ``as_of``."""
    table = events_table(t.service.recorder)
    query = (select(table.c.originator_id, table.c.originator_version, table.c.topic,
                    table.c.state)
             .where(table.c.topic.in_([PARTICIPANT_TOPIC + name for name in READ]))
             .order_by(table.c.originator_id, table.c.originator_version))
    found: list[Course] = []
    randomized: dict[Any, Course] = {}
    fold: _Fold | None = None
    stream = None

    def finish() -> None:
        if fold is not None and fold.unreadable:
            # A first event unreadable leaves its id and site unknown: for every site only.
            course = fold.course or Course("", "")
            if scope.admits(course.site_id) if fold.course else scope.every_site:
                course.unreadable = True
                found.append(course)
        elif fold is not None and fold.course is not None and scope.admits(fold.course.site_id):
            course = fold.course
            found.append(_replayed(t, course, as_of) if course.corrected else course)
            if course.arm is not None and not course.corrected:
                randomized[stream] = course

    with t.engine.connect() as connection:
        for row in connection.execution_options(yield_per=2000).execute(query):
            if row.originator_id != stream:
                finish()
                stream, fold = row.originator_id, _Fold(t, as_of)
            assert fold is not None
            fold.row(row)
    finish()
    _doses_taken(t, randomized, as_of)
    return sorted(found, key=lambda c: c.participant_id)


def _dose(t: Trialog, row: Any, as_of: datetime | None, course: Course) -> bool | None:
    """Whether a dose row was taken; None when it was recorded after ``as_of`` (and so
    was every later one), or can't be read (``course`` is then unreadable)."""
    content = _readable(t, row)
    if content is None:
        course.unreadable = True
        return None
    if as_of is not None and _moment(content["timestamp"]) > as_of:
        return None
    return bool((content.get("data") or {}).get("taken"))


def _doses_taken(t: Trialog, courses_by_stream: dict[Any, Course],
                 as_of: datetime | None) -> None:
    """Sets ``dose_taken`` of randomized participants: their first FIRST_DOSES doses are
    read (a first dose is nearly always taken); where none of those was, the rest."""
    if not courses_by_stream:
        return
    table = events_table(t.service.recorder)
    number = func.row_number().over(partition_by=table.c.originator_id,
                                    order_by=table.c.originator_version).label("n")
    ranked = select(table.c.originator_id, table.c.originator_version, table.c.topic,
                    table.c.state, number).where(table.c.topic == DOSE).subquery()
    first = (select(ranked).where(ranked.c.n <= FIRST_DOSES)
             .order_by(ranked.c.originator_id, ranked.c.originator_version))
    undecided: dict[Any, int] = {}  # stream -> the last version read
    with t.engine.connect() as connection:
        done: set[Any] = set()
        for row in connection.execute(first):
            course = courses_by_stream.get(row.originator_id)
            if course is None or row.originator_id in done:
                continue
            taken = _dose(t, row, as_of, course)
            if taken is None or taken:
                course.dose_taken = bool(taken)
                done.add(row.originator_id)
            elif row.n == FIRST_DOSES:
                undecided[row.originator_id] = row.originator_version
        for stream, after in undecided.items():
            rest = connection.execute(
                select(table.c.originator_id, table.c.originator_version, table.c.topic,
                       table.c.state)
                .where(table.c.originator_id == stream, table.c.topic == DOSE,
                       table.c.originator_version > after)
                .order_by(table.c.originator_version))
            for row in rest:
                taken = _dose(t, row, as_of, courses_by_stream[stream])
                if taken is None or taken:
                    courses_by_stream[stream].dose_taken = bool(taken)
                    break


def _reasons(counter: Counter[str]) -> dict[str, Any]:
    return {"total": sum(counter.values()), "reasons": dict(sorted(counter.items()))}


def consort(t: Trialog, scope: Scope, as_of: datetime | None = None) -> dict[str, Any]:
    """The CONSORT counts of the scope's participants as recorded at ``as_of``."""
    return consort_counts(t, courses(t, scope, as_of), as_of)


def consort_counts(t: Trialog, flow: list[Course], as_of: datetime | None) -> dict[str, Any]:
    """The CONSORT counts of participants' courses (see ``courses``)."""
    failed: Counter[str] = Counter()
    before: Counter[str] = Counter()
    not_eligible = awaiting = 0
    unreadable = sorted(c.participant_id for c in flow if c.unreadable)
    assessed, flow = len(flow), [c for c in flow if not c.unreadable]
    arms: dict[str, dict[str, Any]] = {}
    for arm in t.protocol.arms:
        arms[arm.code] = {"name": arm.name, "allocated": 0, "received": 0,
                          "not_received": 0, "discontinued": Counter(),
                          "left_study": Counter(), "analysed": 0, "not_analysed": 0}
    for c in flow:
        if c.arm is None:
            if not c.eligible:
                not_eligible += 1
                failed.update(c.failed_criteria)
            elif "study" in c.withdrawn:
                before[c.withdrawn["study"][0]] += 1
            else:
                awaiting += 1
            continue
        counts = arms[c.arm]
        counts["allocated"] += 1
        # An arm given the product received it once a dose was taken; an arm given none
        # received its allocation unless a dose was taken all the same.
        received = c.dose_taken == t.protocol.arm(c.arm).receives_dose
        counts["received" if received else "not_received"] += 1
        for scope_name, key in (("treatment", "discontinued"), ("study", "left_study")):
            if scope_name in c.withdrawn and c.withdrawn[scope_name][1]:
                counts[key][c.withdrawn[scope_name][0]] += 1
        counts["analysed" if c.primary_done else "not_analysed"] += 1
    for counts in arms.values():
        counts["discontinued"] = _reasons(counts["discontinued"])
        counts["left_study"] = _reasons(counts["left_study"])
    excluded = not_eligible + sum(before.values())
    return {
        "as_of": as_of.isoformat() if as_of is not None else None,
        "assessed": assessed,
        "excluded": {"total": excluded, "not_eligible": not_eligible,
                     "failed_criteria": dict(sorted(failed.items(), key=lambda i: (-i[1], i[0]))),
                     "withdrew_before_randomization": _reasons(before)},
        "awaiting_randomization": awaiting,
        "randomized": sum(a["allocated"] for a in arms.values()),
        "arms": arms,
        "primary_endpoint_visit": t.protocol.treatment_ends_at,
        # Assessed, in no other box: the id of one whose first event can't be read unknown.
        "unreadable": {"total": len(unreadable), "participants": [p for p in unreadable if p]},
    }


def enrolment(flow: list[Course]) -> dict[str, list[tuple[str, int]]]:
    """Participants randomized by site and month of registration, cumulative: for each
    site, (month, total randomized by the end of that month), every month from the first
    to the last."""
    by_site: dict[str, Counter[str]] = defaultdict(Counter)
    for c in flow:
        if c.arm is not None and c.registered_on and not c.unreadable:
            by_site[c.site_id][c.registered_on[:7]] += 1
    months = sorted({m for counter in by_site.values() for m in counter})
    if not months:
        return {}
    span = _month_range(months[0], months[-1])
    series = {}
    for site in sorted(by_site):
        total, points = 0, []
        for month in span:
            total += by_site[site][month]
            points.append((month, total))
        series[site] = points
    return series


def _month_range(first: str, last: str) -> list[str]:
    year, month = int(first[:4]), int(first[5:7])
    months = []
    while f"{year:04d}-{month:02d}" <= last:
        months.append(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return months
