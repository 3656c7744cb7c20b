"""The visit schedule: each visit's target day and window, from the registration date, and
the days its reminders are due."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from uuid import UUID, uuid5

from domain.protocol import Protocol, ReminderOffset, Visit

# The date furthest behind UTC anywhere (Baker Island's, UTC-12).
EARLIEST_ZONE = timedelta(hours=12)


def ended_everywhere(now: datetime) -> date:
    """The earliest date anywhere at ``now`` (UTC-12): every day before it has ended at
    every site, wherever it is. A window that closed before it closed for every site; the
    clock's rules (a visit missed, doses missed) judge by it, never by the UTC date, which
    would close a window while a site west of UTC is still in its last day."""
    return (now.astimezone(UTC) - EARLIEST_ZONE).date()


@dataclass(frozen=True)
class ScheduledVisit:
    code: str
    target: date
    window_start: date
    window_end: date

    def in_window(self, day: date) -> bool:
        return self.window_start <= day <= self.window_end


def scheduled_visit(visit: Visit, registered_on: date) -> ScheduledVisit:
    """Target = registration + target day; window = target - before .. target + after."""
    target = registered_on + timedelta(days=visit.target_day)
    return ScheduledVisit(
        code=visit.code,
        target=target,
        window_start=target - timedelta(days=visit.window_before),
        window_end=target + timedelta(days=visit.window_after),
    )


def schedule(protocol: Protocol, registered_on: date) -> list[ScheduledVisit]:
    return [scheduled_visit(v, registered_on) for v in protocol.visits]


def window_ends(protocol: Protocol, registered_on: date | None) -> dict[str, date]:
    """Each visit's last day, by code, as a registration on ``registered_on`` schedules it
    (none before a registration)."""
    if registered_on is None:
        return {}
    return {v.code: v.window_end for v in schedule(protocol, registered_on)}


def visit_status(
    visit: ScheduledVisit, completed_on: date | None, missed: bool, today: date,
    left_study_on: date | None = None,
) -> str:
    """completed | missed | cancelled (the participant left the study before the window
    closed) | open (window open today) | upcoming | overdue (window closed, not yet marked
    missed). ``today`` is the participant's site's day (``Protocol.day_at``): the clock
    scan marks a visit missed only once its last day has ended everywhere, so a visit is
    overdue at its site for those hours."""
    if completed_on is not None:
        return "completed"
    if missed:
        return "missed"
    if left_study_on is not None and visit.window_end >= left_study_on:
        return "cancelled"
    if today < visit.window_start:
        return "upcoming"
    if today <= visit.window_end:
        return "open"
    return "overdue"


def reminder_due(visit: ScheduledVisit, offset: ReminderOffset) -> date:
    """The day a reminder is due: ``days`` after the target day or the window's first day."""
    anchor = visit.target if offset.relative_to == "target" else visit.window_start
    return anchor + timedelta(days=offset.days)


def reminder_id(participant_uuid: UUID, visit: str, kind: str) -> str:
    """One reminder per participant, visit and kind: the outbox's key."""
    return str(uuid5(participant_uuid, f"reminder:{visit}:{kind}"))
