"""The application service: one method per command, each loads, calls and saves."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from typing import Any, ClassVar, Self
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application, Repository
from eventsourcing.persistence import EventStore, JSONTranscoder, Mapper, Transcoding

from domain import commands as c
from domain.access import EVERY_SITE, Scope
from domain.commands import Audit, Command
from domain.deviations import visit_missed
from domain.errors import (
    DomainError,
    ParticipantIdUnavailable,
    ParticipantNotFound,
    SiteNotAllowed,
    ValidationFailed,
    VersionConflict,
)
from domain.management import CASEBOOK, visit_key
from domain.participant import (
    DERIVED_BY,
    CorrectionRule,
    FieldDefined,
    Participant,
    derivation,
    derived_here,
    participant_uuid,
)
from domain.protocol import Protocol
from domain.randomization import AllocationSequence, sequence_id
from domain.revocations import AccessRegister, register_uuid
from domain.schedule import ended_everywhere
from domain.sealing import SealingMapper
from domain.trial import TrialDatabase, trial_uuid
from domain.views import visits_view


class DateAsISO(Transcoding):
    type = date
    name = "date_iso"

    def encode(self, obj: date) -> str:
        return obj.isoformat()

    def decode(self, data: str) -> date:
        return date.fromisoformat(data)


def project(aggregate: Any, events: Iterable[Any]) -> Any:
    """The aggregate ``events`` make of ``aggregate`` (None: from nothing; a snapshot may
    come first): the library's ``project_aggregate`` without its check, for each event,
    that it can mutate an aggregate, an isinstance against a runtime Protocol that costs
    ~12 µs an event here (a millisecond of loading a participant 100 events past its
    snapshot)."""
    for event in events:
        aggregate = event.mutate(aggregate)
    return aggregate


class Replaying(Repository[UUID]):
    """The library's repository, replaying events with ``project``."""

    def get(self, aggregate_id: UUID, *, version: int | None = None,
            projector_func: Any = project, fastforward_skipping: bool = False,
            deepcopy_from_cache: bool = True) -> Any:
        return super().get(aggregate_id, version=version, projector_func=projector_func,
                           fastforward_skipping=fastforward_skipping,
                           deepcopy_from_cache=deepcopy_from_cache)


class Snapshots(EventStore[UUID]):
    """The snapshot store: each snapshot put names the code that derived it (see
    ``derivation``), and only those this code derived are got: from the first that is
    not (another release's, or one this code can't even read, a class moved since), none.
    A participant whose newest snapshot is another code's loads from its events."""

    def put(self, domain_events: Any, **kwargs: Any) -> Any:
        for snapshot in domain_events:
            snapshot.state[DERIVED_BY] = derivation()
        return super().put(domain_events, **kwargs)

    def get(self, originator_id: UUID, *, gt: int | None = None, lte: int | None = None,
            desc: bool = False, limit: int | None = None) -> Iterator[Any]:
        found = []
        for stored in self.recorder.select_events(originator_id, gt=gt, lte=lte, desc=desc,
                                                  limit=limit):
            snapshot = self.derived_here(stored)
            if snapshot is None:
                break
            found.append(snapshot)
        return iter(found)

    def derived_here(self, stored: Any) -> Any:
        """The stored snapshot, if this code derived it; otherwise None."""
        try:
            snapshot = self.mapper.to_domain_event(stored)
        except Exception:  # noqa: BLE001 - unreadable by this code: not this code's
            return None
        return snapshot if derived_here(snapshot) else None


# The aggregates of commands decided together (see Together): every load inside sees them.
_TOGETHER: ContextVar[dict[UUID, Any] | None] = ContextVar("trialog_together", default=None)


@dataclass(frozen=True)
class Outcome:
    """What a command wrote: the participant's new version and the events, with the global
    position of the last one."""

    participant_id: str
    version: int
    position: int | None
    events: list[dict[str, Any]]
    decided: dict[str, Any] = field(default_factory=dict)  # see TrialService.answer


Decision = tuple[Participant, ...] | tuple[Participant, AllocationSequence]
Handler = Callable[[Any, Command, Audit], Any]


class TrialService(Application[Any]):
    """Turns commands into participant events."""

    name = "Trialog"
    # A snapshot every 100 events of a participant: a long record loads from its latest
    # snapshot and the events after it (snapshots are encrypted like the events; the
    # events stay the record).
    snapshotting_intervals: ClassVar[dict[type[Any], int]] = {Participant: 100}
    snapshotting_projectors: ClassVar[dict[type[Any], Any]] = {Participant: project}

    def __init__(self, protocol: Protocol, allocation_seed: bytes,
                 env: dict[str, str] | None = None,
                 correction_rule: CorrectionRule | None = None) -> None:
        self.protocol = protocol
        self.allocation_seed = allocation_seed
        self.correction_rule = correction_rule
        # The fields each command defines, where the correction rule knows them.
        self.field_defined: FieldDefined | None = getattr(correction_rule, "defines", None)
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
            c.RaiseQuery: lambda p, cmd, a: p.raise_query(cmd.data, self.protocol, a,
                                                          self.field_defined),
            c.RespondToQuery: lambda p, cmd, a: p.act_on_query("respond", cmd.data, a),
            c.CloseQuery: lambda p, cmd, a: p.act_on_query("close", cmd.data, a),
            c.ReopenQuery: lambda p, cmd, a: p.act_on_query("reopen", cmd.data, a),
            c.CancelQuery: lambda p, cmd, a: p.act_on_query("cancel", cmd.data, a),
            c.VerifySource: lambda p, cmd, a: p.verify_source(cmd.data, self.protocol, a),
            c.SignVisit: lambda p, cmd, a: p.sign_visit(cmd.data, self.protocol, a),
            c.SignCasebook: self.sign_casebook,
            c.LockVisit: lambda p, cmd, a: p.lock(visit_key(cmd.data["visit"]), a,
                                                  self.protocol),
            c.UnlockVisit: lambda p, cmd, a: p.unlock(visit_key(cmd.data["visit"]), a),
            c.LockCasebook: lambda p, cmd, a: p.lock(CASEBOOK, a),
            c.UnlockCasebook: lambda p, cmd, a: p.unlock(CASEBOOK, a),
        }

    def construct_mapper(self) -> Mapper[UUID]:
        return self.factory.mapper(transcoder=self.construct_transcoder(),
                                   mapper_class=SealingMapper)

    def construct_snapshot_store(self) -> EventStore[UUID]:
        store = super().construct_snapshot_store()
        return Snapshots(store.mapper, store.recorder)

    def construct_repository(self) -> Repository[UUID]:
        # The library's repository, with the settings it read (an aggregate cache, off by
        # default), replaying with ``project``.
        repository = super().construct_repository()
        repository.__class__ = Replaying
        return repository

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        transcoder.register(DateAsISO())

    def execute(self, command: Command, audit: Audit,
                expected_version: int | None = None, scope: Scope = EVERY_SITE) -> Outcome:
        return self.record(self.decide(command, audit, expected_version, scope))

    def decide(self, command: Command, audit: Audit,
               expected_version: int | None = None, scope: Scope = EVERY_SITE) -> Decision:
        """Runs the command against the participant; nothing is saved yet. A participant
        outside ``scope`` does not exist here: the caller gets what an unknown id gets."""
        participant = self.target(command, scope)
        version = participant.version if participant is not None else 0
        _check_version(command.participant_id, version, expected_version)
        decision: Decision | None = self._handlers[type(command)](participant, command, audit)
        if decision is None:  # a data-management command: it acts on the participant only
            assert participant is not None
            decision = (participant,)
        return decision

    def target(self, command: Command, scope: Scope = EVERY_SITE) -> Participant | None:
        """The participant the command acts on, as the caller may see it: None when a
        screening creates it; refused when it is unknown or outside ``scope``."""
        screening = isinstance(command, c.ScreenParticipant)
        if screening:
            self._check_new_id(command, scope)
        try:
            participant = self.get_participant(command.participant_id)
        except ParticipantNotFound:
            if screening:
                return None
            raise
        if not scope.admits(participant.site_id):
            if screening:
                raise ParticipantIdUnavailable(
                    f"participant_id {command.participant_id} is already in use; "
                    "choose another")
            raise ParticipantNotFound(f"participant {command.participant_id} not found")
        return participant

    def _check_new_id(self, command: Command, scope: Scope) -> None:
        """A screening names a known site inside the caller's scope, and an id that starts
        with the site's prefix: none of it depends on what exists."""
        site = self.protocol.site(command.data["site_id"])
        if site is None:
            message = f"must be one of: {', '.join(self.protocol.site_ids)}"
            raise ValidationFailed({"data.site_id": [message]})
        if not scope.admits(site.id):
            raise SiteNotAllowed(f"site {site.id} is outside the caller's sites")
        if not command.participant_id.startswith(site.participant_prefix):
            message = f"must start with {site.participant_prefix!r} at site {site.id}"
            raise ValidationFailed({"participant_id": [message]})

    def record(self, decision: Decision) -> Outcome:
        """Saves what a command decided; the participant last, so that the position is
        that of its last event."""
        participant, *others = decision
        return self._save(participant, *others)

    @staticmethod
    def answer(decision: Decision) -> Outcome:
        """What saving ``decision`` will answer, but for the position; with what the
        command decided that its caller can't know beforehand: a screening's outcome
        (``eligible``, ``failed_criteria``), a randomization's ``arm`` (the trial is open
        label)."""
        participant = decision[0]
        decided: dict[str, Any] = {}
        for e in participant.pending_events:
            if isinstance(e, (Participant.ParticipantScreened,
                              Participant.ParticipantRescreened)):
                decided.update(eligible=e.eligible, failed_criteria=list(e.failed_criteria))
            elif isinstance(e, Participant.ParticipantRandomized):
                decided["arm"] = e.arm
        return Outcome(
            participant_id=participant.participant_id, version=participant.version,
            position=None,
            events=[{"type": type(e).__name__, "version": e.originator_version,
                     "recorded_at": e.timestamp.isoformat()}
                    for e in participant.pending_events],
            decided=decided,
        )

    def together(self, loaded: Iterable[Participant] = (),
                 absent: Iterable[UUID] = ()) -> Together:
        """Commands decided one after another on the same aggregates in memory and saved
        at once (see Together); ``loaded``: participants the caller has just read;
        ``absent``: aggregates the caller knows have no event yet."""
        return Together(self, loaded, absent)

    def get_participant(self, participant_id: str, version: int | None = None) -> Participant:
        participant: Participant | None
        if version is None:
            participant = self._load(participant_uuid(participant_id))
        else:
            try:
                participant = self.repository.get(participant_uuid(participant_id),
                                                  version=version)
            except AggregateNotFoundError:
                participant = None
        if participant is None:
            raise ParticipantNotFound(f"participant {participant_id} not found")
        return participant

    def _load(self, aggregate_id: UUID) -> Any:
        """The newest version, or None; while commands are decided together, as they left
        it (read from the store once)."""
        together = _TOGETHER.get()
        if together is not None and aggregate_id in together:
            return together[aggregate_id]
        try:
            aggregate: Any = self.repository.get(aggregate_id)
        except AggregateNotFoundError:
            aggregate = None
        if together is not None:
            together[aggregate_id] = aggregate
        return aggregate

    # --- one method per command: the participant is loaded and checked by decide ------

    def screen_participant(self, participant: Participant | None, cmd: Command,
                           audit: Audit) -> Decision:
        if participant is None:
            participant = Participant.screen(cmd.participant_id, cmd.data, self.protocol, audit)
        else:
            participant.rescreen(cmd.data, self.protocol, audit)
        return (participant,)

    def record_consent(self, participant: Participant, cmd: Command, audit: Audit) -> Decision:
        participant.record_consent(cmd.data, audit, self.protocol)
        return (participant,)

    def randomize_participant(self, participant: Participant, cmd: Command,
                              audit: Audit) -> Decision:
        sequence = self._sequence(participant.site_id, audit)
        participant.randomize(cmd.data, sequence, self.allocation_seed, self.protocol, audit)
        return participant, sequence

    def record_blood_sample(self, participant: Participant, cmd: Command,
                            audit: Audit) -> Decision:
        participant.record_blood_sample(cmd.data, self.protocol, audit)
        return (participant,)

    def record_dose(self, participant: Participant, cmd: Command, audit: Audit) -> Decision:
        participant.record_dose(cmd.data, audit)
        return (participant,)

    def complete_visit(self, participant: Participant, cmd: Command, audit: Audit) -> Decision:
        participant.complete_visit(cmd.data, self.protocol, audit)
        return (participant,)

    def report_medication(self, participant: Participant, cmd: Command,
                          audit: Audit) -> Decision:
        participant.report_medication(cmd.data, audit)
        return (participant,)

    def withdraw_participant(self, participant: Participant, cmd: Command,
                             audit: Audit) -> Decision:
        participant.withdraw(cmd.data, audit)
        return (participant,)

    def correct_data(self, participant: Participant, cmd: Command, audit: Audit) -> Decision:
        participant.correct_data(cmd.data, audit, self.correction_rule)
        corrected = participant.version_of(cmd.data["event_id"])
        if corrected == participant.screening_record:
            participant.reassess_screening(self.protocol, audit)
        if cmd.data["field"] == "visit" and corrected is not None \
                and participant.records[corrected]["type"] == "VisitCompleted":
            participant.retract_miss_moved_onto(cmd.data["value"], audit)
            participant.reassess_completion(self.protocol, audit)
        if cmd.data["field"] == "registered_on":  # the schedule moved with it
            participant.retract_open_misses(self.protocol,
                                            ended_everywhere(audit.recorded_at), audit)
        return (participant,)

    def resolve_deviation(self, participant: Participant, cmd: Command,
                          audit: Audit) -> Decision:
        participant.resolve_deviation(cmd.data, audit)
        return (participant,)

    def flag_deviation(self, participant: Participant, cmd: Command, audit: Audit) -> Decision:
        d = cmd.data
        participant.flag_deviation(d["deviation_id"], d["code"], d["severity"],
                                   list(d["evidence"]), d["detail"], audit)
        return (participant,)

    def record_reminder_sent(self, participant: Participant, cmd: Command,
                             audit: Audit) -> Decision:
        d = cmd.data
        participant.record_reminder_sent(d["visit"], d["kind"], list(d["recipients"]), audit)
        return (participant,)

    def record_visit_missed(self, participant: Participant, cmd: Command,
                            audit: Audit) -> Decision:
        """Marks a visit missed if the rule still finds it so on the record as it is now:
        the scan found it on a record read before, which may have changed since (a
        correction of the registration date moved its window, a withdrawal dated before
        its end was recorded: then nothing is written)."""
        visit = cmd.data["visit"]
        found = visit_missed(participant, self.protocol, ended_everywhere(audit.recorded_at))
        if any(finding.key == visit for finding in found):
            participant.record_visit_missed(visit, audit)
        return (participant,)

    def sign_casebook(self, participant: Participant, cmd: Command,
                      audit: Audit) -> Decision:
        visits = visits_view(participant, self.protocol,
                             self.protocol.day_at(participant.site_id, audit.recorded_at))
        participant.sign_casebook(cmd.data, {v["code"]: v["status"] for v in visits}, audit)
        return (participant,)

    # --- the trial database lock ---------------------------------------------------------

    def database(self) -> TrialDatabase | None:
        try:
            database: TrialDatabase = self.repository.get(trial_uuid(self.protocol.study_id))
        except AggregateNotFoundError:
            return None
        return database

    def decide_trial(self, type_name: str, audit: Audit) -> TrialDatabase:
        """LockDatabase or UnlockDatabase; nothing is saved yet."""
        database = self.database() or TrialDatabase.open(self.protocol.study_id, audit)
        if type_name == "LockDatabase":
            database.lock(audit)
        else:
            database.unlock(audit)
        return database

    # --- who may no longer call -----------------------------------------------------------

    def access_register(self, version: int | None = None) -> AccessRegister | None:
        """The register of access granted, tokens revoked and people disabled (at
        ``version``)."""
        try:
            register: AccessRegister = self.repository.get(
                register_uuid(self.protocol.study_id), version=version)
        except AggregateNotFoundError:
            return None
        return register

    def _register_or_opened(self, audit: Audit) -> AccessRegister:
        """The register, or a new one opened by the command being decided."""
        return self.access_register() or AccessRegister.open(self.protocol.study_id, audit)

    def decide_revocation(self, type_name: str, name: str, audit: Audit) -> AccessRegister:
        """RevokeToken or DisablePerson; nothing is saved yet."""
        register = self._register_or_opened(audit)
        register.revoke(type_name, name, audit)
        return register

    def decide_grant(self, name: str, role: str, sites: list[str] | None, audit: Audit,
                     full_name: str | None = None,
                     granted_at: datetime | None = None) -> AccessRegister:
        """Access granted to a machine token, or to a person (``full_name`` given), at
        ``granted_at``; nothing is saved yet."""
        register = self._register_or_opened(audit)
        register.grant(name, role, sites, audit, full_name, granted_at)
        return register

    def decide_password_change(self, login: str, generation: int,
                               audit: Audit) -> AccessRegister:
        """The ``generation``-th change of ``login``'s password; nothing is saved yet."""
        register = self._register_or_opened(audit)
        register.password_changed(login, generation, audit)
        return register

    # --- helpers -------------------------------------------------------------------------

    def _sequence(self, stratum: str, audit: Audit) -> AllocationSequence:
        sequence: AllocationSequence | None = self._load(
            sequence_id(self.protocol.study_id, stratum))
        return sequence or AllocationSequence.open(self.protocol.study_id, stratum, audit)

    def _save(self, participant: Participant, *others: Any) -> Outcome:
        answer = self.answer((participant,))
        recordings = self.save(*others, participant)
        positions = [
            r.notification.id for r in recordings
            if r.domain_event.originator_id == participant.id
        ]
        return replace(answer, position=max(positions) if positions else None)


class _Handed(dict[UUID, Any]):
    """The aggregates decided together, noting each one handed to the command being
    decided: a fault in an event's apply leaves an aggregate changed with no event
    pending, so only what was handed out says which to put back."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.handed: set[UUID] = set()

    def __getitem__(self, key: UUID) -> Any:
        self.handed.add(key)
        return super().__getitem__(key)

    def __setitem__(self, key: UUID, value: Any) -> None:
        self.handed.add(key)
        super().__setitem__(key, value)


class Together:
    """Commands decided one after another on the same aggregates in memory, then saved in
    one go: each command sees what those before it decided, as if they had been saved
    (a bulk import, a group of commands, a chunk of reminders). A refused command leaves
    no trace: the aggregates it changed are put back as the commands before it left them.
    Saving conflicts if another writer saved one of the aggregates meanwhile; decide
    again with a new Together then."""

    def __init__(self, service: TrialService, loaded: Iterable[Participant] = (),
                 absent: Iterable[UUID] = ()) -> None:
        self.service = service
        self.aggregates = _Handed(dict.fromkeys(absent))
        self.aggregates.update({p.id: p for p in loaded})
        self.decided: dict[UUID, list[Any]] = {}  # each aggregate's events, in order
        self.events: list[Any] = []  # every aggregate's, in the order decided
        self._token: Any = None

    def __enter__(self) -> Self:
        self._token = _TOGETHER.set(self.aggregates)
        return self

    def __exit__(self, *_: object) -> None:
        _TOGETHER.reset(self._token)

    def decide(self, command: Command, audit: Audit, expected_version: int | None = None,
               scope: Scope = EVERY_SITE) -> tuple[Outcome, list[Any]]:
        """The command's answer but for its position, and the participant's new events
        (their positions, once saved, give it)."""
        self.aggregates.handed.clear()
        try:
            decision = self.service.decide(command, audit, expected_version, scope)
            answer = self.service.answer(decision)
        except DomainError:  # a rule refuses before an event is applied
            self._put_back()
            raise
        except BaseException:  # a fault, maybe half way through an event's apply
            self._put_back(also=self.aggregates.handed)
            raise
        participant, *others = decision
        mine: list[Any] = []
        for aggregate in (*others, participant):  # the participant's last, as record saves
            self.aggregates[aggregate.id] = aggregate
            new = aggregate.collect_events()
            self.decided.setdefault(aggregate.id, []).extend(new)
            self.events.extend(new)
            if aggregate is participant:
                mine = list(new)
        return answer, mine

    def _put_back(self, also: Iterable[UUID] = ()) -> None:
        """Each aggregate a refused command changed (and those ``also`` named), as the
        store and the commands before it left it."""
        also = set(also)
        for key, aggregate in list(self.aggregates.items()):
            if aggregate is not None and (aggregate.pending_events or key in also):
                try:
                    stored: Any = self.service.repository.get(key)
                except AggregateNotFoundError:
                    stored = None
                self.aggregates[key] = project(stored, self.decided.get(key, []))

    def save(self) -> dict[tuple[UUID, int], int]:
        """Every decided event in one insert, in the order decided, and the snapshots the
        service takes; the position of each event by its aggregate and version."""
        if not self.events:
            return {}
        # The event store's own put: what Application.save does with events given
        # (rather than aggregates), without its check, for each, of what it was given.
        recordings = self.service.events.put(self.events)
        for key, events in self.decided.items():
            kind = type(self.aggregates[key])
            interval = self.service.snapshotting_intervals.get(kind)
            for event in events:
                if interval and event.originator_version % interval == 0:
                    self.service.take_snapshot(
                        key, version=event.originator_version,
                        projector_func=self.service.snapshotting_projectors.get(kind, project))
        return {(r.domain_event.originator_id, r.domain_event.originator_version):
                r.notification.id for r in recordings}


def _check_version(participant_id: str, actual: int, expected: int | None) -> None:
    if expected is not None and expected != actual:
        raise VersionConflict(
            f"participant {participant_id} is at version {actual}, not {expected}",
            expected_version=expected, actual_version=actual,
        )
