"""Commands decided together: each sees what those before it decided, a refused one leaves
no trace, and one save writes them all in order; a participant another writer moved on
meanwhile makes the save conflict."""

import pytest
from eventsourcing.persistence import IntegrityError

from domain import commands as c
from domain.errors import DomainError
from domain.participant import participant_uuid
from domain.service import TrialService
from tests.factories import audit, consent, new_participant_id, protocol, screening


@pytest.fixture
def service():
    service = TrialService(protocol(), b"unit-seed")
    yield service
    service.close()


def test_each_command_sees_those_before_it_and_one_save_writes_them_in_order(service):
    first, second = new_participant_id(), new_participant_id()
    with service.together() as together:
        together.decide(c.ScreenParticipant(first, screening("CASE")), audit())
        together.decide(c.ScreenParticipant(second, screening("CASE")), audit())
        answer, events = together.decide(c.RecordConsent(first, consent()), audit())
        assert answer.version == 2 and [e.originator_version for e in events] == [2]
        assert not list(service.events.get(participant_uuid(first)))  # nothing saved yet
        positions = together.save()
    assert service.get_participant(first).version == 2  # and, outside, from the store
    assert service.get_participant(second).version == 1
    order = sorted(positions, key=positions.__getitem__)
    assert order == [(participant_uuid(first), 1), (participant_uuid(second), 1),
                     (participant_uuid(first), 2)]


def test_a_refused_command_leaves_no_trace_even_when_it_failed_half_way(service):
    pid = new_participant_id()

    def consent_then_fail(participant, command, at):
        participant.record_consent(command.data, at)  # an event, then a refusal
        raise DomainError("refused half way")

    with service.together() as together:
        together.decide(c.ScreenParticipant(pid, screening("CASE")), audit())
        service._handlers[c.RecordConsent] = consent_then_fail
        with pytest.raises(DomainError, match="half way"):
            together.decide(c.RecordConsent(pid, consent()), audit())
        del service._handlers[c.RecordConsent]
        service._handlers[c.RecordConsent] = service.record_consent
        answer, _ = together.decide(c.RecordConsent(pid, consent()), audit())
        assert answer.version == 2
        together.save()
    stored = service.get_participant(pid)
    assert stored.version == 2 and stored.status == "consented"
    assert [type(e).__name__ for e in service.events.get(participant_uuid(pid))] == [
        "ParticipantScreened", "ConsentRecorded"]


def test_a_stale_loaded_participant_conflicts_and_a_new_together_reads_the_store(service):
    pid = new_participant_id()
    service.execute(c.ScreenParticipant(pid, screening("CASE")), audit())
    stale = service.get_participant(pid)
    service.execute(c.RecordConsent(pid, consent()), audit())  # another writer
    with service.together([stale]) as together:
        together.decide(c.RecordConsent(pid, consent()), audit())
        with pytest.raises(IntegrityError):  # the bus decides everything again then
            together.save()
    with service.together() as together:
        answer, _ = together.decide(c.RecordConsent(pid, consent()), audit())
        together.save()
    assert answer.version == 3 and service.get_participant(pid).version == 3


def test_a_fault_inside_an_events_apply_leaves_the_next_commands_the_state_before_it(
        service, monkeypatch):
    """An event's apply that fails half way has changed the participant before the event
    is pending: the participant is still put back, so a randomization after the failed
    consent is refused as it would be without it, and nothing of the consent is saved."""
    from datetime import date

    from domain.participant import Participant

    pid = new_participant_id()
    with service.together() as together:
        together.decide(c.ScreenParticipant(pid, screening("CASE")), audit())
        together.save()
    absorbed = Participant.ConsentRecorded.absorb

    def absorb_then_fail(self, aggregate):
        absorbed(self, aggregate)  # the status changed, the event not yet pending
        raise RuntimeError("a fault in the program")

    with service.together() as together:
        monkeypatch.setattr(Participant.ConsentRecorded, "absorb", absorb_then_fail)
        with pytest.raises(RuntimeError):
            together.decide(c.RecordConsent(pid, consent()), audit())
        monkeypatch.undo()
        with pytest.raises(DomainError):
            together.decide(c.RandomizeParticipant(pid, {"registered_on": date(2026, 3, 4)}),
                            audit())
        together.save()
    stored = service.get_participant(pid)
    assert (stored.version, stored.status) == (1, "screened")


def test_the_repository_replays_what_the_library_s_projector_would(service):
    """The repository folds events with ``project`` (no per-event Protocol check): the
    same participant as the library's ``project_aggregate``, at every version asked."""
    from eventsourcing.application import project_aggregate

    from domain.service import Replaying

    pid = new_participant_id()
    for command in (c.ScreenParticipant(pid, screening("CASE")), c.RecordConsent(pid, consent())):
        service.execute(command, audit())
    assert isinstance(service.repository, Replaying)
    events = list(service.events.get(participant_uuid(pid)))
    for version in (1, 2):
        ours = service.get_participant(pid, version=version)
        theirs = project_aggregate(None, events[:version])
        assert vars(ours) == vars(theirs) and ours.version == version
    assert vars(service.get_participant(pid)) == vars(project_aggregate(None, events))
    service.take_snapshot(participant_uuid(pid), version=1)  # then loaded from it
    assert next(iter(service.snapshots.get(participant_uuid(pid)))).originator_version == 1
    assert vars(service.get_participant(pid)) == vars(project_aggregate(None, events))
