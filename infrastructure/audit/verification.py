"""Verification of every stored event of every stream: which participant and event broke
its chain and how (edited, deleted, reordered, inserted); a corrupt row is reported, never
crashed on.

Every stored state is encrypted with AES-GCM, which authenticates it, and carries its own
digest and the digest of the event before it. The default check decrypts each row (an
altered row no longer decrypts) and follows the declared links and versions (a deleted,
moved or copied row breaks them); it recomputes the digest of each stream's first event,
which covers the stream's id (no link does): without the cipher key no row can be edited,
moved or added unseen. The deep check also recomputes every digest from the event's content, which
catches an edit by someone holding the key who did not rewrite the digests. Any row whose
link fails is decoded and its digest recomputed in both, to say what happened to it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import date, datetime
from itertools import groupby
from typing import TYPE_CHECKING, Any
from uuid import UUID

import orjson
import sqlalchemy.exc
from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import get_topic
from sqlalchemy import func, select

from domain.access import Scope
from domain.chain import GENESIS, canonical_json, compute_digest
from domain.participant import Participant, event_uuid, participant_uuid
from domain.randomization import AllocationSequence, sequence_id
from domain.revocations import register_uuid
from domain.sealing import TopicAltered, unseal
from domain.service import TrialService, project
from domain.trial import trial_uuid
from infrastructure.store.outages import the_databases
from infrastructure.store.settings import Settings
from infrastructure.store.stored import (
    PARTICIPANT_TOPIC,
    LinkRow,
    StreamRange,
    Upcast,
    as_bytes,
    as_uuid,
    decode,
    decrypt,
    decrypter,
    events_table,
    link_rows,
    load_event,
    plain_content,
    plain_state,
    stored_events,
    stream_key_id,
    stream_ranges,
    stream_rows,
)

if TYPE_CHECKING:
    from infrastructure.store.bootstrap import Trialog

Progress = Callable[[int], None]


@dataclass
class Problem:
    kind: str  # edited | deleted | reordered | inserted | repeated | snapshot | lock |
    #            read_model | record | disclosure
    stream: str
    version: int
    notification_id: int | None
    detail: str
    participant_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class Allocations:
    """Each randomization (a participant's stream: its allocation index, arm, version and
    position), each participant's site (its stratum) and id, and each draw of the allocation
    sequences (a sequence's stream and index: the participant drawn for)."""

    randomized: dict[str, tuple[int, str, int, int]] = field(default_factory=dict)
    sites: dict[str, tuple[str, str]] = field(default_factory=dict)  # and its id
    drawn: dict[tuple[str, int], str] = field(default_factory=dict)

    def read(self, stream: str, version: int, notification_id: int, topic: str,
             text: bytes) -> None:
        """Notes what an event of these kinds says."""
        try:
            content = orjson.loads(text)
            if topic == _RANDOMIZED:
                self.randomized[stream] = (content["allocation_index"], content["arm"],
                                           version, notification_id)
            elif topic == _DRAWN:
                self.drawn[stream, content["index"]] = content["participant_id"]
            elif topic == _SCREENED and version == 1:
                self.sites[stream] = (content["data"]["site_id"], content["participant_id"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return  # a row that doesn't read is reported by the chain's check

    def merge(self, other: Allocations) -> None:
        self.randomized.update(other.randomized)
        self.sites.update(other.sites)
        self.drawn.update(other.drawn)


_RANDOMIZED = get_topic(Participant.ParticipantRandomized)
_DRAWN = get_topic(AllocationSequence.AllocationDrawn)
_SCREENED = get_topic(Participant.ParticipantScreened)
_ALLOCATION_KINDS = (_RANDOMIZED, _DRAWN, _SCREENED)


@dataclass
class VerifyReport:
    events_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    seconds: float | None = None
    deep: bool = False
    processes: int = 1
    # Deep: the snapshots not compared, never used by this code (another release's).
    snapshots_passed_over: int | None = None
    # How many rows decrypted: none of a store's, and it is another key's (or all altered).
    decrypted: int = 0
    # What the randomizations and the allocation draws say, read on the walk (see
    # ``check_allocations``).
    allocations: Allocations = field(default_factory=lambda: Allocations())

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        answer: dict[str, Any] = {"ok": self.ok, "events_checked": self.events_checked,
                                  "problems": [p.as_dict() for p in self.problems],
                                  "deep": self.deep, "processes": self.processes}
        if self.snapshots_passed_over is not None:
            answer["snapshots_passed_over"] = self.snapshots_passed_over
        if self.seconds is not None:
            answer["seconds"] = round(self.seconds, 3)
            answer["events_per_second"] = round(self.events_checked / self.seconds
                                                if self.seconds else 0.0)
        return answer


# What the chain check needs of one stored event: (previous digest, digest, whether the
# digest matches the content (None: not recomputed), the participant id if known, the
# command id if read).
Link = tuple[str, str, bool | None, str | None, str | None]


_DIGEST = b'"digest":"'
_PREVIOUS = b'"previous_digest":"'
_COMMAND = b'"command_id":"'


def declared_link(plain: bytes) -> Link | None:
    """The digests a stored state's JSON declares, read off the text (the audit fields
    come before the captured data, and quotes inside strings are escaped); None when they
    are not there. A misread can only break a link, and a broken link is re-checked by
    decoding the row."""
    d, p, c = plain.find(_DIGEST), plain.find(_PREVIOUS), plain.find(_COMMAND)
    if d < 0 or p < 0:
        return None
    d += len(_DIGEST)
    p += len(_PREVIOUS)
    c += len(_COMMAND)
    return (plain[p:plain.index(b'"', p)].decode(), plain[d:plain.index(b'"', d)].decode(),
            None, None, plain[c:plain.index(b'"', c)].decode() if c >= len(_COMMAND) else None)


def _deep_link(service: TrialService, stream: str, version: int, topic: str,
               state: bytes, text: bytes | None = None) -> Link:
    """Decodes to plain JSON values and recomputes the digest over the canonical text:
    equal, by construction, to ``compute_digest`` of the event (a unit test pins it).
    ``text``: the state already decrypted, if it was."""
    try:
        content = (plain_state(service.mapper, state) if text is None
                   else plain_content(text))
    except Upcast:  # the mapper's upcast event is what was digested
        return _link_of(decode(service.mapper, UUID(stream), version, topic, state))
    digest = content.pop("digest")
    content.update(originator_id=stream, originator_version=version, topic=topic)
    intact = hashlib.sha256(canonical_json(content).encode()).hexdigest() == digest
    return (content["previous_digest"], digest, intact, content.get("participant_id"),
            content.get("command_id"))


def _link_of(event: Any) -> Link:
    return (event.previous_digest, event.digest, compute_digest(event) == event.digest,
            getattr(event, "participant_id", None), getattr(event, "command_id", None))


class _StreamCheck:
    """Walks one stream in version order, checking versions, digests and links, and that
    each command's events are together: a command's record deleted, a retry of it is
    decided again, and its events are then recorded a second time, later (``repeated``)."""

    def __init__(self, service: TrialService, stream: UUID, report: VerifyReport) -> None:
        self.service = service
        self.originator_id = stream
        self.stream = str(stream)
        self.report = report
        self.last_version = 0
        self.last_position = 0  # the notification id of the stream's event before
        self.last_digest: str | None = GENESIS
        self.participant_id: str | None = None
        # Whether it is a participant's stream (its first row's kind): only there does
        # an event's participant name the stream's owner (a draw of an allocation
        # sequence names the participant drawn for).
        self.participant_stream: bool | None = None
        self.found: list[Problem] = []
        self.seen: dict[str, int] = {}
        self.commands: dict[str, int] = {}  # each command id: the version it began at
        self.last_command: str | None = None

    def load(self, version: int) -> Any | None:
        try:
            return load_event(self.service, self.originator_id, version)
        except Exception:  # noqa: BLE001 - unreadable: reported by the caller
            return None

    def problem(self, kind: str, version: int, notification_id: int | None, detail: str) -> None:
        self.found.append(Problem(kind, self.stream, version, notification_id, detail))

    def check(self, notification_id: int, version: int, link: Link | None) -> None:
        """``link`` is None when the row can't be read."""
        if version < 1:  # the library stores none there: the row was put in
            self.problem("inserted", version, notification_id,
                         "no event is stored below version 1")
            return
        if (link is not None and version == self.last_version + 1 and link[2] is not False
                and self.last_digest is not None and link[0] == self.last_digest
                and notification_id > self.last_position):
            # The next version, linked to the one before, later in the log: all is well
            # (most rows).
            self.participant_id = self.participant_id or self._owner(link[3])
            self.seen[link[1]] = self.last_version = version
            self.last_digest = link[1]
            self.last_position = notification_id
            if link[4] != self.last_command:
                self._command_began(version, notification_id, link[4])
            return
        found, before = len(self.found), self.last_position
        self.last_position = max(self.last_position, notification_id)
        self._check_link(notification_id, version, link)
        if link is not None and link[4] != self.last_command:
            # A row already found wrong (a copy of another event, say) is not repeated too.
            self._command_began(version, notification_id, link[4],
                                check=len(self.found) == found)
        if notification_id < before and len(self.found) == found:
            # A stream's events enter the log in version order (each after the one before
            # it committed): notification ids swapped between them reorder its history.
            self.problem("reordered", version, notification_id,
                         f"its position in the log ({notification_id}) comes before that "
                         f"of the version before it ({before})")

    def _check_link(self, notification_id: int, version: int, link: Link | None) -> None:
        if version > self.last_version + 1:
            missing = f"{self.last_version + 1}..{version - 1}"
            self.problem("deleted", version, notification_id, f"versions {missing} are missing")
            self.last_digest = None  # the link to the missing event can't be checked
        self.last_version = version
        if link is None:
            # Stored states are encrypted and authenticated: an altered one fails to decrypt.
            self.problem("edited", version, notification_id,
                         "the stored state was altered: it no longer decrypts or decodes")
            self.last_digest = None
            return
        linked = self.last_digest is None or link[0] == self.last_digest
        if link[2] is None and (not linked or self.last_digest is None):
            # A broken link, or one that can't be checked: the digest decides.
            event = self.load(version)
            link = _link_of(event) if event is not None else link
        _, digest, intact, participant_id, _ = link
        self.participant_id = self.participant_id or self._owner(participant_id)
        if intact is False:
            kind, detail = self._classify_broken(self.load(version), linked)
            self.problem(kind, version, notification_id, detail)
            self.last_digest = None
            return
        if not linked:
            self.problem("inserted", version, notification_id,
                         "the event does not follow the previous event of its stream")
        self.seen[digest] = version
        self.last_digest = digest

    def _command_began(self, version: int, notification_id: int, command_id: str | None,
                       check: bool = True) -> None:
        self.last_command = command_id
        if command_id is None:
            return
        first = self.commands.setdefault(command_id, version)
        if first != version and check:
            self.problem("repeated", version, notification_id,
                         f"command {command_id} was decided again: its events begin at "
                         f"version {first} too (a retry decided anew, as when the "
                         "command's record is deleted)")

    def _classify_broken(self, event: Any, linked: bool) -> tuple[str, str]:
        """Why an event's digest fails: a copy of another event, an event moved from
        another version, foreign content, or an edit."""
        if event is None:
            return "edited", "the stored state no longer decodes"
        if event.digest in self.seen:
            return "inserted", f"a copy of version {self.seen[event.digest]}"
        owner = self._owner(getattr(event, "participant_id", None)) or self.participant_id
        if owner is not None and participant_uuid(owner) != event.originator_id:
            return "inserted", f"the event belongs to participant {owner}'s stream"
        version = event.originator_version
        for other in range(1, version + 64):
            if other != version:
                probe = object.__new__(type(event))
                object.__setattr__(probe, "__dict__", dict(vars(event), originator_version=other))
                if compute_digest(probe) == event.digest:
                    return "reordered", f"the event was recorded as version {other}"
        if not linked:
            return "inserted", "the event does not belong to this stream"
        return "edited", "the event's content does not match its digest"

    def _owner(self, participant_id: str | None) -> str | None:
        return participant_id if self.participant_stream is not False else None

    def finish(self) -> None:
        if self.found and self.participant_id is None:
            first = self.load(1)
            self.participant_id = self._owner(getattr(first, "participant_id", None))
            stratum = getattr(first, "stratum", None)
            if stratum is not None:  # an allocation sequence's: named as such
                for problem in self.found:
                    problem.detail = f"allocation sequence of stratum {stratum}: " \
                                     f"{problem.detail}"
        for problem in self.found:
            problem.participant_id = self.participant_id
        self.report.problems.extend(self.found)


def _name_unknown_streams(service: TrialService, problems: list[Problem]) -> None:
    """Names the participant of problems in streams whose first event can't be read, from
    the read model's participant ids (a stream's id is derived from its participant's)."""
    from infrastructure.store.tables import participants

    unknown = {p.stream for p in problems if p.participant_id is None}
    if not unknown:
        return
    names = {}
    try:
        with service.recorder.datastore.engine.connect() as connection:  # type: ignore[attr-defined]
            for (pid,) in connection.execute(select(participants.c.participant_id)):
                stream = str(participant_uuid(pid))
                if stream in unknown:
                    names[stream] = pid
    except sqlalchemy.exc.DatabaseError:
        return  # no read models in this database
    for problem in problems:
        problem.participant_id = problem.participant_id or names.get(problem.stream)


def _row_link(service: TrialService, stream: str, key: Any, version: int,
              topic: str | None, state: bytes, text: bytes | None = None) -> Link | None:
    """The link of one row: recomputed over ``topic`` when it is given (every row of a
    deep check, a stream's first event otherwise), else as its decrypted text declares
    it. ``text``: the state already decrypted, if it was."""
    try:
        if topic is not None:
            return _deep_link(service, stream, version, topic, state, text)
        link = declared_link(decrypt(service.mapper, state))
        if link is None:
            event = load_event(service, stream_key_id(key), version)
            link = None if event is None else _link_of(event)
        return link
    except Exception:  # noqa: BLE001 - a corrupt row is reported, not raised
        return None


def _rows(service: TrialService, batch: int, streams: StreamRange,
          deep: bool) -> Iterator[LinkRow]:
    if not deep:
        return link_rows(service.recorder, batch, streams)
    return ((row.id, row.originator_id, row.originator_version, row.topic,
             as_bytes(row.state))
            for row in stream_rows(service.recorder, batch, streams=streams))


def _sealed_topic(decrypt_state: Any, state: bytes) -> tuple[str | None, bytes | None]:
    """The topic sealed in a row's state (see ``domain.sealing``) and the state decrypted
    without it; (None, None) when it does not decrypt."""
    try:
        return unseal(decrypt_state(state) if decrypt_state else state)
    except Exception:  # noqa: BLE001 - reported by the link's check
        return None, None


def verify(service: TrialService, batch: int = 5000, progress: Progress | None = None,
           streams: StreamRange = (None, None), deep: bool = False) -> VerifyReport:
    """Checks every stream (of the range of originator ids); ``deep`` recomputes every
    digest too."""
    report = VerifyReport(deep=deep)
    decrypt_state = decrypter(service.mapper.cipher) if service.mapper.cipher else None
    compressor = service.mapper.compressor
    check: _StreamCheck | None = None
    key: Any = None
    done = 0
    for notification_id, row_key, version, topic, state in _rows(service, batch, streams,
                                                                 deep):
        done += 1
        if done == batch:
            report.events_checked += done
            if progress is not None:
                progress(done)
            done = 0
        if row_key != key or check is None:
            if check is not None:
                check.finish()
            key = row_key
            check = _StreamCheck(service, stream_key_id(key), report)
        sealed, plain = _sealed_topic(decrypt_state, state)
        if sealed is not None and sealed != topic:
            check.problem("edited", version, notification_id,
                          f"the topic column was altered: it says {_kind(topic)}, the "
                          f"event was recorded as {_kind(sealed)}")
            topic = sealed  # what the digest covers
        link = text = None
        recompute = deep or version == 1
        if plain is not None:
            report.decrypted += 1
            try:
                text = compressor.decompress(plain) if compressor else plain
                if not recompute:  # most rows: the digests as the decrypted text declares
                    link = declared_link(text)
            except Exception:  # noqa: BLE001 - the slower path below decides
                link = text = None
        if link is None:
            link = _row_link(service, check.stream, row_key, version,
                             topic if recompute else None, state, text)
        if check.participant_stream is None:  # its first row's kind (version 1's)
            check.participant_stream = topic.startswith(PARTICIPANT_TOPIC)
        if text is not None and topic.endswith(_ALLOCATION_KINDS):  # (3 rows a participant)
            report.allocations.read(check.stream, version, notification_id, topic, text)
        check.check(notification_id, version, link)
    if check is not None:
        check.finish()
    report.events_checked += done
    if progress is not None and done:
        progress(done)
    _name_unknown_streams(service, report.problems)
    return report


def _verify_range(settings: Settings, streams: StreamRange, deep: bool) -> VerifyReport:
    """One worker process's share: the streams of one range of originator ids."""
    from infrastructure.store.bootstrap import bootstrap

    trialog = bootstrap(settings, migrate=False)
    try:
        return verify(trialog.service, streams=streams, deep=deep)
    finally:
        trialog.close()


def fork_is_safe() -> bool:
    """Forking copies only the calling thread: safe while it is the only one (a lock
    another thread holds would stay held in the child)."""
    return threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods()


def verify_parallel(settings: Settings, processes: int, progress: Progress | None = None,
                    deep: bool = False, start_method: str | None = None) -> VerifyReport:
    """``verify`` split by ranges of streams over ``processes`` processes (a stream is
    never split); progress is reported as each range finishes. The workers are forked when
    that is safe (milliseconds), else spawned (about a second: a new interpreter each).
    Each builds its own application and connections; the parent's objects are frozen out
    of the collector first, so a child never finalizes a connection it inherited."""
    report = VerifyReport(deep=deep, processes=processes)
    start_method = start_method or ("fork" if fork_is_safe() else "spawn")
    if start_method == "fork":
        gc.freeze()
    context = multiprocessing.get_context(start_method)
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        futures = [pool.submit(_verify_range, settings, streams, deep)
                   for streams in stream_ranges(processes * 4)]
        for future in as_completed(futures):
            part = future.result()
            report.events_checked += part.events_checked
            report.problems += part.problems
            report.allocations.merge(part.allocations)
            report.decrypted += part.decrypted
            if progress is not None:
                progress(part.events_checked)
    report.problems.sort(key=lambda p: (p.stream, p.version))
    return report


# The problems of a stream's chain of events (the others: a record's seal, the access
# log, the lock's copy, snapshots, read models).
CHAIN_KINDS = frozenset({"edited", "deleted", "reordered", "inserted", "repeated"})

# Below this many stored events, starting worker processes costs more than it saves.
PARALLEL_FROM = 100_000


def check_store(trialog: Trialog, processes: int | None = None,
                progress: Progress | None = None, deep: bool = False) -> VerifyReport:
    """Verifies the whole store, timed, in ``processes`` processes (default: one per CPU)
    when the store is big enough for that to pay: the default check only where workers
    can be forked (spawning one costs more than it saves there), the deep check always."""
    processes = processes or os.cpu_count() or 1
    start = time.perf_counter()
    if (processes > 1 and (deep or fork_is_safe())
            and stored_events(trialog.service.recorder) >= PARALLEL_FROM):
        report = verify_parallel(trialog.settings, processes, progress, deep=deep)
    else:
        report = verify(trialog.service, progress=progress, deep=deep)
    if report.events_checked and not report.decrypted:
        raise WrongKey(f"none of the {report.events_checked:,} stored events decrypts with "
                       "this TRIALOG_CIPHER_KEY: it is not the key this store was written "
                       "with (or every row was altered); nothing was checked")
    problems, passed_over = check_snapshots(trialog.service, deep)
    report.problems += (problems + check_records(trialog) + check_disclosures(trialog)
                        + check_allocations(report.allocations, trialog.service,
                                            trialog.protocol.study_id))
    if deep:
        report.problems += check_read_models(trialog) + check_feed(
            trialog, {p.stream for p in report.problems if p.kind in CHAIN_KINDS})
    report.snapshots_passed_over = passed_over if deep else None
    report.seconds = time.perf_counter() - start
    return report


class WrongKey(RuntimeError):
    """No stored event decrypts: the check would only say that each row is altered."""


def check_records(trialog: Trialog) -> list[Problem]:
    """The store against what was written beside its events: the bus's record of each
    command's answer (in the same transaction), the read models' version of each
    participant (after it), and the bus's copy of the database lock, which the commands
    obey. Without the key no event can be forged, but a stream's last events can be
    deleted, which leaves a valid shorter chain: the versions recorded beside it show
    what is missing. A lock's copy that disagrees with the trial's record is reported
    too, and so is a command's record that fails its seal (changed or made up outside
    trialog: it is no evidence, and the bus answers no retry of it). On a live store: what
    was recorded beside the streams is read before their ends (a command answered
    meanwhile has its events read too), and the lock's copy between two reads of the
    trial's record that agree."""
    from infrastructure.store.access_seals import seals_for
    from infrastructure.store.bus import SEALED_RECORD
    from infrastructure.store.tables import participants

    table = events_table(trialog.service.recorder)
    study = trialog.protocol.study_id
    trial_stream = trial_uuid(study)
    # The keys the bus records a trial-wide stream's commands under, and their streams.
    trial_wide = {f"trial:{study}": trial_stream, f"access:{study}": register_uuid(study)}
    # Per stream: the highest version recorded beside it, and by what (a command's
    # answer, written in the same transaction, before the read models').
    shown: dict[UUID, tuple[int, str, str | None]] = {}

    def beside(stream: UUID, version: Any, evidence: str, pid: str | None) -> None:
        if isinstance(version, int) and version > shown.get(stream, (0,))[0]:
            shown[stream] = (version, evidence, pid)

    seals = seals_for(trialog.engine)
    problems = []
    with trialog.engine.connect() as connection:
        for record in connection.execute(select(*SEALED_RECORD)):
            pid = record.participant_id
            trial = pid in trial_wide
            stream = trial_wide[pid] if trial else participant_uuid(pid)
            try:
                version = orjson.loads(record.response).get("version")
            except (orjson.JSONDecodeError, AttributeError):
                version = None
            if not seals.command_holds(record):
                problems.append(Problem(
                    "record", str(stream), version if isinstance(version, int) else 0, None,
                    f"the record of command {record.command_id} fails its seal: its answer, "
                    "fingerprint or participant was changed, or the row made up, outside "
                    "trialog (a retry of it is refused)", None if trial else pid))
                continue
            beside(stream, version,
                   f"command {record.command_id} was answered with version {version}",
                   None if trial else pid)
        for pid, version in connection.execute(select(participants.c.participant_id,
                                                      participants.c.version)):
            beside(participant_uuid(pid), version,
                   f"the read models hold the participant at version {version}", pid)
        connection.rollback()  # the ends read after, in a transaction of their own
        ends = {as_uuid(stream): version for stream, version in connection.execute(
            select(table.c.originator_id, func.max(table.c.originator_version))
            .group_by(table.c.originator_id))}
    for stream, (version, evidence, pid) in shown.items():
        end = ends.get(stream, 0)
        if version > end:
            problems.append(Problem("deleted", str(stream), end + 1, None,
                                    f"versions {end + 1}..{version} are missing: {evidence}",
                                    pid))
    lock = _lock_problem(trialog, trial_stream)
    return problems + ([lock] if lock else [])


def check_allocations(allocations: Allocations, service: TrialService,
                      study_id: str) -> list[Problem]:
    """Each randomization against its stratum's allocation sequence: the sequence's draw
    at its index must be for its participant. A stratum's last draws deleted leave a
    valid shorter chain, and the next randomization there is given a slot drawn before
    (its arm known): both show here, as the draw missing from the sequence. A draw the
    walk did not see is read again before it is reported: the walk's ranges are read at
    different moments (in processes, or batch by batch), and a randomization committed
    between two has its draw in a range read before it."""
    problems = []
    for stream, (index, arm, version, position) in sorted(allocations.randomized.items()):
        if stream not in allocations.sites:
            continue  # a stream whose first event can't be read: reported by the walk
        site, pid = allocations.sites[stream]
        sequence = str(sequence_id(study_id, site))
        drawn_for = allocations.drawn.get((sequence, index))
        if drawn_for == pid:
            continue
        try:
            drawn = load_event(service, UUID(sequence), index + 2)
        except Exception:  # noqa: BLE001, S112 - an unreadable draw: reported by the walk
            continue
        if drawn is not None:
            drawn_for = getattr(drawn, "participant_id", None)
            if drawn_for == pid:
                continue
        given = (f"; the sequence gives that draw to {drawn_for}, whose slot it was given "
                 "again" if drawn_for else "")
        problems.append(Problem(
            "deleted", sequence, index + 2, None,
            f"the draw {index} of stratum {site}'s allocation sequence is missing: "
            f"participant {pid} was randomized to {arm} with it (version {version}, "
            f"position {position}){given}", pid))
    return problems


def check_disclosures(trialog: Trialog) -> list[Problem]:
    """The access log's rows whose seal fails: who was shown a participant's contact
    details, changed or made up in the database outside trialog (a row deleted leaves no
    trace here)."""
    from infrastructure.store.access_seals import seals_for
    from infrastructure.store.tables import access_log, as_utc

    seals = seals_for(trialog.engine)
    problems = []
    with trialog.engine.connect() as connection:
        rows = connection.execution_options(yield_per=1000).execute(
            select(access_log).order_by(access_log.c.id))
        for row in rows:
            if not seals.disclosure_holds(row):
                problems.append(Problem(
                    "disclosure", str(participant_uuid(row.participant_id)), 0, None,
                    f"row {row.id} of the access log ({row.actor} shown the contact details "
                    f"at {as_utc(row.at).isoformat(timespec='seconds')} by {row.endpoint}) "
                    "fails its seal: "
                    "changed or made up outside trialog", row.participant_id))
    return problems


def _lock_problem(trialog: Trialog, trial_stream: UUID) -> Problem | None:
    """The bus's copy of the database lock against the trial's record, the copy read
    between two reads of the record at the same version (a lock or an unlock that
    commits meanwhile is read again)."""
    from infrastructure.store.tables import database_lock

    service = trialog.service
    for _ in range(5):
        try:
            database = service.database()
            with trialog.engine.connect() as connection:
                lock = connection.execute(
                    select(database_lock.c.locked_at)
                    .where(database_lock.c.study_id == trialog.protocol.study_id)).first()
            again = service.database()
        except Exception as error:  # noqa: BLE001 - an unreadable record is reported
            return Problem("lock", str(trial_stream), 0, None,
                           f"the trial's record can't be read ({type(error).__name__}): "
                           "whether the database is locked is not known")
        if (database and database.version) == (again and again.version):
            break
    recorded = database is not None and database.locked is not None
    copied = lock is not None and lock.locked_at is not None
    if recorded == copied:
        return None
    says = (f"locked by {database.locked['locked_by']} at {database.locked['locked_at']}"
            if database is not None and database.locked is not None else "unlocked")
    return Problem("lock", str(trial_stream), database.version if database else 0, None,
                   f"the database lock's copy says {'locked' if copied else 'unlocked'}; "
                   f"the trial's record says {says}")


def check_read_models(trialog: Trialog) -> list[Problem]:
    """Deep: each participant the read models hold at its newest version, replayed from
    its events, against what they serve (the lists, the summary, the CSV and FHIR exports
    read them): a value edited in a read model's table (an arm, a score, a deviation's
    status) is a `read_model` problem, and so is a row whose version is not the record's
    once the follower has passed all its events. A participant they hold at an older
    version (its follower behind, or it set aside) is compared with the record at that
    version; `trialog projections rebuild` writes them again
    from the events."""
    from infrastructure.readside.projections import TrialProjection, read_model_rows
    from infrastructure.readside.quarantine import quarantined_ids
    from infrastructure.store.tables import (
        deviations,
        participants,
        positions,
        queries,
        scores,
        visits,
    )

    keys = {participants: ("participant_id",), visits: ("participant_id", "code"),
            deviations: ("deviation_id",), scores: ("participant_id", "visit"),
            queries: ("participant_id", "query_id")}
    held: dict[Any, dict[str, dict[tuple[Any, ...], Any]]] = {t: {} for t in keys}
    with trialog.engine.connect() as connection:
        followed = connection.execute(select(positions.c.position).where(
            positions.c.name == TrialProjection.name)).scalar() or 0
        # Set aside by the follower (listed as such): their rows wait at an older version.
        aside = quarantined_ids(connection, TrialProjection.name)
        for table, key in keys.items():
            for row in connection.execute(select(table)):
                found = row._mapping
                held[table].setdefault(found["participant_id"], {})[
                    tuple(found[k] for k in key)] = found
        # The tables are read one statement each: a batch the follower committed between
        # two leaves a participant's rows at two versions. Its version read again after
        # them tells (one that moved is checked by the next run).
        moved = {pid for pid, version in connection.execute(
            select(participants.c.participant_id, participants.c.version))
            if held[participants].get(pid, {}).get((pid,), {}).get("version") != version}
    problems = []
    compared: dict[UUID, tuple[str, int]] = {}  # each stream: its participant, the version
    for pid, (stream, newest, last) in _participant_streams(trialog).items():
        if pid in moved:
            continue
        row = held[participants].get(pid, {}).get((pid,))
        if row is None:
            if newest <= followed:  # its follower has passed all its events
                problems.append(Problem(
                    "read_model", str(stream), 0, None,
                    f"rm_participants lacks the row {pid} that the record gives", pid))
            continue
        version = row["version"]
        if version > last:  # events gone: found as deleted (above)
            continue
        if version < 1:  # no record to compare its rows with
            problems.append(Problem(
                "read_model", str(stream), last, None,
                f"rm_participants.version of {pid} says {version}; a record's versions "
                "start at 1", pid))
            continue
        if version < last and newest <= followed and str(stream) not in aside:
            # The follower has passed all its events, so the row is at the newest version:
            # one saying another was edited (as the rows it holds may have been).
            problems.append(Problem(
                "read_model", str(stream), last, None,
                f"rm_participants.version of {pid} says {version}; the record is at "
                f"version {last}", pid))
            version = last
        # Else the rows are the record at the version they say (their follower behind, or
        # the participant set aside, writes all of a participant's rows at once): compared
        # with it there (as of the newest event read: a live store's gets newer ones).
        compared[stream] = (pid, version)
    for pid, version, participant in _replayed(trialog.service, compared):
        expected: dict[Any, dict[tuple[Any, ...], dict[str, Any]]] = {t: {} for t in keys}
        for table, values in read_model_rows(participant, trialog, 0):
            if table in keys:
                expected[table][tuple(values[k] for k in keys[table])] = values
        for table in keys:
            have, want = held[table].get(pid, {}), expected[table]
            for key in sorted(have.keys() | want.keys(), key=str):
                detail = _row_difference(table.name, key, have.get(key), want.get(key))
                if detail:
                    problems.append(Problem("read_model", str(participant.id), version,
                                            None, detail, pid))
    return problems


def _replayed(service: TrialService, wanted: dict[UUID, tuple[str, int]]
              ) -> Iterator[tuple[str, int, Participant]]:
    """Each wanted participant (its stream: its id and a version) replayed up to that
    version, in one read of every participant's rows, stream by stream: loaded one by
    one, a participant took two queries, most of the deep check's time on a store of
    many short records (one wanted past a snapshot's interval still loads from its
    snapshot: its events cost more to decode than the two queries). One whose events up
    to there can't all be read and applied in order is passed over: a row missing or
    unreadable is its chain's problem, reported by that check, and an event the rules
    can't apply has the read models' follower set the participant aside at the version
    before it. The database failing while it reads is raised."""
    interval = service.snapshotting_intervals[Participant]
    rows = stream_rows(service.recorder, topic_prefix=PARTICIPANT_TOPIC, lte=interval)
    for key, of_stream in groupby(rows, key=lambda row: row.originator_id):
        stream = as_uuid(key)
        if stream not in wanted:
            continue
        pid, version = wanted[stream]
        if version > interval:
            # A long record: from its latest snapshot (which the deep check compares with
            # the events before it) and the events after it, fewer to decode.
            try:
                participant = service.repository.get(stream, version=version)
            except Exception as error:
                if the_databases(error):
                    raise
                continue
            if participant.version == version:  # (not when the versions before are gone)
                yield pid, version, participant
            continue
        held = [row for row in of_stream if row.originator_version <= version]
        if [row.originator_version for row in held] != list(range(1, version + 1)):
            continue  # a version missing (deleted, or its topic altered)
        try:
            participant = project(None, (
                decode(service.mapper, stream, row.originator_version, row.topic, row.state)
                for row in held))
        except Exception:  # noqa: BLE001, S112 - can't be read or applied (see above)
            continue
        yield pid, version, participant


def check_feed(trialog: Trialog, passed_over: Collection[str] = frozenset(),
               batch: int = 5000) -> list[Problem]:
    """Deep: each rm_feed row against its seals (see ``FeedSeals``), and against the event
    the store holds at its position. The feed and the history read a row that fails its
    seals from the store instead, so nothing wrong is served, but a row changed outside
    trialog is a `read_model` problem here too, not a log line alone. A position is the
    one thing of an event the chain does not cover: two events of two streams given each
    other's positions (or one moved to a free position) leave every chain whole, but not
    the event rm_feed rendered there, which is `reordered` (unless its stream is one of
    ``passed_over``, where the chain check found a problem already). rm_feed is read
    first: each of its rows was written after its event was committed."""
    from infrastructure.audit.feed import FeedSeals
    from infrastructure.store.tables import feed_events

    f = feed_events.c
    table = events_table(trialog.service.recorder)
    seals = FeedSeals(trialog.feed_seal_key)
    problems = []
    with trialog.engine.connect() as connection, trialog.engine.connect() as store:
        rows = connection.execution_options(yield_per=batch).execute(
            select(f.position, f.subject, f.site, f.type, f.body, f.contact, f.entry,
                   f.seals).order_by(f.position))
        stored = iter(store.execution_options(yield_per=batch).execute(
            select(table.c.id, table.c.originator_id, table.c.originator_version,
                   table.c.topic).order_by(table.c.id)))
        event = next(stored, None)
        for row in rows:
            held = row.contact is not None
            if not (seals.body_holds(row.seals, row.position, row.subject, row.site,
                                     row.type, row.body, held)
                    and seals.contact_holds(row.seals, row.position, row.subject,
                                            row.contact)
                    and seals.entry_holds(row.seals, row.position, row.subject, row.entry,
                                          held)):
                problems.append(Problem(
                    "read_model", "rm_feed", 0, row.position,
                    f"rm_feed's row at position {row.position} (subject {row.subject}) "
                    "fails its seal: it was changed outside trialog (the feed and the "
                    "history read that event from the store instead)"))
                continue
            while event is not None and event.id < row.position:
                event = next(stored, None)
            moved = _position_moved(trialog, row, event if event is not None
                                    and event.id == row.position else None, passed_over)
            if moved:
                problems.append(moved)
    return problems


def _position_moved(trialog: Trialog, row: Any, event: Any,
                    passed_over: Collection[str]) -> Problem | None:
    """The problem, if any, of a sealed rm_feed row whose position now holds another event
    in the store (or none), named as the event rendered there: its entry names its id, a
    row with none (an event it could not render) its stream and type. A row of a stream
    whose chain has a problem already (``passed_over``) is reported there alone."""
    stream, pid = _subject_stream(trialog, row.subject)
    if str(stream) in passed_over:
        return None
    moved_from = None if event is None else as_uuid(event.originator_id)
    rendered = orjson.loads(row.entry) if row.entry is not None else {}
    if event is not None and (
            event_uuid(moved_from, event.originator_version) == rendered["event_id"]
            if "event_id" in rendered
            else (moved_from, event.topic.rsplit(".", 1)[-1]) == (stream, row.type)):
        return None
    version = rendered.get("version", 0)
    what = (f"{row.type} version {version} of {row.subject}" if version
            else f"an event {row.type} of {row.subject}")
    where = ("the store holds no event there: it was moved to another position or deleted"
             if event is None else "the store holds another event there: positions were "
             "changed outside trialog")
    return Problem("reordered", str(stream), version, row.position,
                   f"the feed's follower rendered {what} at position {row.position}; "
                   f"{where}", pid)


def _subject_stream(trialog: Trialog, subject: str) -> tuple[UUID, str | None]:
    """The stream an rm_feed row's subject names, and its participant (None for the
    trial's own streams, and for one whose first event could not be read, named by its
    stream's id)."""
    study = trialog.protocol.study_id
    if subject == study:
        return trial_uuid(study), None
    if subject == f"access/{study}":
        return register_uuid(study), None
    if subject.startswith("allocation/"):
        return sequence_id(study, subject.split("/", 1)[1]), None
    try:
        return UUID(subject), None
    except ValueError:
        return participant_uuid(subject), subject


def _participant_streams(trialog: Trialog) -> dict[str, tuple[UUID, int, int]]:
    """Each participant of the store: its stream, and the position and version of its
    newest event (read together)."""
    table = events_table(trialog.service.recorder)
    with trialog.engine.connect() as connection:
        newest = {as_uuid(stream): (position, version) for stream, position, version in
                  connection.execute(select(table.c.originator_id, func.max(table.c.id),
                                            func.max(table.c.originator_version))
                                     .group_by(table.c.originator_id))}
        firsts = connection.execute(select(table.c.originator_id, table.c.state).where(
            table.c.originator_version == 1,
            table.c.topic.startswith(PARTICIPANT_TOPIC))).all()
    found = {}
    for stream_id, state in firsts:
        stream = as_uuid(stream_id)
        try:
            pid = plain_state(trialog.service.mapper, as_bytes(state))["participant_id"]
        except Exception:  # noqa: BLE001, S112 - an unreadable first event: reported above
            continue
        if stream in newest:  # (else screened between the two reads: seen next time)
            found[pid] = (stream, *newest[stream])
    return found


def _row_difference(table: str, key: tuple[Any, ...], have: Any,
                    want: dict[str, Any] | None) -> str | None:
    named = "/".join(str(k) for k in key)
    if want is None:
        return f"{table} holds a row {named} that the record does not give"
    if have is None:
        return f"{table} lacks the row {named} that the record gives"
    differences = []
    for column, value in want.items():
        if column in ("position", "version") or (column == "left_on"
                                                 and have[column] is None):
            # Rows written before migration 0022 hold no withdrawal day until rewritten;
            # the version is compared before the rows (see check_read_models).
            continue
        if have[column] != value and _plain(have[column]) != _plain(value):
            differences.append(f"{table}.{column} of {named} says {_plain(have[column])!r}; "
                               f"the record says {_plain(value)!r}")
    return "; ".join(differences) or None  # every column altered, not the first alone


def _plain(value: Any) -> Any:
    """A read model's value as it compares whichever database stored it."""
    from infrastructure.store.tables import as_utc

    if isinstance(value, datetime):
        return as_utc(value).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, float):
        return round(value, 9)
    if isinstance(value, dict | list | tuple):
        return json.loads(json.dumps(value, default=str))
    return value


def check_snapshots(service: TrialService, deep: bool = False) -> tuple[list[Problem], int]:
    """Each snapshot (a cache of a participant's state at a version) against the record:
    its chain head must be the digest of the event at its version; ``deep``, the whole
    state must be what the events up to that version give (a snapshot rewritten with the
    cipher key keeps its chain head), for those this code derived: another release's is
    never loaded (see ``Snapshots``), and may derive otherwise. Also how many of those
    the deep check passed over."""
    if service.snapshots is None:
        return [], 0
    snapshots = service.snapshots.recorder.events_record_cls.__table__  # type: ignore[attr-defined]
    events = service.recorder.events_record_cls.__table__  # type: ignore[attr-defined]
    problems = []
    passed_over = 0
    with service.recorder.datastore.engine.connect() as connection:  # type: ignore[attr-defined]
        rows = connection.execute(
            select(snapshots.c.originator_id, snapshots.c.originator_version,
                   snapshots.c.state, events.c.id, events.c.state, snapshots.c.topic)
            .outerjoin(events, (events.c.originator_id == snapshots.c.originator_id)
                       & (events.c.originator_version == snapshots.c.originator_version))
            .order_by(snapshots.c.originator_id, snapshots.c.originator_version))
        for stream, version, snapshot_state, position, event_state, topic in rows:
            problem = _snapshot_problem(service, snapshot_state, event_state, topic)
            if problem is None and deep:
                snapshot = service.snapshots.derived_here(StoredEvent(  # type: ignore[attr-defined]
                    stream_key_id(stream), version, topic, as_bytes(snapshot_state)))
                if snapshot is None:  # never loaded by this code: what it says is moot
                    passed_over += 1
                    continue
                problem = _snapshot_state_problem(service, stream_key_id(stream), version,
                                                  snapshot)
            if problem:
                try:
                    first = load_event(service, stream_key_id(stream), 1)
                except Exception:  # noqa: BLE001 - unreadable: reported by the walk
                    first = None  # (named from the read models below)
                problems.append(Problem("snapshot", str(stream_key_id(stream)), version,
                                        position, problem,
                                        getattr(first, "participant_id", None)))
    _name_unknown_streams(service, problems)
    return problems, passed_over


def _snapshot_state_problem(service: TrialService, stream: UUID, version: int,
                            snapshot: Any) -> str | None:
    """The snapshot's state against the participant replayed from its events."""
    try:
        cached = vars(snapshot.mutate(None))
    except Exception:  # noqa: BLE001 - unreadable: reported
        return "the snapshot can't be read"
    replayed = None
    for event in service.events.get(stream, lte=version):
        replayed = event.mutate(replayed)
    if replayed is None or vars(replayed) != cached:
        return "the snapshot's state is not what the events give"
    return None


def _kind(topic: str) -> str:
    """An event's kind as its topic names it (``module:Class.Kind``)."""
    return topic.rsplit(".", 1)[-1].rsplit(":", 1)[-1]


def _snapshot_problem(service: TrialService, snapshot: Any, event: Any,
                      topic: str) -> str | None:
    if event is None:
        return "a snapshot of a version that has no event"
    try:
        head = plain_state(service.mapper, as_bytes(snapshot), topic)["state"]["chain_head"]
    except TopicAltered as altered:
        return f"the snapshot's topic column was altered: it was recorded as {altered.sealed}"
    except Exception:  # noqa: BLE001 - unreadable: reported
        return "the snapshot can't be read"
    try:
        digest = plain_state(service.mapper, as_bytes(event))["digest"]
    except Exception:  # noqa: BLE001 - unreadable: reported
        return "the snapshot can't be read"
    if head != digest:
        return "the snapshot does not match the event at its version"
    return None


def _site_recorded(t: Trialog, pid: str) -> str | None:
    """A participant's site as its first event records it (a site is never corrected, nor
    changed by a rescreening); None when that event can't be read (a problem then names
    no participant)."""
    table = events_table(t.service.recorder)
    with t.engine.connect() as connection:
        state = connection.execute(select(table.c.state).where(
            table.c.originator_id == participant_uuid(pid),
            table.c.originator_version == 1)).scalar()
    try:
        site: str = plain_state(t.service.mapper, as_bytes(state))["data"]["site_id"]
    except Exception:  # noqa: BLE001 - none, or damaged (reported as such)
        return None
    return site


def as_seen_by(t: Trialog, scope: Scope, answer: dict[str, Any]) -> dict[str, Any]:
    """A verification answer for a caller who sees only some sites: the problems of their
    participants only, and the count of their participants' events in place of the whole
    store's (which would tell of other sites' activity)."""
    if scope.sites is None:
        return answer
    from infrastructure.store.tables import participants

    sites = sorted(scope.sites)
    named = {p["participant_id"] for p in answer.get("problems", ()) if p["participant_id"]}
    with t.engine.connect() as connection:
        site_of = dict(connection.execute(
            select(participants.c.participant_id, participants.c.site_id)
            .where(participants.c.participant_id.in_(sorted(named))))
            .tuples().all()) if named else {}
        events = connection.execute(select(func.coalesce(func.sum(participants.c.version), 0))
                                    .where(participants.c.site_id.in_(sites))).scalar_one()
    for pid in named - set(site_of):  # not in the read models (yet): their problems too
        site_of[pid] = _site_recorded(t, pid)
    visible = {pid for pid, site in site_of.items() if site in scope.sites}
    # The allocation sequences of their sites (a stratum is a site): named by no
    # participant, theirs all the same.
    strata = {str(sequence_id(t.protocol.study_id, site)) for site in sites}
    problems = [p for p in answer.get("problems", ())
                if p["participant_id"] in visible or p["stream"] in strata]
    seen = {**answer, "events_checked": int(events)}
    if "started_by" in seen:  # a deep check's starter may be another site's
        seen["started_by"] = None
    if "problems" in answer:
        seen.update(problems=problems, ok=not problems)
    seen.pop("events_per_second", None)
    seen.pop("snapshots_passed_over", None)  # the whole store's, too
    return seen
