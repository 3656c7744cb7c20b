"""What the record says: a participant's current state and the trial summary."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import date
from statistics import fmean
from typing import Any

from domain.management import CASEBOOK, signature_view, visit_key
from domain.participant import Participant
from domain.protocol import Protocol
from domain.schedule import schedule, visit_status


def visits_view(p: Participant, protocol: Protocol, today: date) -> list[dict[str, Any]]:
    """Each scheduled visit and its status on ``today`` (the participant's site's day)."""
    registered_on = p.registered_on
    if registered_on is None:
        return []
    completed = p.completed_visits()
    rows = []
    for visit in schedule(protocol, registered_on):
        done = completed.get(visit.code)
        rows.append({
            "code": visit.code,
            "target": visit.target.isoformat(),
            "window": {"start": visit.window_start.isoformat(),
                       "end": visit.window_end.isoformat()},
            "status": visit_status(visit, done["completed_on"] if done else None,
                                   visit.code in p.missed_visits, today,
                                   p.withdrawn_on("study")),
            "completed_on": done["completed_on"].isoformat() if done else None,
        })
    return rows


VISIT = visit_key("")  # the prefix of a visit's key (a signature's, a lock's)


def management_view(p: Participant) -> dict[str, Any]:
    """Data management on the record: queries not closed, and per visit completed, missed,
    or ever verified, signed or locked (a visit whose data a correction moved to another
    keeps them: its verification changed since, its signature invalidated), and for the
    casebook, the source verification, the signature and the lock."""
    marked = {key.removeprefix(VISIT) for key in [*p.signatures, *p.locks]
              if key.startswith(VISIT)}
    visits = {
        code: {"sdv": p.sdv_status(code),
               "signature": signature_view(p.signatures.get(visit_key(code))),
               "locked": visit_key(code) in p.locks}
        for code in dict.fromkeys([*p.completed_visits(), *p.missed_visits, *p.verified,
                                   *sorted(marked)])
    }
    return {"open_queries": p.open_queries, "visits": visits,
            "casebook": {"signature": signature_view(p.signatures.get(CASEBOOK)),
                         "locked": CASEBOOK in p.locks}}


NOT_CAPTURED = {"sdv": "not_verified", "signature": None, "locked": False}


def with_management(state: dict[str, Any], management: dict[str, Any] | None) -> None:
    """Adds ``open_queries``, ``casebook`` and each visit's ``sdv``, ``signature`` and
    ``locked`` to a state."""
    management = management or {"open_queries": 0, "visits": {},
                                "casebook": {"signature": None, "locked": False}}
    for visit in state["visits"]:
        visit.update(management["visits"].get(visit["code"], NOT_CAPTURED))
    state["open_queries"] = management["open_queries"]
    state["casebook"] = management["casebook"]


def participant_state(p: Participant, protocol: Protocol, today: date,
                      contact: bool = False) -> dict[str, Any]:
    """The participant's current state on ``today`` (its site's day); contact details
    only when ``contact``."""
    eligible, failed = p.eligibility_now(protocol)
    state: dict[str, Any] = {
        "participant_id": p.participant_id,
        "status": p.status,
        "arm": p.arm,
        "version": p.version,
        "site_id": p.site_id,
        "eligible": eligible,
        "failed_criteria": failed,
        "registered_on": p.registered_on.isoformat() if p.registered_on else None,
        "visits": visits_view(p, protocol, today),
        "open_deviations": [{**d, "participant_id": p.participant_id}
                            for d in p.deviations.values() if d["status"] == "open"],
        "scores": p.scores(),
    }
    with_management(state, management_view(p))
    if contact:
        birth_date = p.screening.get("birth_date")
        state["contact"] = {"email": p.screening.get("email"),
                            "birth_date": birth_date.isoformat() if birth_date else None}
    return state


def trial_summary(participants: Iterable[Participant]) -> dict[str, Any]:
    """Counts by status, arm and site, deviations by code, and mean BPI average pain
    (item 'average') by arm and visit."""
    by_status: Counter[str] = Counter()
    by_arm: Counter[str] = Counter()
    by_site: Counter[str] = Counter()
    deviations: Counter[str] = Counter()
    pain: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for p in participants:
        by_status[p.status] += 1
        by_site[p.site_id] += 1
        if p.arm:
            by_arm[p.arm] += 1
        for d in p.deviations.values():
            deviations[d["code"]] += 1
        for code, visit in p.completed_visits().items():
            bpi = visit.get("bpi_sf")
            if p.arm and bpi and bpi.get("average") is not None:
                pain[p.arm][code].append(float(bpi["average"]))
    return {
        "participants": sum(by_status.values()),
        "by_status": dict(sorted(by_status.items())),
        "by_arm": dict(sorted(by_arm.items())),
        "by_site": dict(sorted(by_site.items())),
        "deviations_by_code": dict(sorted(deviations.items())),
        "mean_pain_by_arm_and_visit": {
            arm: {visit: {"n": len(v), "mean": fmean(v)} for visit, v in visits.items()}
            for arm, visits in sorted(pain.items())
        },
    }
