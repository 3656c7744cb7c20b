"""The embedded-default demo: a seeded cohort simulated through the protocol on SQLite,
on a simulated clock, then the trial summary."""

from __future__ import annotations

import heapq
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from itertools import count
from pathlib import Path
from typing import Any

from domain import commands as c
from domain.access import EVERY_SITE
from domain.deviations import detect
from domain.errors import DomainError, ValidationFailed
from domain.scoring import FACT_ITEMS
from infrastructure.jobs.monitor import EVENT_DRIVEN, scan_clock
from infrastructure.readside.projections import FeedProjection, TrialProjection
from infrastructure.readside.queries import trial_summary
from infrastructure.store.bootstrap import Trialog, bootstrap
from infrastructure.store.settings import Settings

START = date(2026, 1, 5)
SERVICE = "demo-screening-app"


@dataclass
class SimClock:
    now: datetime = field(default_factory=lambda: datetime.combine(START, time(9),
                                                                   UTC))

    def __call__(self) -> datetime:
        return self.now


def eligibility_facts(rng: random.Random, screened_on: date) -> dict[str, Any]:
    drug, dose = rng.choice([("anastrozole", 1), ("letrozole", 2.5), ("exemestane", 25)])
    return {
        "er_positive": True, "pgr_positive": rng.random() < 0.6, "stage": rng.choice(["I", "II", "III"]),
        "metastatic": False, "surgery_completed": True, "aimss_after_ai_start": True,
        "aromatase_inhibitor": {"drug": drug, "daily_dose_mg": dose,
                                "started_on": screened_on - timedelta(days=rng.randint(30, 400)),
                                "planned_days_after_registration": 365 * rng.randint(1, 5)},
        "menopause": {"months_since_last_period": rng.randint(12, 200),
                      "bilateral_oophorectomy": False, "hysterectomy_ovaries_retained": False,
                      "fsh_postmenopausal": None},
        "zubrod": rng.randint(0, 2), "b12_allergy": False, "substance_abuse_last_on": None,
        "chronic_liver_disease": False, "end_stage_renal_disease": False,
        "analgesics": ([{"drug": "gabapentin",
                         "stable_since": screened_on - timedelta(days=rng.randint(40, 300))}]
                       if rng.random() < 0.3 else []),
        "b12_supplement_stopped_on": None, "willing_blood_samples": True,
        "other_investigational_agents": False, "uncontrolled_intercurrent_illness": False,
        "surgery_side_effects_resolved": True, "prior_therapy_toxicity_resolved": True,
        "pain_due_to_fracture_or_injury": False, "able_to_consent": True,
    }


SCREEN_FAILURES: list[Callable[[dict[str, Any]], None]] = [
    lambda f: f.update(stage="IV", metastatic=True),
    lambda f: f.update(zubrod=3),
    # Another dose fails the criterion; another drug would not pass validation (a 422).
    lambda f: f["aromatase_inhibitor"].update(daily_dose_mg=5),
    lambda f: f.update(b12_allergy=True),
    lambda f: f.update(pain_due_to_fracture_or_injury=True),
]


SCENARIOS = (
    "typical", "late_visit", "typical", "withdraws_treatment", "typical",
    "late_washout_report", "misses_a_visit", "typical", "late_baseline_blood",
    "control_takes_dose", "typical", "poor_adherence", "withdraws_study",
)


class Simulation:
    """Plans each participant's journey as timed actions and runs them in time order."""

    def __init__(self, trialog: Trialog, clock: SimClock, n: int, seed: int) -> None:
        self.t, self.clock, self.n = trialog, clock, n
        self.rng = random.Random(seed)
        self.queue: list[tuple[datetime, int, Callable[[], None]]] = []
        self.seq = count()
        self.ids: list[str] = []
        self.randomized = 0

    def at(self, day: date, action: Callable[[], None], hour: int = 10) -> None:
        when = datetime.combine(day, time(hour, self.rng.randint(0, 59)), UTC)
        when = max(when, self.clock.now)  # recording times never go backwards
        heapq.heappush(self.queue, (when, next(self.seq), action))

    def send(self, command: c.Command, reason: str | None = None) -> bool:
        """Whether the command went through: a rule of the protocol may refuse it (a real
        trial meets those), but never a field's own rule (that is the demo's mistake)."""
        try:
            self.t.bus.dispatch(command, command_id=str(uuid.UUID(int=self.rng.getrandbits(128))),
                                actor=SERVICE, reason=reason)
        except ValidationFailed:
            raise
        except DomainError:
            return False
        return True

    def run(self, progress: Callable[[int], None]) -> date:
        for i in range(self.n):
            self.plan_screening(i)
        last_day = START
        while self.queue:
            when, _, action = heapq.heappop(self.queue)
            self.clock.now = when
            if when.date() > last_day:
                progress((when.date() - last_day).days)
                last_day = when.date()
            action()
        return last_day

    def plan_screening(self, i: int) -> None:
        site = "CASE" if i % 3 else "METRO"
        pid = f"{site}-{i + 1:04d}"
        self.ids.append(pid)
        screened_on = START + timedelta(days=int(i * 1.5))
        facts = eligibility_facts(self.rng, screened_on)
        if self.rng.random() < 0.15:
            self.rng.choice(SCREEN_FAILURES)(facts)
        data = {"site_id": site, "screened_on": screened_on,
                "birth_date": date(self.rng.randint(1940, 1966), self.rng.randint(1, 12),
                                   self.rng.randint(1, 28)),
                "email": f"{pid.lower()}@participants.example",
                "language": "es" if self.rng.random() < 0.25 else "en", "eligibility": facts}
        self.at(screened_on, lambda: self.after_screening(pid, data), hour=9)

    def after_screening(self, pid: str, data: dict[str, Any]) -> None:
        self.send(c.ScreenParticipant(pid, data))
        if self.t.service.get_participant(pid).status != "screened":
            return
        day = data["screened_on"]
        consent = {"consent_version": "2.1", "signed_on": day + timedelta(days=1),
                   "signed_by": "participant", "language": data["language"]}
        self.at(day + timedelta(days=1), lambda: self.send(c.RecordConsent(pid, consent)))
        registered = day + timedelta(days=3)
        self.at(registered, lambda: self.randomize(pid, registered), hour=11)

    def randomize(self, pid: str, registered: date) -> None:
        if not self.send(c.RandomizeParticipant(pid, {"registered_on": registered})):
            return
        arm = self.t.service.get_participant(pid).arm or "control"
        # Every few randomized participants get one scenario a real trial meets.
        scenario = SCENARIOS[self.randomized % len(SCENARIOS)]
        self.randomized += 1
        blood_day = registered + timedelta(days=1 if scenario == "late_baseline_blood" else 0)
        self.at(blood_day, lambda: self.send(c.RecordBloodSample(pid, {
            "timepoint": self.t.protocol.visits[0].code, "collected_at": datetime.combine(blood_day, time(8, 30)),
            "results": {"b12_pg_ml": self.rng.randint(250, 700),
                        "crp_mg_l": round(self.rng.uniform(0.5, 8), 1)}})), hour=9)
        withdrawn = None
        if scenario in ("withdraws_treatment", "withdraws_study"):
            withdrawn = registered + timedelta(days=self.rng.randint(30, 70))
            scope = scenario.removeprefix("withdraws_")
            self.at(withdrawn, lambda: self.send(c.WithdrawParticipant(pid, {
                "withdrawn_on": withdrawn, "scope": scope,
                "reason_code": "adverse_event" if scope == "treatment" else "moved_away"})),
                hour=16)
        if arm == "b12" or scenario == "control_takes_dose":
            adherence = 0.6 if scenario == "poor_adherence" else 0.95
            self.plan_doses(pid, registered, withdrawn, adherence, arm == "b12")
        if scenario == "late_washout_report":
            # The seed's case: a B12 multivitamin stopped 5 days before registration,
            # reported only after randomization.
            self.at(registered + timedelta(days=20), lambda: self.send(c.ReportMedication(pid, {
                "drug": "multivitamin with B12", "started_on": registered - timedelta(days=200),
                "stopped_on": registered - timedelta(days=5), "contains_b12": True})))
        for visit in self.t.protocol.visits:
            if scenario == "misses_a_visit" and visit is self.t.protocol.visits[1]:
                continue
            if scenario == "withdraws_study" and withdrawn and visit.target_day > 40:
                continue
            jitter = (visit.window_after + 4 if scenario == "late_visit" and visit.target_day
                      else self.rng.randint(-visit.window_before, visit.window_after))
            self.plan_visit(pid, arm, visit.code, registered,
                            registered + timedelta(days=visit.target_day + jitter))

    def plan_doses(self, pid: str, registered: date, withdrawn: date | None,
                   adherence: float, receives: bool) -> None:
        for day in range(90 if receives else 3):
            taken_on = registered + timedelta(days=day)
            if withdrawn and taken_on > withdrawn:
                break
            dose = {"taken_on": taken_on, "taken": self.rng.random() < adherence,
                    "dose_mcg": 1000}
            self.at(taken_on + timedelta(days=1),
                    lambda d=dose: self.send(c.RecordDose(pid, d)), hour=20)

    def plan_visit(self, pid: str, arm: str, code: str, registered: date, day: date) -> None:
        weeks = (day - registered).days / 7
        relief = (0.25 if arm == "b12" else 0.08) * min(weeks, 13)
        base = self.rng.uniform(4.5, 7)
        pain = max(0.0, min(10.0, base - relief + self.rng.gauss(0, 0.8)))
        bpi = {"worst": min(10, round(pain + 2)), "least": max(0, round(pain - 2)),
               "average": round(pain), "now": round(pain),
               "interference": {k: self.rng.randint(0, 8) for k in
                                ("general_activity", "mood", "walking", "work", "relations",
                                 "sleep", "enjoyment")}}
        fact = {item: self.rng.randint(0, 4) for item in sorted(FACT_ITEMS)
                if self.rng.random() < 0.95}
        data = {"visit": code, "completed_on": day, "bpi_sf": bpi, "fact_es": fact,
                "adherence": {"missed_ai_doses_last_week": self.rng.randint(0, 2)}}
        self.at(day, lambda: self.send(c.CompleteVisit(pid, data)), hour=14)

    def flag_deviations(self, today: date, codes: tuple[str, ...]) -> None:
        for pid in self.ids:
            participant = self.t.service.get_participant(pid)
            for finding in detect(participant, self.t.protocol, today, codes):
                self.send(c.FlagDeviation(pid, {
                    "deviation_id": finding.deviation_id(participant), "code": finding.code,
                    "severity": finding.severity, "evidence": list(finding.evidence),
                    "detail": finding.detail}))


def run_demo(path: Path, participants: int = 40, seed: int = 7,
             show_progress: bool = True) -> dict[str, Any]:
    """Runs the simulation into a fresh SQLite file and returns the trial summary."""
    from tqdm import tqdm  # loaded by the commands that draw a bar

    stale_files = [path, *(Path(f"{path}{suffix}") for suffix in (
        ".key", ".seed", ".pseudonym-key", "-wal", "-shm"))]
    for stale in stale_files:
        stale.unlink(missing_ok=True)
    # The allocation seed follows --seed, so the same seed gives the same cohort and arms.
    # It goes in the database's seed file, where later commands on the file read it.
    seed_file = Path(f"{path}.seed")
    seed_file.touch(mode=0o600)
    seed_file.write_text(f"demo-{seed}\n")
    settings = Settings.from_env({"TRIALOG_DATABASE_URL": f"sqlite:///{path.resolve()}"})
    clock = SimClock()
    trialog = bootstrap(settings, clock=clock)
    try:
        sim = Simulation(trialog, clock, participants, seed)
        total_days = int(participants * 1.5) + 3 + 200
        with tqdm(total=total_days, unit="day", desc="simulating", disable=not show_progress,
                  leave=False) as bar:
            last_day = sim.run(bar.update)
        # The day after, as the monitor would find it: the clock's scan marks each visit
        # missed and flags it (and poor adherence), the event-driven rules the rest.
        clock.now = datetime.combine(last_day + timedelta(days=1), time(12), UTC)
        TrialProjection(trialog, batch_size=2000).catch_up()
        scan_clock(trialog, trialog.ended_everywhere())
        sim.flag_deviations(trialog.ended_everywhere(), EVENT_DRIVEN)
        TrialProjection(trialog, batch_size=2000).catch_up()  # the read models, as the API
        FeedProjection(trialog, batch_size=2000).catch_up()  # and the feed's pages
        summary = trial_summary(trialog, scope=EVERY_SITE)
    finally:
        trialog.close()
    return summary
