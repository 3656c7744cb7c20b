"""Projection rebuild throughput beside the library's own ProjectionRunner."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

from eventsourcing.persistence import Tracking
from eventsourcing.projection import Projection, ProjectionRunner
from eventsourcing_sqlalchemy.recorders import SQLAlchemyTrackingRecorder
from sqlalchemy import delete, insert

from domain.commands import Audit
from domain.participant import Participant
from domain.randomization import AllocationSequence
from domain.service import TrialService
from infrastructure.readside.projections import TrialProjection, read_model_rows
from infrastructure.store.bootstrap import Trialog, event_store_env
from infrastructure.store.tables import participants
from tests.factories import consent, screening

# Long records start early enough that a dose a day for 500 days is all in the past (a
# dose dated after today is refused).
REGISTERED = date(2024, 3, 4)


def early_screening() -> dict[str, Any]:
    """A screening two years before the tests' one, every date moved alike."""
    data = screening()
    data["screened_on"] = date(2024, 3, 1)
    data["eligibility"]["aromatase_inhibitor"]["started_on"] = date(2024, 1, 2)
    data["eligibility"]["analgesics"] = [{"drug": "gabapentin",
                                          "stable_since": date(2023, 12, 1)}]
    return data


def early_consent() -> dict[str, Any]:
    return consent(signed_on=date(2024, 3, 2))


def _audit() -> Audit:
    return Audit(command_id=str(uuid.uuid4()), actor="bench", recorded_at=datetime.now(UTC))


def seed_participants(t: Trialog, participants: int, events_each: int) -> list[str]:
    """Saves ``participants`` participants of ``events_each`` events, 20 per save, in a
    store with no allocation sequence yet; their ids."""
    sequence = AllocationSequence.open(t.protocol.study_id, "CASE", _audit())
    group: list[Any] = []
    ids = []
    for _ in range(participants):
        ids.append(f"CASE-{uuid.uuid4().hex[:12]}")
        p = Participant.screen(ids[-1], early_screening(), t.protocol, _audit())
        p.record_consent(early_consent(), _audit())
        p.randomize({"registered_on": REGISTERED}, sequence, t.service.allocation_seed,
                    t.protocol, _audit())
        for day in range(events_each - 3):
            p.record_dose({"taken_on": REGISTERED + timedelta(days=day), "taken": True,
                           "dose_mcg": 1000}, _audit())
        group.append(p)
        if len(group) == 20:
            t.service.save(*group)
            group = []
    t.service.save(sequence, *group)
    return ids


def ours(t: Trialog) -> float:
    projection = TrialProjection(t, batch_size=5000)
    start = time.perf_counter()
    applied = projection.rebuild()
    return applied / (time.perf_counter() - start)


class LibraryView(SQLAlchemyTrackingRecorder):
    """The participant's read-model row with the library's tracking, one event per
    transaction (how its ProjectionRunner works). A lighter load than ours, which also
    writes the visit, score and deviation rows: the baseline is not handicapped."""

    def write(self, row: dict[str, Any], tracking: Tracking) -> None:
        with self.transaction(commit=True) as session:
            session.execute(delete(participants)
                            .where(participants.c.participant_id == row["participant_id"]))
            session.execute(insert(participants).values(**row))
            self._insert_tracking(session, tracking)


def library_runner(t: Trialog, events: int) -> float:
    """The library's ProjectionRunner over the first ``events`` events of the same store."""
    trialog = t

    class LibraryTrialProjection(Projection[LibraryView]):
        topics = ()

        def __init__(self, view: LibraryView) -> None:
            super().__init__(view)
            self.cache: dict[Any, Participant] = {}

        def process_event(self, domain_event: Any, tracking: Tracking) -> None:
            if not isinstance(domain_event, Participant.Event):
                self.view.insert_tracking(tracking)
                return
            before = self.cache.get(domain_event.originator_id)
            participant = domain_event.mutate(before)
            self.cache[participant.id] = participant
            rows = read_model_rows(participant, trialog, tracking.notification_id)
            self.view.write(next(row for table, row in rows if table is participants), tracking)

    class Service(TrialService):
        name = TrialService.name  # the same event store

        def __init__(self, env: Any = None) -> None:
            super().__init__(trialog.protocol, trialog.service.allocation_seed, env)

    env = event_store_env(t.settings)
    runner = ProjectionRunner(application_class=Service,
                              projection_class=LibraryTrialProjection,
                              view_class=LibraryView, env=env)
    start = time.perf_counter()
    with runner:
        runner.wait(events, timeout=900)
        elapsed = time.perf_counter() - start
    return events / elapsed
