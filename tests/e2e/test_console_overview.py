"""The overview's CONSORT flow, counted from the events: on a trial whose every participant
this module made, the counts of GET /v1/reports/consort are the expected ones, now and at
an earlier moment, for every site and for one; the page shows the API's numbers; the
pages pass axe-core without serious or critical violations; nothing is asked of another
host; screenshots are saved."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from domain.access import Scope
from infrastructure.store.tokens import create_token
from tests.e2e import payloads as p
from tests.e2e.conftest import Client
from tests.e2e.console_support import (  # noqa: F401  (fixtures)
    browser,
    console,
    follow,
    screenshot,
    serious_violations,
    sign_in,
)


def _ok(answer: Any) -> dict[str, Any]:
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def _screen(api: Client, site: str, **changes: Any) -> str:
    pid = p.participant_id(site)
    _ok(api.command("ScreenParticipant", pid, p.screening(site, **changes)))
    return pid


def _randomize(api: Client, site: str) -> str:
    pid = _screen(api, site)
    _ok(api.command("RecordConsent", pid, p.CONSENT))
    _ok(api.command("RandomizeParticipant", pid, p.RANDOMIZE))
    return pid


@pytest.fixture(scope="module")
def trial(console):  # noqa: F811
    """Three participants who never reach randomization, then four randomized: a dose
    taken; three doses not taken, a fourth taken, and a treatment withdrawal; the primary
    endpoint recorded; a study withdrawal."""
    api = console.admin
    failed = _screen(api, "CASE", stage="IV")
    _screen(api, "METRO")  # eligible, not consented yet
    declined = _screen(api, "CASE")
    _ok(api.command("RecordConsent", declined, p.CONSENT))
    last = _ok(api.command("WithdrawParticipant", declined, {
        "withdrawn_on": "2026-03-03", "scope": "study", "reason_code": "withdrew_consent"}))
    history = api.get(f"/v1/participants/{declined}/history").json()["events"]
    before_randomization = history[-1]["recorded_at"]
    dosed, stopped, analysed = (_randomize(api, "CASE") for _ in range(3))
    lost = _randomize(api, "METRO")
    _ok(api.command("RecordDose", dosed, p.dose(1)))
    for day in (1, 2, 3):
        _ok(api.command("RecordDose", stopped, {**p.dose(day), "taken": False}))
    _ok(api.command("RecordDose", stopped, p.dose(4)))
    _ok(api.command("WithdrawParticipant", stopped, {
        "withdrawn_on": "2026-04-01", "scope": "treatment", "reason_code": "adverse_event"}))
    _ok(api.command("CompleteVisit", analysed, p.visit("end_of_treatment", 90, pain=3)))
    _ok(api.command("WithdrawParticipant", lost, {
        "withdrawn_on": "2026-04-02", "scope": "study", "reason_code": "lost_to_follow_up"}))
    arms = {pid: api.get(f"/v1/participants/{pid}").json()["arm"]
            for pid in (dosed, stopped, analysed, lost)}
    failed_criteria = api.get(f"/v1/participants/{failed}").json()["failed_criteria"]
    return {"arms": arms, "dosed": dosed, "took_a_dose": {dosed, stopped}, "failed_criteria": failed_criteria,
            "before_randomization": before_randomization, "position": last["position"]}


def _consort(api: Client, **params: Any) -> dict[str, Any]:
    answer = api.get("/v1/reports/consort", **params)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def _total(flow: dict[str, Any], key: str) -> int:
    return sum(arm[key]["total"] if isinstance(arm[key], dict) else arm[key]
               for arm in flow["arms"].values())


def test_the_api_counts_the_flow_from_the_events(console, trial):  # noqa: F811
    flow = _consort(console.admin)
    assert (flow["assessed"], flow["awaiting_randomization"], flow["randomized"]) == (7, 1, 4)
    excluded = flow["excluded"]
    assert (excluded["total"], excluded["not_eligible"]) == (2, 1)
    assert excluded["failed_criteria"] == {c: 1 for c in trial["failed_criteria"]}
    assert excluded["withdrew_before_randomization"] == {
        "total": 1, "reasons": {"withdrew_consent": 1}}
    by_arm: dict[str, int] = {}
    for arm in trial["arms"].values():
        by_arm[arm] = by_arm.get(arm, 0) + 1
    assert {code: a["allocated"] for code, a in flow["arms"].items() if a["allocated"]} == by_arm
    # B12 received once a dose is taken; control as allocated unless a dose was taken.
    received = sum((pid in trial["took_a_dose"]) == (arm == "b12")
                   for pid, arm in trial["arms"].items())
    assert _total(flow, "received") == received
    assert _total(flow, "not_received") == 4 - received
    assert _total(flow, "discontinued") == 1 and _total(flow, "left_study") == 1
    assert _total(flow, "analysed") == 1 and _total(flow, "not_analysed") == 3
    reasons = [r for a in flow["arms"].values() for r in a["discontinued"]["reasons"]]
    assert reasons == ["adverse_event"]


def test_the_flow_replays_to_an_earlier_moment_and_to_one_site(console, trial):  # noqa: F811
    earlier = _consort(console.admin, as_of=trial["before_randomization"])
    assert (earlier["assessed"], earlier["excluded"]["total"], earlier["randomized"],
            earlier["awaiting_randomization"]) == (3, 2, 0, 1)
    assert _consort(console.admin, as_of="2000-01-01T00:00:00")["assessed"] == 0
    case = Client(console.url, create_token(console.engine, f"case-{uuid.uuid4().hex[:6]}",
                                            "coordinator", Scope.of(["CASE"])))
    scoped = _consort(case)
    assert (scoped["assessed"], scoped["randomized"], scoped["awaiting_randomization"]) == \
        (5, 3, 0)
    assert _total(scoped, "left_study") == 0  # the METRO participant who was lost


def _page_counts(page: Any) -> dict[str, int]:
    cells = page.locator("[data-testid=consort-table] td[data-key]")
    return {cells.nth(i).get_attribute("data-key"): int(cells.nth(i).text_content())
            for i in range(cells.count())}


def _leaves(value: Any, prefix: str = "") -> dict[str, int]:
    if isinstance(value, dict):
        found: dict[str, int] = {}
        for key, child in value.items():
            found.update(_leaves(child, f"{prefix}{key}."))
        return found
    return {prefix[:-1]: value} if isinstance(value, int) else {}


@pytest.mark.parametrize("role", ["data_manager", "coordinator"])
def test_the_overview_shows_the_apis_numbers(console, browser, trial, role):  # noqa: F811
    api = console.admin if role == "data_manager" else Client(console.url, create_token(
        console.engine, f"case-{uuid.uuid4().hex[:6]}", "coordinator", Scope.of(["CASE"])))
    context = browser.new_context(timezone_id="UTC")
    try:
        page = sign_in(context, console, console.logins[role])
        assert _page_counts(page) == _leaves(_consort(api))
        assessed = page.locator("svg text[data-key=assessed]").text_content()
        assert f"(n={_consort(api)['assessed']})" in assessed
        page.get_by_label("Flow as recorded at (your time, UTC)").fill(
            trial["before_randomization"][:19])
        follow(page.get_by_role("button", name="Show"))
        # (a moment typed to the second is the end of that second)
        assert _page_counts(page) == _leaves(
            _consort(api, as_of=trial["before_randomization"][:19] + ".999999"))
    finally:
        context.close()


def test_pages_pass_axe_ask_nothing_of_another_host_and_are_screenshot(
        console, browser, trial):  # noqa: F811
    """Also: each page names an icon (else a browser asks the API for /favicon.ico and
    is answered 401; Playwright leaves that request out of its events), and nothing a
    page asks for is refused."""
    # bypass_csp: the page allows no inline script, and axe is injected as one.
    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    asked: list[str] = []
    refused: list[tuple[str, int]] = []
    context.on("request", lambda request: asked.append(request.url))
    context.on("response", lambda answer: answer.status >= 400 and refused.append(
        (answer.url, answer.status)))
    try:
        page = sign_in(context, console, console.logins["monitor"])
        screenshot(page, "overview")
        pages = {"overview": "/console/", "work list": "/console/work/queries",
                 "participant": f"/console/participants/{trial['dosed']}"}
        for name, path in pages.items():
            page.goto(console.page_url(path))
            assert serious_violations(page) == [], name
            assert page.locator("link[rel=icon]").count() == 1, name  # no /favicon.ico
        page.set_viewport_size({"width": 820, "height": 1180})  # a tablet
        page.goto(console.page_url(f"/console/participants/{trial['dosed']}"))
        assert serious_violations(page) == [], "participant on a tablet"
        screenshot(page, "participant-tablet")
    finally:
        context.close()
    others = [url for url in asked if not url.startswith(console.url + "/")]
    assert asked and others == []
    assert refused == []


def test_on_a_phone_no_page_pans_sideways(console, browser, trial):  # noqa: F811
    """At 390 px the work lists and the participants' list were wider than the screen and
    the whole page panned, their last columns off it; a wide table now scrolls in a
    region of its own, reachable by keyboard, as the participant page's do."""
    context = browser.new_context(viewport={"width": 390, "height": 844})
    try:
        page = sign_in(context, console, console.logins["monitor"])
        paths = ["/console/", "/console/participants",
                 f"/console/participants/{trial['dosed']}",
                 *(f"/console/work/{name}" for name in ("queries", "due", "deviations",
                                                         "verify", "sign", "quarantine"))]
        for path in paths:
            page.goto(console.page_url(path))
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, (path, width)
            for table in page.locator("table.list").all():
                region = table.locator("xpath=..")
                assert region.get_attribute("role") == "region", path
                assert region.get_attribute("tabindex") == "0", path
        # The flow diagram shrank to the screen, its text 6 px high: it keeps 11 px or
        # more, and scrolls sideways in a region of its own.
        page.goto(console.page_url("/console/"))
        diagram = page.locator("svg.chart").first
        scale = diagram.evaluate("svg => svg.getBoundingClientRect().width "
                                 "/ svg.viewBox.baseVal.width")
        assert 13 * scale >= 11, scale
        region = diagram.locator("xpath=../..")
        assert (region.get_attribute("role"), region.get_attribute("tabindex")) == (
            "region", "0")
    finally:
        context.close()
