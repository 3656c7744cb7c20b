"""The overview, the work lists and the participant list."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import abort, g, redirect, render_template, request, url_for

from infrastructure.console import charts
from infrastructure.console.web import blp, require_read, trialog
from infrastructure.readside import consort, queries, worklists
from infrastructure.store.schemas import MOMENT_RULE, in_utc

SECOND = timedelta(seconds=1, microseconds=-1)  # to the end of the second written


def moment(text: str | None) -> datetime | None:
    """A moment typed in a form or a link (ISO 8601; no zone: UTC), in UTC; written to the
    second or less finely, the end of that second: a time read off the timeline (which
    shows seconds) is then the time of the event recorded within it. (A date-and-time
    field leaves ":00" seconds out of what it sends, so a time without seconds is taken
    as second 0.)"""
    if not text:
        return None
    written = text.strip().replace(" ", "T")
    try:
        value = datetime.fromisoformat(written)
    except ValueError:
        abort(422, f"{text!r} is not a date and time (YYYY-MM-DDTHH:MM, UTC)")
    clock = re.split(r"[Z+-]", written.partition("T")[2], maxsplit=1)[0]
    if clock and "." not in clock and value.replace(tzinfo=None) < datetime.max - SECOND:
        value += SECOND
    moment = in_utc(value if value.tzinfo is not None else value.replace(tzinfo=UTC))
    if moment is None:
        abort(422, f"{text!r}: {MOMENT_RULE}")
    return moment


@blp.route("/")
def overview() -> Any:
    """The trial at a glance: CONSORT flow, enrolment, pain by arm and visit, deviations."""
    require_read("summary")
    t, scope = trialog(), g.principal.scope
    as_of = moment(request.args.get("as_of"))
    flow = consort.courses(t, scope, as_of)
    counts = consort.consort_counts(t, flow, as_of)
    summary = queries.trial_summary(t, scope=scope)
    series = consort.enrolment(flow)
    arm_names = {a.code: a.name for a in t.protocol.arms}
    visits = list(t.protocol.visit_codes)
    return render_template(
        "console/overview.html", counts=counts, summary=summary, series=series,
        visits=visits, arm_names=arm_names, as_of=as_of,
        consort_svg=charts.consort_svg(counts), enrolment_svg=charts.enrolment_svg(series),
        pain_svg=charts.pain_svg(summary["mean_pain_by_arm_and_visit"], visits, arm_names),
        deviations_svg=charts.deviations_svg(summary["deviations_by_code"]),
        rows=consort_rows(counts))


def consort_rows(counts: dict[str, Any]) -> list[tuple[str, str, int]]:
    """Every count of the flow as (key, label, n): the table beside the diagram."""
    rows = [("assessed", "Assessed for eligibility", counts["assessed"]),
            ("excluded.total", "Excluded", counts["excluded"]["total"]),
            ("excluded.not_eligible", "Not meeting inclusion criteria",
             counts["excluded"]["not_eligible"])]
    rows += [(f"excluded.failed_criteria.{c}", f"Failed criterion: {c}", n)
             for c, n in counts["excluded"]["failed_criteria"].items()]
    before = counts["excluded"]["withdrew_before_randomization"]
    rows.append(("excluded.withdrew_before_randomization.total",
                 "Withdrew before randomization", before["total"]))
    rows += [(f"excluded.withdrew_before_randomization.reasons.{r}", f"  reason: {r}", n)
             for r, n in before["reasons"].items()]
    rows += [("awaiting_randomization", "Awaiting randomization",
              counts["awaiting_randomization"]),
             ("randomized", "Randomized", counts["randomized"])]
    for code, arm in counts["arms"].items():
        name = arm["name"]
        for key, label in (("allocated", "allocated"), ("received", "received allocation"),
                           ("not_received", "did not receive allocation")):
            rows.append((f"arms.{code}.{key}", f"{name}: {label}", arm[key]))
        for key, label in (("discontinued", "discontinued intervention"),
                           ("left_study", "left the study")):
            rows.append((f"arms.{code}.{key}.total", f"{name}: {label}", arm[key]["total"]))
            rows += [(f"arms.{code}.{key}.reasons.{r}", f"  reason: {r}", n)
                     for r, n in arm[key]["reasons"].items()]
        rows += [(f"arms.{code}.analysed", f"{name}: analysed", arm["analysed"]),
                 (f"arms.{code}.not_analysed", f"{name}: primary endpoint not recorded",
                  arm["not_analysed"])]
    label = "Record can't be read (assessed only; trialog audit verify names the events)"
    rows.append(("unreadable.total", label, counts["unreadable"]["total"]))
    return rows


# Each role's lists, its own work first; every list is open to every role that reads.
LISTS = {
    "queries": "Open queries", "due": "Visits due", "deviations": "Open deviations",
    "verify": "Visits to verify", "sign": "Visits and casebooks to sign",
    "quarantine": "Quarantined participants",
}
FIRST = {
    "coordinator": ("queries", "due", "deviations"),
    "investigator": ("sign", "queries", "due"),
    "monitor": ("verify", "queries", "deviations"),
    "data_manager": ("queries", "verify", "quarantine", "deviations"),
    "admin": ("quarantine", "queries", "deviations"),
}


def list_order(role: str) -> list[str]:
    first = FIRST.get(role, ("deviations", "queries"))
    return [*first, *(name for name in LISTS if name not in first)]


@blp.route("/work/")
def work_lists() -> Any:
    """The role's first work list."""
    return redirect(url_for("console.work", name=list_order(g.principal.role)[0]))


@blp.route("/work/<name>")
def work(name: str) -> Any:
    """One work list, limited to the person's sites."""
    if name not in LISTS:
        abort(404, f"There is no work list {name!r}.")
    t, scope = trialog(), g.principal.scope
    rows: dict[str, Any] = {}
    if name == "queries":
        require_read("queries")
        rows["queries"] = [q for status in ("open", "answered")
                           for q in queries.list_queries(t, scope=scope, status=status)]
    elif name == "due":
        require_read("visits")
        rows["visits"] = queries.visits_due(t, 14, scope=scope)
    elif name == "deviations":
        require_read("deviations")
        rows["deviations"] = queries.list_deviations(t, scope=scope, status="open")
    elif name == "verify":
        require_read("participants")
        rows["visits"] = worklists.visits_to_verify(t, scope)
    elif name == "sign":
        require_read("participants")
        rows["visits"] = worklists.visits_to_sign(t, scope)
        rows["casebooks"] = worklists.casebooks_to_sign(t, scope)
    else:
        require_read("participants")
        rows["quarantined"] = worklists.quarantined(t, scope)
    return render_template("console/work.html", name=name, title=LISTS[name], lists=LISTS,
                           order=list_order(g.principal.role), **rows)


STATUSES = ("screened", "screen_failed", "consented", "randomized", "off_treatment",
            "completed", "withdrawn")


@blp.route("/participants/")
def participants() -> Any:
    """The participants of the person's sites, filtered by status and site."""
    require_read("participants")
    t = trialog()
    status = request.args.get("status") or None
    site_id = request.args.get("site_id") or None
    if status is not None and status not in STATUSES:
        abort(422, f"{status!r} is not a participant status")
    rows = queries.list_participants(t, scope=g.principal.scope, status=status,
                                     site_id=site_id)
    sites = [s for s in t.protocol.site_ids if g.principal.scope.admits(s)]
    return render_template("console/participants.html", rows=rows, status=status,
                           site_id=site_id, statuses=STATUSES, sites=sites)
