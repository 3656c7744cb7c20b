"""The application service: one method per command, each loads, calls and saves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date
from typing import Any

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import JSONTranscoder, Transcoding

from domain import commands as c
from domain.commands import Audit, Command
from domain.errors import ParticipantNotFound, VersionConflict
from domain.participant import CorrectionRule, Participant, participant_uuid
from domain.protocol import Protocol
from domain.randomization import AllocationSequence, sequence_id


class DateAsISO(Transcoding):
    type = date
    name = "date_iso"

    def encode(self, obj: date) -> str:
        return obj.isoformat()

    def decode(self, data: str) -> date:
        return date.fromisoformat(data)


@dataclass(frozen=True)
class Outcome:
    """What a command wrote: the participant's new version and the events, with the global
    position of the last one."""

    participant_id: str
    version: int
    position: int | None
    events: list[dict[str, Any]]


Decision = tuple[Participant, ...] | tuple[Participant, AllocationSequence]
Handler = Callable[[Command, Audit, "int | None"], Any]


class TrialService(Application[Any]):
    """Turns commands into participant events."""

    name = "Trialog"

    def __init__(self, protocol: Protocol, allocation_seed: bytes,
                 env: dict[str, str] | None = None,
                 correction_rule: CorrectionRule | None = None) -> None:
        self.protocol = protocol
        self.allocation_seed = allocation_seed
        self.correction_rule = correction_rule
        super().__init__(env)
        self._handlers: dict[type[Command], Handler] = {
            c.ScreenParticipant: self.screen_participant,
            c.RecordConsent: self.record_consent,
            c.RandomizeParticipant: self.randomize_participant,
            c.RecordBloodSample: self.record_blood_sample,
            c.RecordDose: self.record_dose,
            c.CompleteVisit: self.complete_visit,
            c.ReportMedication: self.report_medication,
            c.WithdrawParticipant: self.withdraw_participant,
            c.CorrectData: self.correct_data,
            c.ResolveDeviation: self.resolve_deviation,
            c.FlagDeviation: self.flag_deviation,
            c.RecordReminderSent: self.record_reminder_sent,
            c.RecordVisitMissed: self.record_visit_missed,
        }

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        transcoder.register(DateAsISO())

    def execute(self, command: Command, audit: Audit,
                expected_version: int | None = None) -> Outcome:
        return self.record(self.decide(command, audit, expected_version))

    def decide(self, command: Command, audit: Audit,
               expected_version: int | None = None) -> Decision:
        """Runs the command against the participant; nothing is saved yet."""
        decision: Decision = self._handlers[type(command)](command, audit, expected_version)
        return decision

    def record(self, decision: Decision) -> Outcome:
        """Saves what a command decided; the participant last, so that the position is
        that of its last event."""
        participant, *others = decision
        return self._save(participant, *others)

    @staticmethod
    def answer(decision: Decision) -> Outcome:
        """What saving ``decision`` will answer, but for the position."""
        participant = decision[0]
        return Outcome(
            participant_id=participant.participant_id, version=participant.version,
            position=None,
            events=[{"type": type(e).__name__, "version": e.originator_version,
                     "recorded_at": e.timestamp.isoformat()}
                    for e in participant.pending_events],
        )

    def get_participant(self, participant_id: str, version: int | None = None) -> Participant:
        try:
            participant: Participant = self.repository.get(
                participant_uuid(participant_id), version=version
            )
        except AggregateNotFoundError:
            raise ParticipantNotFound(f"participant {participant_id} not found") from None
        return participant

    # --- one method per command ----------------------------------------------------------

    def screen_participant(self, cmd: Command, audit: Audit, expected: int | None) -> Decision:
        try:
            participant = self._load(cmd.participant_id, expected)
        except ParticipantNotFound:
            _check_version(cmd.participant_id, 0, expected)
            participant = Participant.screen(cmd.participant_id, cmd.data, self.protocol, audit)
        else:
            participant.rescreen(cmd.data, self.protocol, audit)
        return (participant,)

    def record_consent(self, cmd: Command, audit: Audit, expected: int | None) -> Decision:
        participant = self._load(cmd.participant_id, expected)
        participant.record_consent(cmd.data, audit)
        return (participant,)

    def randomize_participant(self, cmd: Command, audit: Audit,
                              expected: int | None) -> Decision:
        participant = self._load(cmd.participant_id, expected)
        sequence = self._sequence(participant.site_id, audit)
        participant.randomize(cmd.data, sequence, self.allocation_seed, self.protocol, audit)
        return participant, sequence

    def record_blood_sample(self, cmd: Command, audit: Audit, expected: int | None) -> Decision:
        participant = self._load(cmd.participant_id, expected)
        participant.record_blood_sample(cmd.data, self.protocol, audit)
        return (participant,)

    def record_dose(self, cmd: Command, audit: Audit, expected: int | None) -> Decision:
        participant = self._load(cmd.participant_id, expected)
        participant.record_dose(cmd.data, audit)
        return (participant,)

    def complete_visit(self, cmd: Command, audit: Audit, expected: int | None) -> Decision:
        participant = self._load(cmd.participant_id, expected)
        participant.complete_visit(cmd.data, self.protocol, audit)
        return (participant,)

    def report_medication(self, cmd: Command, audit: Audit, expected: int | None) -> Decision:
        participant = self._load(cmd.participant_id, expected)
        participant.report_medication(cmd.data, audit)
        return (participant,)

    def withdraw_participant(self, cmd: Command, audit: Audit,
                             expected: int | None) -> Decision:
        participant = self._load(cmd.participant_id, expected)
        participant.withdraw(cmd.data, audit)
        return (participant,)

    def correct_data(self, cmd: Command, audit: Audit, expected: int | None) -> Decision:
        participant = self._load(cmd.participant_id, expected)
        participant.correct_data(cmd.data, audit, self.correction_rule)
        return (participant,)

    def resolve_deviation(self, cmd: Command, audit: Audit, expected: int | None) -> Decision:
        participant = self._load(cmd.participant_id, expected)
        participant.resolve_deviation(cmd.data, audit)
        return (participant,)

    def flag_deviation(self, cmd: Command, audit: Audit, expected: int | None) -> Decision:
        participant = self._load(cmd.participant_id, expected)
        d = cmd.data
        participant.flag_deviation(d["deviation_id"], d["code"], d["severity"],
                                   list(d["evidence"]), d["detail"], audit)
        return (participant,)

    def record_reminder_sent(self, cmd: Command, audit: Audit,
                             expected: int | None) -> Decision:
        participant = self._load(cmd.participant_id, expected)
        d = cmd.data
        participant.record_reminder_sent(d["visit"], d["kind"], list(d["recipients"]), audit)
        return (participant,)

    def record_visit_missed(self, cmd: Command, audit: Audit,
                            expected: int | None) -> Decision:
        participant = self._load(cmd.participant_id, expected)
        participant.record_visit_missed(cmd.data["visit"], audit)
        return (participant,)

    # --- helpers -------------------------------------------------------------------------

    def _load(self, participant_id: str, expected: int | None) -> Participant:
        participant = self.get_participant(participant_id)
        _check_version(participant_id, participant.version, expected)
        return participant

    def _sequence(self, stratum: str, audit: Audit) -> AllocationSequence:
        try:
            sequence: AllocationSequence = self.repository.get(
                sequence_id(self.protocol.study_id, stratum)
            )
        except AggregateNotFoundError:
            sequence = AllocationSequence.open(self.protocol.study_id, stratum, audit)
        return sequence

    def _save(self, participant: Participant, *others: Any) -> Outcome:
        answer = self.answer((participant,))
        recordings = self.save(*others, participant)
        positions = [
            r.notification.id for r in recordings
            if r.domain_event.originator_id == participant.id
        ]
        return replace(answer, position=max(positions) if positions else None)


def _check_version(participant_id: str, actual: int, expected: int | None) -> None:
    if expected is not None and expected != actual:
        raise VersionConflict(
            f"participant {participant_id} is at version {actual}, not {expected}",
            expected_version=expected, actual_version=actual,
        )
