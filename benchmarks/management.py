"""Data management: the per-command cost of the data-management commands beside
CompleteVisit's, and `GET /v1/queries` over a store of 10,000 queries.

`management_commands` is measured through the command bus (`Trialog.bus.dispatch`), the
level `commands_app` measures: validation of the JSON body, roles and, for SignVisit, the
API's re-authentication (an Argon2 verification, measured by `sessions_p95_ms`) are not in
it. At the bus a SignVisit carries the signer's login and printed name, as the API passes
them on. Every measured command acts on a participant of its own whose record holds exactly
RECORD events when the command comes (padded with doses), so that each command loads and
replays as much as every other; the CompleteVisit participants are alike but for the
visit. Each round runs, in a shuffled order, EACH commands of every data-management type
and as many CompleteVisit commands as data-management ones, each timed alone; a figure is
its commands over the sum of their times, so the ratio is decided within the same rounds.
"""

from __future__ import annotations

import random
import statistics
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from eventsourcing.application import AggregateNotFoundError
from sqlalchemy import func, select

from benchmarks.http import p95_ms
from benchmarks.projection import REGISTERED, early_consent, early_screening
from domain import commands as c
from domain.access import EVERY_SITE
from domain.commands import Audit
from domain.management import visit_key
from domain.participant import Participant
from domain.randomization import AllocationSequence, sequence_id
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.tables import queries
from infrastructure.store.tokens import create_token

SITES = ("CASE", "METRO")
VISIT = "baseline"
MEANING = "I approve the data of this visit"
SIGNER = {"signer": "bench-investigator", "printed_name": "Bench Investigator"}
# The data-management mix, each with the steps that put its participant in the state it
# acts on (after enrolment and the completed baseline visit), and the command itself.
MIX: dict[str, tuple[list[str], Callable[[str, str], tuple[c.Command, str | None]]]] = {
    "RaiseQuery": ([], lambda pid, q: (c.RaiseQuery(pid, {
        "query_id": q, "text": "BPI worst pain: the source says 6, the form 7?",
        "visit": VISIT}), None)),
    "RespondToQuery": (["raise"], lambda pid, q: (c.RespondToQuery(pid, {
        "query_id": q, "text": "Checked against the source: 6, corrected."}), None)),
    "CloseQuery": (["raise", "respond"], lambda pid, q: (c.CloseQuery(pid, {
        "query_id": q, "text": "Resolved."}), None)),
    "VerifySource": ([], lambda pid, q: (c.VerifySource(pid, {"visit": VISIT}), None)),
    "SignVisit": (["verify"], lambda pid, q: (c.SignVisit(pid, {
        "visit": VISIT, "meaning": MEANING, **SIGNER}), None)),
    "LockVisit": (["verify", "sign"], lambda pid, q: (c.LockVisit(pid, {"visit": VISIT}),
                                                       None)),
    # A signed, locked visit: the unlock also records SignatureInvalidated (two events).
    "UnlockVisit": (["verify", "sign", "lock"], lambda pid, q: (c.UnlockVisit(pid, {
        "visit": VISIT}), "a transcription error to correct")),
}
COMPLETE_VISIT = "CompleteVisit"


def _audit(at: datetime | None = None, reason: str | None = None) -> Audit:
    return Audit(command_id=str(uuid.uuid4()), actor="bench",
                 recorded_at=at or datetime.now(UTC), reason=reason)


def _visit_data() -> dict[str, Any]:
    return {"visit": VISIT, "completed_on": REGISTERED,
            "bpi_sf": {"worst": 6, "least": 2, "average": 4, "now": 3}}


class Seeder:
    """Saves participants built with the aggregate's own methods (what the commands would
    record, without a transaction per event), a group per save; the sites' allocation
    sequences are saved with the last group."""

    def __init__(self, t: Trialog, group: int = 20) -> None:
        self.t = t
        self.group = group
        self.pending: list[Participant] = []
        self.sequences: dict[str, AllocationSequence] = {}

    def sequence(self, site: str) -> AllocationSequence:
        if site not in self.sequences:
            try:
                self.sequences[site] = self.t.service.repository.get(
                    sequence_id(self.t.protocol.study_id, site))
            except AggregateNotFoundError:
                self.sequences[site] = AllocationSequence.open(self.t.protocol.study_id,
                                                               site, _audit())
        return self.sequences[site]

    def enrol(self, site: str, at: datetime | None = None) -> Participant:
        """Screened, consented and randomized: three events."""
        data = early_screening()
        data["site_id"] = site
        p = Participant.screen(f"{site}-{uuid.uuid4().hex[:12]}", data, self.t.protocol,
                               _audit(at))
        p.record_consent(early_consent(), _audit(at))
        p.randomize({"registered_on": REGISTERED}, self.sequence(site),
                    self.t.service.allocation_seed, self.t.protocol, _audit(at))
        return p

    def add(self, p: Participant) -> None:
        self.pending.append(p)
        if len(self.pending) == self.group:
            self.t.service.save(*self.pending)
            self.pending = []

    def flush(self) -> None:
        self.t.service.save(*self.sequences.values(), *self.pending)
        self.pending, self.sequences = [], {}


def _pad(p: Participant, events: int) -> None:
    """Doses, a day each, until the record holds ``events`` events."""
    day = 0
    while p.version < events:
        p.record_dose({"taken_on": REGISTERED + timedelta(days=day), "taken": True,
                       "dose_mcg": 1000}, _audit())
        day += 1


def _prepare(p: Participant, steps: list[str], query_id: str, t: Trialog) -> None:
    for step in steps:
        if step == "raise":
            p.raise_query({"query_id": query_id, "text": "?", "visit": VISIT}, t.protocol,
                          _audit())
        elif step == "respond":
            p.act_on_query("respond", {"query_id": query_id, "text": "checked"}, _audit())
        elif step == "verify":
            p.verify_source({"visit": VISIT}, t.protocol, _audit())
        elif step == "sign":
            p.sign_visit({"visit": VISIT, "meaning": MEANING, **SIGNER}, t.protocol,
                         _audit())
        elif step == "lock":
            p.lock(visit_key(VISIT), _audit(), t.protocol)


Planned = tuple[str, c.Command, str | None]


def plan_round(t: Trialog, seeder: Seeder, each: int, record: int,
               rng: random.Random) -> list[Planned]:
    """The commands of one round, shuffled, their participants saved: ``each`` of every
    data-management type and as many CompleteVisit; every participant holds ``record``
    events when its command comes."""
    planned: list[Planned] = []
    for name, (steps, command) in MIX.items():
        for _ in range(each):
            site = rng.choice(SITES)
            p = seeder.enrol(site)
            p.complete_visit(_visit_data(), t.protocol, _audit())
            _pad(p, record - len(steps))
            query_id = str(uuid.uuid4())
            _prepare(p, steps, query_id, t)
            assert p.version == record
            seeder.add(p)
            planned.append((name, *command(p.participant_id, query_id)))
    for _ in range(each * len(MIX)):
        p = seeder.enrol(rng.choice(SITES))
        _pad(p, record)
        seeder.add(p)
        planned.append((COMPLETE_VISIT, c.CompleteVisit(p.participant_id, _visit_data()),
                        None))
    rng.shuffle(planned)
    return planned


def _timed(t: Trialog, planned: Iterable[Planned]) -> Iterator[tuple[str, float]]:
    for name, command, reason in planned:
        start = time.perf_counter()
        t.bus.dispatch(command, command_id=str(uuid.uuid4()), actor="bench", reason=reason)
        yield name, time.perf_counter() - start


def management_commands(t: Trialog, rounds: int, each: int,
                        record: int) -> dict[str, Any]:
    """Commands/s of the data-management mix and of CompleteVisit (see the module), the
    ratio of each round, and each type's commands/s and median ms."""
    rng = random.Random(20260301)
    seeder = Seeder(t)
    warm_up = plan_round(t, seeder, 2, record, rng)
    plans = [plan_round(t, seeder, each, record, rng) for _ in range(rounds)]
    seeder.flush()
    list(_timed(t, warm_up))
    samples: dict[str, list[float]] = defaultdict(list)
    round_ratios = []
    for plan in plans:
        spent: dict[bool, list[float]] = {True: [], False: []}
        for name, seconds in _timed(t, plan):
            samples[name].append(seconds)
            spent[name != COMPLETE_VISIT].append(seconds)
        round_ratios.append(round((len(spent[True]) / sum(spent[True]))
                                  / (len(spent[False]) / sum(spent[False])), 3))
    mix = [s for name, values in samples.items() if name != COMPLETE_VISIT for s in values]
    complete = samples[COMPLETE_VISIT]
    return {
        "management": len(mix) / sum(mix), "complete_visit": len(complete) / sum(complete),
        "round_ratios": round_ratios,
        "per_type": {name: {"commands_per_s": round(len(values) / sum(values), 1),
                            "median_ms": round(statistics.median(values) * 1000, 2),
                            "commands": len(values)}
                     for name, values in sorted(samples.items())},
    }


# --- the queries list -----------------------------------------------------------------------

# A query's fate, in a cycle of 20: 8 open, 6 answered, 5 closed, 1 cancelled.
FATES = ["open"] * 8 + ["answered"] * 6 + ["closed"] * 5 + ["cancelled"]


def seed_queries(t: Trialog, total: int, participants: int) -> None:
    """``participants`` participants, half at each site, holding ``total`` queries between
    them, raised over the last ~100 days (three days apart on a participant), then
    answered, closed or cancelled a day or two later by FATES."""
    seeder = Seeder(t, group=10)
    now = datetime.now(UTC)
    raised = 0
    for i in range(participants):
        n = total // participants + (1 if i < total % participants else 0)
        at = now - timedelta(days=3 * n + 7, minutes=i)
        p = seeder.enrol(SITES[i % len(SITES)], at)
        p.complete_visit(_visit_data(), t.protocol, _audit(at))
        for j in range(n):
            query_id, fate = str(uuid.uuid4()), FATES[(raised + j) % len(FATES)]
            opened = at + timedelta(days=3 * j + 1)
            p.raise_query({"query_id": query_id, "text": f"Query {j}: please check the "
                           "BPI worst pain score against the source.",
                           "visit": VISIT}, t.protocol, _audit(opened))
            if fate in ("answered", "closed"):
                p.act_on_query("respond", {"query_id": query_id, "text": "Checked."},
                               _audit(opened + timedelta(days=1)))
            if fate == "closed":
                p.act_on_query("close", {"query_id": query_id, "text": None},
                               _audit(opened + timedelta(days=2)))
            if fate == "cancelled":
                p.act_on_query("cancel", {"query_id": query_id, "text": "raised in error"},
                               _audit(opened + timedelta(days=1)))
        raised += n
        seeder.add(p)
    seeder.flush()


def query_counts(t: Trialog) -> dict[str, int]:
    with t.engine.connect() as connection:
        rows = connection.execute(select(queries.c.status, func.count())
                                  .group_by(queries.c.status)).all()
    return {status: count for status, count in rows}


LISTS = {
    "default": "",
    "open_case": "?status=open&site_id=CASE",
    "last_page": "?offset={last}",
}


def queries_list_p95_ms(base: str, token: str, n: int, total: int,
                        warm_up: int = 3) -> dict[str, dict[str, float]]:
    """p95 and median ms of GET /v1/queries, one client, the three lists of LISTS taking
    turns, ``n`` requests each after ``warm_up`` of each."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    samples: dict[str, list[float]] = {name: [] for name in LISTS}
    for i in range(warm_up + n):
        for name, path in LISTS.items():
            url = f"{base}/v1/queries{path.format(last=total - 100)}"
            start = time.perf_counter()
            answer = session.get(url, timeout=60)
            elapsed = time.perf_counter() - start
            if answer.status_code != 200:
                raise RuntimeError(f"{url} answered {answer.status_code}: {answer.text}")
            listed = answer.json()["queries"]
            if name != "open_case" and len(listed) != 100:
                raise RuntimeError(f"{url} listed {len(listed)} queries, not 100")
            if i >= warm_up:
                samples[name].append(elapsed)
    return {name: {"p95_ms": round(p95_ms(values), 2),
                   "median_ms": round(statistics.median(values) * 1000, 2)}
            for name, values in samples.items()}


def reader_token(t: Trialog) -> str:
    return create_token(t.engine, f"bench-dm-{uuid.uuid4().hex[:8]}", "data_manager",
                        EVERY_SITE)
