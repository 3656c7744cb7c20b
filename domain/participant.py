"""The Participant aggregate: every fact about one participant, as events.

Command methods check the protocol's rules and trigger events; event ``apply`` methods only
change state. Captured data is kept per event (``records``), so a correction patches the
record it names and every view derived from it follows.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Snapshot as AggregateSnapshot

from domain import eligibility
from domain.chain import ChainedAggregate
from domain.commands import Audit
from domain.errors import InvalidTransition, NotEligible, ValidationFailed
from domain.management import QUERY_TRANSITIONS, DataManagement, visit_key
from domain.protocol import Protocol
from domain.randomization import AllocationSequence
from domain.schedule import window_ends
from domain.scoring import visit_scores

# Fields that key other state (the randomization stratum, the withdrawal scope) can't be
# corrected: they are recorded again by a new command instead. (A visit's code can: its
# data moves to the visit it belongs to, and the study's completion follows.)
LOCKED_FIELDS = frozenset({"site_id", "scope"})
ACTIVE = ("randomized", "off_treatment")
SCREENINGS = ("ParticipantScreened", "ParticipantRescreened")
# Direct identifiers captured at screening, shown only to roles allowed to contact.
CONTACT_FIELDS = frozenset({"email", "birth_date"})

# The command that records each data-capturing event: its data follows that command's
# fields (a correction is checked by them, the exports list them).
CAPTURED_BY = {
    "ParticipantScreened": "ScreenParticipant",
    "ParticipantRescreened": "ScreenParticipant",
    "ConsentRecorded": "RecordConsent",
    "ParticipantRandomized": "RandomizeParticipant",
    "BloodSampleCollected": "RecordBloodSample",
    "DoseRecorded": "RecordDose",
    "VisitCompleted": "CompleteVisit",
    "MedicationReported": "ReportMedication",
    "ParticipantWithdrawn": "WithdrawParticipant",
}

# No date a record holds is earlier (a birth date included): dates stay far inside the
# calendar, so the schedule's arithmetic on them can't overflow.
EARLIEST = date(1900, 1, 1)
# The date furthest ahead of UTC anywhere (Kiribati's, UTC+14), and how far a client's clock
# may run ahead of the server's: see _misdated.
LATEST_ZONE = timedelta(hours=14)
CLOCK_SKEW = timedelta(minutes=5)
# The dates of a record in the order of the trial's steps: (earlier, later, whether both
# may fall on the same day). The consent's is the first consent's (a re-consent after a
# protocol amendment comes after the registration).
DATE_ORDER = (("birth_date", "screened_on", False), ("screened_on", "registered_on", True),
              ("signed_on", "registered_on", True))

FieldDefined = Callable[[str, str], bool]
"""Whether a dotted path names a field of an event type's data, as the command that
captures it defines them (held or left out by a record)."""

CorrectionRule = Callable[[str, str, Any, Mapping[str, Any]], Any]
"""The rule of the field a correction names: called with the type of the corrected event,
the dotted path, the new value and the data recorded so far, it answers the value as the
field holds it, or raises ``ValidationFailed`` on ``data.value`` (an undefined field, or a
value that breaks the rule the original command's field applies)."""


@lru_cache(maxsize=4096)  # a command asks it several times; a batch, for each participant
def participant_uuid(participant_id: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"trialog:participant:{participant_id}")


def deviation_uuid(originator_id: UUID, code: str, key: str, generation: int = 0) -> str:
    """A deviation's id: one per participant, rule and what it is about (and, after a
    retraction, per generation: see Finding)."""
    again = f":{generation}" if generation else ""
    return str(uuid5(originator_id, f"deviation:{code}:{key}{again}"))


def event_uuid(originator_id: UUID, version: int) -> str:
    """``str(uuid5(originator_id, str(version)))``, without building UUID objects (this runs
    for every event applied)."""
    digest = bytearray(hashlib.sha1(originator_id.bytes + str(version).encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _walk(data: Mapping[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """The dict holding the last key of a dotted path, and that key."""
    *parents, last = path.split(".")
    node: Any = data
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise ValidationFailed({"data.field": [f"{path!r} is not a field of that event"]})
    return node, last


def _holds(data: Mapping[str, Any], path: str) -> bool:
    """Whether the data has a value (null included) at a dotted path."""
    node: Any = data
    for key in path.split("."):
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return False
    return True


def _lookup(data: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path; None where the record left it (or a parent) out."""
    node: Any = data
    for key in path.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def place(data: dict[str, Any], path: str, value: Any) -> None:
    """Sets the value at a dotted path, adding the objects a record left out (an item of a
    questionnaire that was not answered)."""
    *parents, last = path.split(".")
    node = data
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[last] = value


class Participant(DataManagement, ChainedAggregate):
    """One participant's record, from screening to the end of follow-up."""

    class Event(ChainedAggregate.Event):
        @property
        def event_id(self) -> str:
            return event_uuid(self.originator_id, self.originator_version)

    class Capture(Event):
        """An event that captures data; its ``data`` can be corrected later."""

        data: dict[str, Any]

        def apply(self, aggregate: Any) -> None:
            # Shared with the event, never changed in place: a correction replaces it.
            aggregate.records[self.originator_version] = {"type": type(self).__name__,
                                                          "data": self.data}
            self.absorb(aggregate)

        def absorb(self, aggregate: Any) -> None:
            pass

    class ParticipantScreened(Capture, ChainedAggregate.Created):
        participant_id: str
        eligible: bool
        failed_criteria: list[str]

        def apply(self, aggregate: Any) -> None:
            aggregate.participant_id = self.participant_id
            aggregate.site_id = self.data["site_id"]
            aggregate.records = {}
            aggregate.deviations = {}
            aggregate.reminders = []
            aggregate.missed_visits = []
            aggregate.missed_retractions = {}  # visit -> its missed marks retracted
            aggregate.consent_record = None
            aggregate.first_consent_record = None
            aggregate.registration_record = None
            aggregate.arm = None
            aggregate.allocation_index = None
            aggregate.withdrawals = {}
            aggregate.corrected = []  # a list: aggregate state stays plain JSON values
            aggregate.queries = {}
            aggregate.verified = {}  # visit -> the version that verified it
            aggregate.changed = {}  # visit -> the version of its latest new data
            aggregate.signatures = {}  # "visit:<code>" or "casebook" -> the signature
            aggregate.locks = []  # "visit:<code>" or "casebook"
            Participant.Capture.apply(self, aggregate)

        def absorb(self, aggregate: Any) -> None:
            aggregate.screening_record = self.originator_version
            aggregate.eligible = self.eligible
            aggregate.failed_criteria = list(self.failed_criteria)
            aggregate.status = "screened" if self.eligible else "screen_failed"

    class ParticipantRescreened(Capture):
        eligible: bool
        failed_criteria: list[str]

        def absorb(self, aggregate: Any) -> None:
            Participant.ParticipantScreened.absorb(self, aggregate)  # type: ignore[arg-type]

    class ScreeningReassessed(Event):
        """The screening's outcome as a correction of its data left it: eligible or not,
        and the criteria it fails. Before a consent the status follows it (a screen failure
        corrected to eligible is screened, and the other way round)."""

        eligible: bool
        failed_criteria: list[str]

        def apply(self, aggregate: Any) -> None:
            aggregate.eligible = self.eligible
            aggregate.failed_criteria = list(self.failed_criteria)
            aggregate.status = "screened" if self.eligible else "screen_failed"

    class StudyCompletionReassessed(Event):
        """Whether the study is completed, after a correction moved a visit's data to
        another visit (the last visit's data keyed under another code, or the other way
        round): completed, or back in follow-up as before."""

        completed: bool

        def apply(self, aggregate: Any) -> None:
            if self.completed:
                aggregate.status = "completed"
            else:
                aggregate.status = ("off_treatment" if "treatment" in aggregate.withdrawals
                                    else "randomized")

    class ConsentRecorded(Capture):
        def absorb(self, aggregate: Any) -> None:
            aggregate.consent_record = self.originator_version
            if aggregate.first_consent_record is None:
                aggregate.first_consent_record = self.originator_version
            if aggregate.status in ("screened", "screen_failed"):  # see record_consent
                aggregate.status = "consented"

    class ParticipantRandomized(Capture):
        arm: str
        allocation_index: int

        def absorb(self, aggregate: Any) -> None:
            aggregate.registration_record = self.originator_version
            aggregate.arm = self.arm
            aggregate.allocation_index = self.allocation_index
            aggregate.status = "randomized"

    class BloodSampleCollected(Capture):
        def absorb(self, aggregate: Any) -> None:
            # New data of its visit: a visit verified before it is changed since.
            aggregate.changed[self.data["timepoint"]] = self.originator_version

    class DoseRecorded(Capture):
        pass

    class VisitCompleted(Capture):
        completes_study: bool

        def absorb(self, aggregate: Any) -> None:
            if self.completes_study:
                aggregate.status = "completed"

    class MedicationReported(Capture):
        pass

    class ParticipantWithdrawn(Capture):
        def absorb(self, aggregate: Any) -> None:
            scope = self.data["scope"]
            aggregate.withdrawals[scope] = self.originator_version
            aggregate.status = "withdrawn" if scope == "study" else "off_treatment"

    class DataCorrected(Event):
        target_event_id: str
        field: str
        previous_value: Any
        value: Any

        def apply(self, aggregate: Any) -> None:
            version = aggregate.version_of(self.target_event_id)
            record = aggregate.records[version]
            after = _corrected_record(record, self.field, self.value)
            aggregate.records[version] = after
            if version not in aggregate.corrected:
                aggregate.corrected.append(version)
            for visit in _changed_visits(record, after):
                aggregate.changed[visit] = self.originator_version

    class DeviationFlagged(Event):
        deviation_id: str
        code: str
        severity: str
        evidence: list[str]
        detail: str

        def apply(self, aggregate: Any) -> None:
            aggregate.deviations[self.deviation_id] = {
                "deviation_id": self.deviation_id, "code": self.code,
                "severity": self.severity, "evidence": list(self.evidence),
                "detail": self.detail, "detected_at": self.timestamp.isoformat(),
                "status": "open", "resolution": None,
            }

    class DeviationResolved(Event):
        deviation_id: str
        resolution: str

        def apply(self, aggregate: Any) -> None:
            deviation = aggregate.deviations[self.deviation_id]
            deviation["status"] = "resolved"
            deviation["resolution"] = self.resolution

    class ReminderSent(Event):
        visit: str
        kind: str
        recipients: list[str]

        def apply(self, aggregate: Any) -> None:
            aggregate.reminders.append(f"{self.visit}/{self.kind}")

    class VisitMissed(Event):
        visit: str

        def apply(self, aggregate: Any) -> None:
            aggregate.missed_visits.append(self.visit)

    class VisitMissedRetracted(Event):
        """A visit marked missed is missed no longer: a correction of the registration
        date moved its window, which has not closed yet, or a correction of a visit's code
        moved that visit's data to it, or its data was recorded after the mark (``cause``
        says which): a visit held is not missed (held after its window closed, it is out of
        its window, a deviation of its own)."""

        visit: str
        cause: str

        def apply(self, aggregate: Any) -> None:
            aggregate.missed_visits.remove(self.visit)
            retracted = aggregate.missed_retractions
            retracted[self.visit] = retracted.get(self.visit, 0) + 1

    class QueryRaised(Event):
        query_id: str
        text: str
        target: dict[str, Any]

        def apply(self, aggregate: Any) -> None:
            aggregate.queries[self.query_id] = {
                "query_id": self.query_id, "status": "open", "target": dict(self.target),
                "opened_at": self.timestamp.isoformat(), "opened_by": self.actor,
                "thread": [{"action": "raise", "by": self.actor,
                            "at": self.timestamp.isoformat(), "text": self.text}],
            }

    class QueryEvent(Event):
        """A step of a query after it was raised; ``action`` names it."""

        query_id: str
        text: str | None
        action = ""

        def apply(self, aggregate: Any) -> None:
            query = aggregate.queries[self.query_id]
            query["status"] = QUERY_TRANSITIONS[self.action][1]
            # A step's text, or its reason where it has none; both where it has both (a
            # reopening's reason is required, its text not).
            message = {"action": self.action, "by": self.actor,
                       "at": self.timestamp.isoformat(),
                       "text": self.text if self.text is not None else self.reason}
            if self.text is not None and self.reason:
                message["reason"] = self.reason
            query["thread"].append(message)

    class QueryAnswered(QueryEvent):
        action = "respond"

    class QueryClosed(QueryEvent):
        action = "close"

    class QueryReopened(QueryEvent):
        action = "reopen"

    class QueryCancelled(QueryEvent):
        action = "cancel"

    class SourceVerified(Event):
        visit: str

        def apply(self, aggregate: Any) -> None:
            aggregate.verified[self.visit] = self.originator_version

    class RecordSigned(Event):
        """An electronic signature: who (login and printed name), its meaning, when (the
        event's time), the version signed and a SHA-256 of the signed data."""

        scope: str
        meaning: str
        signed_by: str
        printed_name: str
        signed_version: int
        data_sha256: str

        def apply(self, aggregate: Any) -> None:
            aggregate.signatures[self.scope] = {
                "signed_by": self.signed_by, "printed_name": self.printed_name,
                "meaning": self.meaning, "signed_at": self.timestamp.isoformat(),
                "valid": True, "signed_version": self.signed_version,
                "data_sha256": self.data_sha256,
            }

    class SignatureInvalidated(Event):
        scope: str
        cause: str

        def apply(self, aggregate: Any) -> None:
            signature = aggregate.signatures[self.scope]
            signature["valid"] = False
            signature["cause"] = self.cause  # why: corrected, new data, unlocked

    class ScopeLocked(Event):
        scope: str

        def apply(self, aggregate: Any) -> None:
            aggregate.locks.append(self.scope)

    class ScopeUnlocked(Event):
        scope: str

        def apply(self, aggregate: Any) -> None:
            aggregate.locks.remove(self.scope)

    class Snapshot(AggregateSnapshot):
        """The participant's state at a version, so that a long record loads from it and
        the events after it. Stored as JSON, whose object keys are text: the records,
        keyed by version, get their integer keys back. Its state names the code that
        derived it (``DERIVED_BY``, see ``derivation``); that name is not the
        participant's."""

        def mutate(self, _: None) -> Any:
            participant: Any = super().mutate(_)
            participant.__dict__.pop(DERIVED_BY, None)
            participant.records = {int(v): r for v, r in participant.records.items()}
            return participant

    if TYPE_CHECKING:  # set by the events; not annotated at run time (see chain.py)
        participant_id: str
        site_id: str
        status: str
        eligible: bool
        failed_criteria: list[str]
        records: dict[int, dict[str, Any]]  # by the version of the capturing event
        screening_record: int
        consent_record: int | None  # the latest consent (a re-consent after an amendment)
        first_consent_record: int | None
        registration_record: int | None
        arm: str | None
        allocation_index: int | None
        withdrawals: dict[str, int]
        deviations: dict[str, dict[str, Any]]
        reminders: list[str]
        missed_visits: list[str]
        missed_retractions: dict[str, int]
        corrected: list[int]  # versions of the captured events corrected since
        queries: dict[str, dict[str, Any]]
        verified: dict[str, int]
        changed: dict[str, int]
        signatures: dict[str, dict[str, Any]]
        locks: list[str]

    def trigger_event(self, event_class: type[Any], **kwargs: Any) -> None:
        """As every aggregate's; and new data in a signed casebook invalidates its
        signature in the same command (it no longer holds what was signed)."""
        super().trigger_event(event_class, **kwargs)
        casebook = self.signatures.get("casebook") if hasattr(self, "signatures") else None
        if issubclass(event_class, Participant.Capture) and casebook and casebook["valid"]:
            audit = {k: kwargs[k] for k in ("command_id", "actor", "reason", "timestamp")}
            super().trigger_event(self.SignatureInvalidated, scope="casebook",
                                  cause="new data", **audit)

    # --- derived views -------------------------------------------------------------------

    def data_of(self, version: int | None) -> dict[str, Any]:
        return self.records[version]["data"] if version else {}

    def event_id_of(self, version: int | None) -> str | None:
        return event_uuid(self.id, version) if version else None

    def version_of(self, event_id: str) -> int | None:
        """The version of a data-capturing event, from its id (ids are derived, not stored,
        so that replaying an event costs no hashing)."""
        return next((v for v in self.records if event_uuid(self.id, v) == event_id), None)

    @property
    def screening_event(self) -> str:
        return event_uuid(self.id, self.screening_record)

    @property
    def consent_event(self) -> str | None:
        return self.event_id_of(self.consent_record)

    @property
    def registration_event(self) -> str | None:
        return self.event_id_of(self.registration_record)

    def records_of(self, *types: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for version, record in self.records.items():
            if record["type"] in types:
                yield event_uuid(self.id, version), record["data"]

    @property
    def screening(self) -> dict[str, Any]:
        return self.data_of(self.screening_record)

    def eligibility_now(self, protocol: Protocol) -> tuple[bool, list[str]]:
        """The screening outcome of the record as it stands: the recorded one, or, once the
        screening data was corrected, every criterion evaluated again on ``screened_on``."""
        if self.screening_record not in self.corrected:
            return self.eligible, list(self.failed_criteria)
        return screening_outcome(self.screening, protocol)

    def failed_on(self, registered_on: date, protocol: Protocol) -> list[str]:
        """The criteria the record as it stands fails for a registration on
        ``registered_on``: the time-relative ones on that day, the others as screened (a
        corrected screening evaluated again on ``screened_on``)."""
        failed = eligibility.failed_criteria(
            self.screening["eligibility"], self.screening["birth_date"], registered_on,
            protocol.eligibility, only=eligibility.TIME_RELATIVE,
        )
        return failed + [c for c in self.eligibility_now(protocol)[1]
                         if c not in eligibility.TIME_RELATIVE]

    @property
    def registered_on(self) -> date | None:
        registered: date | None = self.data_of(self.registration_record).get("registered_on")
        return registered

    @property
    def consented_on(self) -> date | None:
        signed: date | None = self.data_of(self.consent_record).get("signed_on")
        return signed

    @property
    def first_consented_on(self) -> date | None:
        """The day the participant first consented; a re-consent (a protocol amendment)
        does not move it."""
        signed: date | None = self.data_of(self.first_consent_record).get("signed_on")
        return signed

    def withdrawn_on(self, scope: str) -> date | None:
        withdrawn: date | None = self.data_of(self.withdrawals.get(scope)).get("withdrawn_on")
        return withdrawn

    def completed_visits(self) -> dict[str, dict[str, Any]]:
        return {d["visit"]: {**d, "event_id": e} for e, d in self.records_of("VisitCompleted")}

    def scores(self) -> dict[str, dict[str, float | None]]:
        return {
            code: visit_scores(v.get("bpi_sf"), v.get("fact_es"))
            for code, v in self.completed_visits().items()
        }

    # --- commands ------------------------------------------------------------------------

    @classmethod
    def screen(
        cls, participant_id: str, data: Mapping[str, Any], protocol: Protocol, audit: Audit
    ) -> Participant:
        _require_dated(data, audit)
        _require_in_order(data, "birth_date", "data.birth_date")
        eligible, failed = screening_outcome(data, protocol)
        return cls._create(
            cls.ParticipantScreened, id=participant_uuid(participant_id),
            participant_id=participant_id, data=dict(data), eligible=eligible,
            failed_criteria=failed, **audit.event_fields(),
        )

    def rescreen(self, data: Mapping[str, Any], protocol: Protocol, audit: Audit) -> None:
        self.require_unlocked()
        # A screening a correction made ineligible before this code recorded its outcome
        # again (ScreeningReassessed) is a screen failure too.
        failed_as_corrected = (self.status == "screened"
                               and not self.eligibility_now(protocol)[0])
        if self.status != "screen_failed" and not failed_as_corrected:
            raise InvalidTransition(
                f"participant {self.participant_id} is already screened (status {self.status}); "
                "a rescreen is accepted only after a screen failure"
            )
        if data["site_id"] != self.site_id:
            message = f"must be the participant's site, {self.site_id}"
            raise ValidationFailed({"data.site_id": [message]})
        _require_dated(data, audit)
        _require_in_order(data, "birth_date", "data.birth_date")
        before = self.screening["screened_on"]
        if data["screened_on"] < before:
            raise ValidationFailed({"data.screened_on": [
                f"screened_on must not be before the screening it follows ({before})"]})
        eligible, failed = screening_outcome(data, protocol)
        self.trigger_event(self.ParticipantRescreened, data=dict(data), eligible=eligible,
                           failed_criteria=failed, **audit.event_fields())

    def record_consent(self, data: Mapping[str, Any], audit: Audit,
                       protocol: Protocol | None = None) -> None:
        """Records a consent. A first consent enrols: the screening must be eligible as it
        stands, a corrected one evaluated again by ``protocol`` (the service gives it; a
        re-consent after an amendment is recorded whatever the screening shows). A screen
        failure whose screening a correction made eligible is consented as a screening
        found eligible is (the correction says the failure was an error of entry): its
        status says so since ScreeningReassessed, not on a record corrected before."""
        self.require_unlocked()
        corrected_eligible = (self.status == "screen_failed" and protocol is not None
                              and self.screening_record in self.corrected
                              and self.eligibility_now(protocol)[0])
        if not corrected_eligible:
            self._refuse_screen_failure("consented", protocol)
        self._require_status("record consent", "screened", "consented", *ACTIVE, "completed",
                             *(("screen_failed",) if corrected_eligible else ()))
        if self.status == "screened" and protocol is not None:
            self._require_eligible_now(protocol)
        _require_dated(data, audit)
        self.trigger_event(self.ConsentRecorded, data=dict(data), **audit.event_fields())

    def randomize(
        self, data: Mapping[str, Any], sequence: AllocationSequence, seed: bytes,
        protocol: Protocol, audit: Audit,
    ) -> None:
        self.require_unlocked()
        self._refuse_screen_failure("randomized")
        self._require_status("randomize", "consented")
        registered_on: date = data["registered_on"]
        _require_dated(data, audit)
        self._require_step_order("registered_on", registered_on, "data.registered_on")
        failed = self.failed_on(registered_on, protocol)
        medications = [d for _, d in self.records_of("MedicationReported")]
        washout_failed = eligibility.washout_failures(
            medications, registered_on, protocol.eligibility
        )
        if washout_failed and "b12_washout" not in failed:
            failed.append("b12_washout")
        if failed:
            raise NotEligible(
                f"participant {self.participant_id} is not eligible on {registered_on}: "
                + ", ".join(failed), failed_criteria=failed,
            )
        index, arm = sequence.draw(self.participant_id, seed, protocol.randomization, audit)
        self.trigger_event(self.ParticipantRandomized, data=dict(data), arm=arm,
                           allocation_index=index, **audit.event_fields())

    def record_blood_sample(self, data: Mapping[str, Any], protocol: Protocol,
                            audit: Audit) -> None:
        self._require_status("record a blood sample", "consented", *ACTIVE, "completed")
        _require_visit(protocol, data["timepoint"], "data.timepoint")
        self.require_unlocked(data["timepoint"])  # the sample belongs to its visit
        _require_dated(data, audit)
        self.trigger_event(self.BloodSampleCollected, data=dict(data), **audit.event_fields())
        self.invalidate_signatures([visit_key(data["timepoint"])], "new data", audit)

    def record_dose(self, data: Mapping[str, Any], audit: Audit) -> None:
        self.require_unlocked()
        self._require_status("record a dose", *ACTIVE, "completed")
        taken_on: date = data["taken_on"]
        _require_dated(data, audit)
        self._require_no_dose_after_withdrawal(taken_on)
        self._require_no_dose_on(taken_on)
        self.trigger_event(self.DoseRecorded, data=dict(data), **audit.event_fields())

    def complete_visit(self, data: Mapping[str, Any], protocol: Protocol, audit: Audit) -> None:
        """Records a visit's data; once the last visit has completed the study, an earlier
        one is still recorded (a form entered late), as doses and samples are."""
        self._require_status("complete a visit", *ACTIVE, "completed")
        code = data["visit"]
        _require_visit(protocol, code, "data.visit")
        self.require_unlocked(code)
        if code in self.completed_visits():
            raise InvalidTransition(
                f"visit {code} is already completed; use CorrectData to change it"
            )
        _require_dated(data, audit)
        self.trigger_event(
            self.VisitCompleted, data=dict(data), completes_study=code == protocol.visits[-1].code,
            **audit.event_fields(),
        )
        if code in self.missed_visits:  # a form entered after the clock marked it missed
            self._retract_miss(code, f"the visit held on {data['completed_on']} was recorded "
                                     "after the mark", audit)

    def report_medication(self, data: Mapping[str, Any], audit: Audit) -> None:
        self.require_unlocked()
        self._require_status("report a medication", "screened", "consented", *ACTIVE,
                             "completed")
        _require_dated(data, audit)
        _require_taken_in_order(data, "data.stopped_on")
        self.trigger_event(self.MedicationReported, data=dict(data), **audit.event_fields())

    def withdraw(self, data: Mapping[str, Any], audit: Audit) -> None:
        self.require_unlocked()
        if data["scope"] == "treatment":
            self._require_status("withdraw from treatment", "randomized")
        else:
            self._require_status("withdraw from the study", "screened", "consented", *ACTIVE)
        _require_dated(data, audit)
        self._require_withdrawn_after_entry(data, "data.withdrawn_on")
        self.trigger_event(self.ParticipantWithdrawn, data=dict(data), **audit.event_fields())

    def correct_data(self, data: Mapping[str, Any], audit: Audit,
                     rule: CorrectionRule | None = None) -> None:
        """Records a new value for a field of a captured event. ``rule`` validates it as
        the original command's field would; without one the value must keep the type of
        the value it corrects (a field the record holds)."""
        if not audit.gives_reason:
            raise ValidationFailed({"reason": ["is required for CorrectData"]})
        target = data["event_id"]
        version = self.version_of(target)
        record = self.records[version] if version is not None else None
        if version is None or record is None:
            raise ValidationFailed(
                {"data.event_id": ["is not a data-capturing event of this participant"]}
            )
        self.require_unlocked(visit_of(record))
        path: str = data["field"]
        if path.split(".")[0] in LOCKED_FIELDS:
            raise ValidationFailed({"data.field": [f"{path!r} can't be corrected"]})
        previous = _lookup(record["data"], path)
        if rule is None:
            _walk(record["data"], path)
            value = _like(previous, data["value"])
        else:
            value = rule(record["type"], path, data["value"], record["data"])
        if previous == value:
            raise ValidationFailed({"data.value": ["is the value already recorded"]})
        self._require_correctable(version, record, path, value, audit)
        visits = _changed_visits(record, _corrected_record(record, path, value))
        for visit in visits:  # a blood sample moved to another visit changes that one too
            self.require_unlocked(visit)
        self.trigger_event(
            self.DataCorrected, target_event_id=target, field=path,
            previous_value=copy.deepcopy(previous), value=copy.deepcopy(value),
            **audit.event_fields(),
        )
        self.invalidate_signatures([*map(visit_key, visits), "casebook"], "corrected", audit)

    def flag_deviation(
        self, deviation_id: str, code: str, severity: str, evidence: list[str], detail: str,
        audit: Audit,
    ) -> bool:
        """Flags a deviation once; False when it was flagged before."""
        if deviation_id in self.deviations:
            return False
        self.trigger_event(self.DeviationFlagged, deviation_id=deviation_id, code=code,
                           severity=severity, evidence=list(evidence), detail=detail,
                           **audit.event_fields())
        return True

    def resolve_deviation(self, data: Mapping[str, Any], audit: Audit) -> None:
        deviation = self.deviations.get(data["deviation_id"])
        if deviation is None:
            message = "is not a deviation of this participant"
            raise ValidationFailed({"data.deviation_id": [message]})
        if deviation["status"] != "open":
            raise InvalidTransition(f"deviation {data['deviation_id']} is already resolved")
        self.trigger_event(self.DeviationResolved, deviation_id=data["deviation_id"],
                           resolution=data["resolution"], **audit.event_fields())

    def record_reminder_sent(self, visit: str, kind: str, recipients: list[str],
                             audit: Audit) -> bool:
        """Records a sent reminder once; False when it was recorded before."""
        if f"{visit}/{kind}" in self.reminders:
            return False
        self.trigger_event(self.ReminderSent, visit=visit, kind=kind,
                           recipients=list(recipients), **audit.event_fields())
        return True

    def reassess_completion(self, protocol: Protocol, audit: Audit) -> None:
        """After a correction of a visit's code: the study is completed when, and only
        when, the last visit's data is recorded (for a participant not withdrawn)."""
        completes = protocol.visits[-1].code in self.completed_visits()
        if (self.status == "completed") != completes and self.status in (*ACTIVE,
                                                                        "completed"):
            self.trigger_event(self.StudyCompletionReassessed, completed=completes,
                               **audit.event_fields())

    def reassess_screening(self, protocol: Protocol, audit: Audit) -> None:
        """After a correction of the screening's data, before a consent: its outcome
        evaluated again, recorded when it changed (the status follows it)."""
        if self.status not in ("screened", "screen_failed"):
            return
        eligible, failed = self.eligibility_now(protocol)
        if eligible != self.eligible or failed != self.failed_criteria:
            self.trigger_event(self.ScreeningReassessed, eligible=eligible,
                               failed_criteria=failed, **audit.event_fields())

    def retract_open_misses(self, protocol: Protocol, today: date, audit: Audit) -> None:
        """After a correction of the registration date: each visit marked missed whose
        window, as the record now schedules it, has not closed by ``today`` (the day ended
        everywhere) is missed no longer; the clock marks it again if it closes unvisited."""
        ends = window_ends(protocol, self.registered_on)
        for visit in list(self.missed_visits):
            if visit in ends and ends[visit] >= today:
                self._retract_miss(visit, f"registration date corrected to "
                                          f"{self.registered_on}: the window now ends on "
                                          f"{ends[visit]}", audit)

    def retract_miss_moved_onto(self, visit: str, audit: Audit) -> None:
        """After a correction of a visit's code to ``visit``: marked missed, it now holds
        the data moved there from the visit it was keyed under; it was not missed."""
        held = self.completed_visits().get(visit)
        if held is not None and visit in self.missed_visits:
            self._retract_miss(visit, f"a correction moved the data of the visit held on "
                                      f"{held['completed_on']} here", audit)

    def _retract_miss(self, visit: str, cause: str, audit: Audit) -> None:
        """The visit's missed mark retracted, and its open `visit_missed` deviation
        resolved, saying why."""
        self.require_unlocked(visit)  # the mark is the locked visit's record
        flagged = deviation_uuid(self.id, "visit_missed", visit,
                                 self.missed_retractions.get(visit, 0))
        self.trigger_event(self.VisitMissedRetracted, visit=visit, cause=cause,
                           **audit.event_fields())
        if self.deviations.get(flagged, {}).get("status") == "open":
            self.trigger_event(self.DeviationResolved, deviation_id=flagged,
                               resolution=f"missed mark retracted: {cause}",
                               **audit.event_fields())

    def record_visit_missed(self, visit: str, audit: Audit) -> bool:
        if visit in self.missed_visits or visit in self.completed_visits():
            return False
        self.require_unlocked(visit)  # the mark is the visit's record
        self.trigger_event(self.VisitMissed, visit=visit, **audit.event_fields())
        return True

    # --- guards --------------------------------------------------------------------------

    def require_field(self, version: int, path: str,
                      defined: FieldDefined | None = None) -> None:
        """Refuses a dotted path that names no field of a captured record: none the record
        holds, nor (``defined``) any its command may carry: a query may well ask about a
        field the record left out."""
        record = self.records[version]
        if _holds(record["data"], path) or (defined is not None
                                            and defined(record["type"], path)):
            return
        raise ValidationFailed({"data.field": [f"{path!r} is not a field of {record['type']}"]})

    def _require_correctable(self, version: int, record: Mapping[str, Any], path: str,
                             value: Any, audit: Audit) -> None:
        """A corrected value keeps the rules the command that recorded it applies against
        the rest of the record: no date after today, the steps' dates in order, one dose a
        day, no dose after a withdrawal. A withdrawal's own date is what happened, whatever
        doses were recorded after it (late news that the protocol wasn't followed is
        recorded, as a withdrawal dated before them is)."""
        misdated = _misdated(value, audit)
        if misdated:
            raise ValidationFailed({"data.value": [f"{where}: {message}" if where else message
                                                   for where, message in misdated.items()]})
        if self._step_records().get(path) == version:
            self._require_step_order(path, value, "data.value")
        elif record["type"] in SCREENINGS and path in ("birth_date", "screened_on"):
            # a screening a rescreen followed: its own dates in order, as its command's were
            own = {name: record["data"].get(name) for name in ("birth_date", "screened_on")}
            _require_in_order({**own, path: value}, path, "data.value")
        if record["type"] == "VisitCompleted" and path == "visit" \
                and value in self.completed_visits():
            raise InvalidTransition(f"visit {value} is already completed; correct that "
                                    "visit's code first, or its data")
        if record["type"] == "DoseRecorded" and path == "taken_on":
            self._require_no_dose_on(value)
            self._require_no_dose_after_withdrawal(value)
        if path == "registered_on" and version == self.registration_record:
            self._require_entered_before_leaving(value)
        if path == "screened_on" and record["type"] in SCREENINGS:
            self._require_screenings_in_order(version, value)
        if record["type"] == "MedicationReported" and path in ("started_on", "stopped_on"):
            _require_taken_in_order({**record["data"], path: value}, "data.value")
        if record["type"] == "ParticipantWithdrawn" and path == "withdrawn_on":
            self._require_withdrawn_after_entry({**record["data"], path: value}, "data.value")

    def _step_records(self) -> dict[str, int | None]:
        """The record that holds each date DATE_ORDER names (a field of the same name)."""
        return {"birth_date": self.screening_record, "screened_on": self.screening_record,
                "signed_on": self.first_consent_record,
                "registered_on": self.registration_record}

    def _require_step_order(self, name: str, value: Any, key: str) -> None:
        """The dates of the record stay in DATE_ORDER with ``value`` as ``name``."""
        dates = {n: self.data_of(v).get(n) for n, v in self._step_records().items()}
        _require_in_order({**dates, name: value}, name, key)

    def _require_no_dose_after_withdrawal(self, day: date) -> None:
        """No dose is recorded, or corrected, to a day after a withdrawal from treatment or
        from the study (one dated on or before it is a late diary entry)."""
        for scope in self.withdrawals:
            stopped = self.withdrawn_on(scope)
            if stopped is not None and day > stopped:
                raise InvalidTransition(
                    f"a dose on {day} is after the {scope} withdrawal on {stopped}")

    def _require_entered_before_leaving(self, registered_on: date) -> None:
        """A registration corrected to a day after a withdrawal (from treatment or from the
        study): the order a withdrawal's own date is held to, from the other side."""
        for scope in ("treatment", "study"):
            left = self.withdrawn_on(scope)
            if left is not None and registered_on > left:
                raise ValidationFailed({"data.value": [
                    f"registered_on must not be after the {scope} withdrawal ({left})"]})

    def _require_screenings_in_order(self, version: int, screened_on: date) -> None:
        """A screening's date corrected keeps it between the screening it follows and the
        rescreen that follows it, and the current one not after a study withdrawal."""
        dates = {v: r["data"]["screened_on"] for v, r in sorted(self.records.items())
                 if r["type"] in SCREENINGS}
        versions = list(dates)
        at = versions.index(version)
        before = dates[versions[at - 1]] if at > 0 else None
        after = dates[versions[at + 1]] if at + 1 < len(versions) else None
        left = self.withdrawn_on("study") if version == self.screening_record else None
        if before is not None and screened_on < before:
            rule = f"must not be before the screening it follows ({before})"
        elif after is not None and screened_on > after:
            rule = f"must not be after the rescreen that follows it ({after})"
        elif left is not None and screened_on > left:
            rule = f"must not be after the study withdrawal ({left})"
        else:
            return
        raise ValidationFailed({"data.value": [f"screened_on {rule}"]})

    def _require_withdrawn_after_entry(self, data: Mapping[str, Any], key: str) -> None:
        """A withdrawal is not dated before the registration (from treatment, or from the
        study once registered), nor before the screening; and the study is not left before
        the treatment (nor the treatment after the study)."""
        registered = data["scope"] == "treatment" or self.registered_on is not None
        step = "registered_on" if registered else "screened_on"
        entered = (self.registered_on if step == "registered_on"
                   else self.screening["screened_on"])
        if entered is not None and data["withdrawn_on"] < entered:
            raise ValidationFailed({key: [
                f"withdrawn_on must not be before {step} ({entered})"]})
        if data["scope"] == "study":
            off_treatment = self.withdrawn_on("treatment")
            if off_treatment is not None and data["withdrawn_on"] < off_treatment:
                rule = f"must not be before the treatment withdrawal ({off_treatment})"
                raise ValidationFailed({key: [f"withdrawn_on {rule}"]})
        else:
            left = self.withdrawn_on("study")
            if left is not None and data["withdrawn_on"] > left:
                rule = f"must not be after the study withdrawal ({left})"
                raise ValidationFailed({key: [f"withdrawn_on {rule}"]})

    def _require_no_dose_on(self, day: date) -> None:
        """One dose record per day."""
        if any(d["taken_on"] == day for _, d in self.records_of("DoseRecorded")):
            raise InvalidTransition(
                f"a dose is already recorded for {day}; use CorrectData to change it"
            )

    def _require_eligible_now(self, protocol: Protocol) -> None:
        """A screening a correction made ineligible is not consented."""
        eligible, failed = self.eligibility_now(protocol)
        if not eligible:
            raise NotEligible(
                f"participant {self.participant_id}'s screening, as corrected, fails "
                f"{', '.join(failed)}: can't be consented", failed_criteria=failed,
            )

    def _refuse_screen_failure(self, what: str, protocol: Protocol | None = None) -> None:
        """A screen failure is refused, naming the criteria the screening fails as it
        stands (as corrected, when ``protocol`` is given), or else as screened."""
        if self.status == "screen_failed":
            failed = (self.eligibility_now(protocol)[1] if protocol is not None
                      else list(self.failed_criteria))
            raise NotEligible(
                f"participant {self.participant_id} failed screening ({', '.join(failed)}) "
                f"and can't be {what}", failed_criteria=failed,
            )

    def _require_status(self, action: str, *allowed: str) -> None:
        if self.status not in allowed:
            raise InvalidTransition(
                f"can't {action} for participant {self.participant_id} "
                f"in status {self.status}"
            )


def visit_of(record: Mapping[str, Any]) -> str | None:
    """The visit whose data a captured record is: a completed visit's, or a blood sample's
    timepoint."""
    if record["type"] == "VisitCompleted":
        return str(record["data"]["visit"])
    if record["type"] == "BloodSampleCollected":
        return str(record["data"]["timepoint"])
    return None


def _changed_visits(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """The visits whose data a correction changes: the record's, and the one a blood sample
    moves to when its timepoint is corrected."""
    return [v for v in dict.fromkeys((visit_of(before), visit_of(after))) if v is not None]


def _corrected_record(record: Mapping[str, Any], path: str, value: Any) -> dict[str, Any]:
    """The record with ``value`` at ``path``, in a copy of its data (copy on write: the
    captured event stays as it was)."""
    data = copy.deepcopy(record["data"])
    place(data, path, copy.deepcopy(value))
    return {**record, "data": data}


def _like(previous: Any, value: Any) -> Any:
    """``value`` in the type of the value it corrects (dates arrive as ISO strings)."""
    if previous is None or value is None:
        return value
    kinds: tuple[tuple[type, ...], ...] = ((bool,), (int, float), (str,), (dict,), (list,))
    if isinstance(previous, date):
        parse = datetime.fromisoformat if isinstance(previous, datetime) else date.fromisoformat
        if isinstance(value, date) and isinstance(value, datetime) == isinstance(previous,
                                                                                 datetime):
            return value
        try:
            return parse(value) if isinstance(value, str) else _not_like(previous)
        except ValueError:
            return _not_like(previous)
    for kind in kinds:
        if isinstance(previous, kind):
            bool_mismatch = isinstance(value, bool) != isinstance(previous, bool)
            return value if isinstance(value, kind) and not bool_mismatch else _not_like(previous)
    return value


def _not_like(previous: Any) -> Any:
    kind = "an ISO 8601 date" if isinstance(previous, date) else type(previous).__name__
    raise ValidationFailed({"data.value": [f"must be {kind}, like the recorded value"]})


def _dates_in(value: Any, path: str = "") -> Iterator[tuple[str, date]]:
    """Every date and date-time in a value, with its dotted path inside it."""
    if isinstance(value, date):  # a datetime too
        yield path, value
    elif isinstance(value, (Mapping, list)):
        items = value.items() if isinstance(value, Mapping) else enumerate(value)
        for key, item in items:
            yield from _dates_in(item, f"{path}.{key}" if path else str(key))


def _misdated(value: Any, audit: Audit) -> dict[str, str]:
    """The dates in a value that a record can't hold, by path: a record captures what has
    happened, so no date is after today, nor before EARLIEST. A date is a site's calendar
    day, and the site may be anywhere: today is the latest date anywhere when the command
    is recorded (UTC+14). A date-time is an instant: none after the command's own (but
    for CLOCK_SKEW, a client's clock ahead of the server's)."""
    now = audit.recorded_at
    latest = (now.astimezone(UTC) + LATEST_ZONE).date()
    misdated = {}
    for path, day in _dates_in(value):
        if isinstance(day, datetime):
            moment = day if day.tzinfo else day.replace(tzinfo=UTC)
            if moment > now + CLOCK_SKEW:
                misdated[path] = f"must not be after the time it is recorded ({now.isoformat()})"
            elif moment.date() < EARLIEST:
                misdated[path] = f"must not be before {EARLIEST.isoformat()}"
        elif day > latest:
            misdated[path] = (f"must not be after today ({latest.isoformat()}, the latest "
                              "date anywhere now)")
        elif day < EARLIEST:
            misdated[path] = f"must not be before {EARLIEST.isoformat()}"
    return misdated


def _require_dated(data: Mapping[str, Any], audit: Audit) -> None:
    """Every date of a command's data passes ``_misdated``; a refusal names each field."""
    misdated = _misdated(data, audit)
    if misdated:
        raise ValidationFailed({f"data.{path}": [message] for path, message in misdated.items()})


def _require_taken_in_order(data: Mapping[str, Any], key: str) -> None:
    """A medication is not stopped before it was started."""
    started, stopped = data.get("started_on"), data.get("stopped_on")
    if started is not None and stopped is not None and stopped < started:
        raise ValidationFailed({key: [f"stopped_on must not be before started_on ({started})"]})


def _require_in_order(dates: Mapping[str, Any], name: str, key: str) -> None:
    """The dates DATE_ORDER pairs ``name`` with are in order (one not given is not
    compared); a refusal names ``key`` and says what ``name`` must be."""
    for earlier, later, same_day in DATE_ORDER:
        first, then = dates.get(earlier), dates.get(later)
        if name not in (earlier, later) or first is None or then is None:
            continue
        if then > first or (same_day and then == first):
            continue
        # The other date is quoted, but never the birth date: a contact detail, which a
        # role that may not see it would otherwise read back here.
        if name == later:
            shown = "" if earlier == "birth_date" else f" ({first})"
            rule = f"must {'not be before' if same_day else 'be after'} {earlier}{shown}"
        else:
            shown = "" if later == "birth_date" else f" ({then})"
            rule = f"must {'not be after' if same_day else 'be before'} {later}{shown}"
        raise ValidationFailed({key: [f"{name} {rule}"]})


# The key, in a snapshot's state, of the digest of the code that derived it.
DERIVED_BY = "derived_by"


def _code_digest() -> str:
    """A digest of the code that derives a participant's state from its events: this
    package's source and the event library's version."""
    library = importlib.metadata.version("eventsourcing")
    digest = hashlib.sha256(f"eventsourcing {library}".encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(f"\0{path.name}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# Taken as the code is imported: the files read are those of the code that runs (a
# release put in place later, under a process still running, is not this code).
_DERIVATION = _code_digest()


def derivation() -> str:
    """The digest of this code (see ``_code_digest``). A snapshot taken by other code (a
    release since, whose ``apply`` may derive otherwise) is not used: the participant
    loads from its events, as if there were no snapshot."""
    return _DERIVATION


def derived_here(snapshot: Any) -> bool:
    """Whether this code derived the snapshot (see ``derivation``)."""
    return bool(snapshot.state.get(DERIVED_BY) == derivation())


def _require_visit(protocol: Protocol, code: str, path: str) -> None:
    if protocol.visit(code) is None:
        raise ValidationFailed({path: [f"must be one of: {', '.join(protocol.visit_codes)}"]})


def screening_outcome(data: Mapping[str, Any], protocol: Protocol) -> tuple[bool, list[str]]:
    """Whether the screening's data are eligible, and the criteria they fail."""
    if protocol.site(data["site_id"]) is None:
        message = f"must be one of: {', '.join(protocol.site_ids)}"
        raise ValidationFailed({"data.site_id": [message]})
    failed = eligibility.failed_criteria(
        data["eligibility"], data["birth_date"], data["screened_on"], protocol.eligibility
    )
    if data["language"] not in protocol.languages:
        failed.append("questionnaire_language")
    return not failed, failed
