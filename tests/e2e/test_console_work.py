"""The work of each role in the browser: a monitor raises a query and the coordinator
answers it, the monitor closes it and verifies the visit, the investigator signs with the
password (a wrong one refused), and anyone replays the participant to an earlier moment;
the same through the forms with JavaScript off."""

from __future__ import annotations

from datetime import timedelta

import pytest
import requests

from tests.e2e import payloads as p
from tests.e2e.console_support import (  # noqa: F401  (fixtures)
    PASSWORD,
    browser,
    console,
    follow,
    form_session,
    screenshot,
    sign_in,
)
from tests.e2e.test_lifecycle import enrol


@pytest.fixture
def visited(console):  # noqa: F811
    """A CASE participant with a completed baseline visit."""
    pid, _ = enrol(console.admin, "CASE")
    answer = console.admin.command("CompleteVisit", pid, p.visit("baseline", 0))
    assert answer.status_code == 201, answer.text
    return pid


def _as(browser, console, role, pid, **context_options):  # noqa: F811
    context = browser.new_context(**context_options)
    page = sign_in(context, console, console.logins[role],
                   path=f"/console/participants/{pid}")
    assert page.url.startswith(console.page_url(f"/console/participants/{pid}")), page.url
    return context, page


def _api_state(console, pid):  # noqa: F811
    answer = console.admin.get(f"/v1/participants/{pid}")
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_query_raised_answered_and_closed_then_the_visit_verified(console, browser,  # noqa: F811
                                                                    visited):
    pid = visited
    monitor, page = _as(browser, console, "monitor", pid)
    try:
        page.get_by_label("About").select_option("visit:baseline")
        page.get_by_label("Question to the site").fill("Worst pain 7 but average 5?")
        follow(page.get_by_role("button", name="Raise the query"))
        assert "Query raised." in page.get_by_role("status").first.inner_text()
        assert page.get_by_test_id("open-queries").inner_text() == "1"
        assert page.get_by_test_id("query-status").inner_text() == "open"
    finally:
        monitor.close()

    coordinator, page = _as(browser, console, "coordinator", pid)
    try:
        assert page.get_by_role("button", name="Raise the query").count() == 0  # not theirs
        follow(page.get_by_role("button", name="Respond"))  # empty: the contract's 422
        assert page.get_by_text("There is a problem").is_visible()
        # The summary names the field as its label does, not as the API does ("text").
        summary = page.locator(".error-summary a").first.inner_text()
        assert summary.startswith("Your response: "), summary
        assert page.locator("[aria-invalid=true]").count() == 1
        page.get_by_label("Respond: your response").fill("The source says average 5.")
        follow(page.get_by_role("button", name="Respond"))
        assert "Response sent." in page.get_by_role("status").first.inner_text()
        assert page.get_by_test_id("query-status").inner_text() == "answered"
    finally:
        coordinator.close()

    monitor, page = _as(browser, console, "monitor", pid)
    try:
        # A close accepts the answer shown: one given again meanwhile is shown first.
        query_id = console.admin.get("/v1/queries", participant_id=pid).json()["queries"][0][
            "query_id"]
        reopened = console.admin.command("ReopenQuery", pid, {"query_id": query_id},
                                         reason="asked again")
        assert reopened.status_code == 201, reopened.text
        again = console.admin.command("RespondToQuery", pid, {
            "query_id": query_id, "text": "Average 5 after all."})
        assert again.status_code == 201, again.text
        with page.expect_response(lambda r: r.request.method == "POST") as answer:
            follow(page.get_by_role("button", name="Close"))
        assert answer.value.status == 409
        assert "Average 5 after all." in page.locator(".thread").inner_text()
        follow(page.get_by_role("button", name="Close"))
        assert page.get_by_test_id("query-status").inner_text() == "closed"
        follow(page.get_by_role("button", name="Verify baseline"))
        assert "Visit verified" in page.get_by_role("status").first.inner_text()
        row = page.locator("tr[data-visit=baseline]")
        assert row.get_by_test_id("sdv").inner_text() == "verified"
        assert page.get_by_role("button", name="Verify baseline").count() == 0
    finally:
        monitor.close()
    state = _api_state(console, pid)
    assert state["open_queries"] == 0 and state["visits"][0]["sdv"] == "verified"
    history = console.admin.get(f"/v1/participants/{pid}/history").json()["events"]
    steps = [(e["type"], e["actor"]) for e in history[-6:]]
    setup = steps[2][1]  # the setting-up token's
    assert steps == [("QueryRaised", console.logins["monitor"]),
                     ("QueryAnswered", console.logins["coordinator"]),
                     ("QueryReopened", setup),
                     ("QueryAnswered", setup),
                     ("QueryClosed", console.logins["monitor"]),
                     ("SourceVerified", console.logins["monitor"])]


def test_the_investigator_signs_with_the_password_and_a_wrong_one_is_refused(
        console, browser, visited):  # noqa: F811
    pid = visited
    context, page = _as(browser, console, "investigator", pid)
    try:
        follow(page.get_by_role("link", name="Sign baseline"))
        assert page.get_by_role("dialog").is_visible()
        page.get_by_label("Your password").fill("not my password at all")
        with page.expect_response(lambda r: r.request.method == "POST") as answer:
            follow(page.get_by_role("button", name="Sign", exact=True))
        assert answer.value.status == 401
        assert "not the signer's current password" in page.get_by_role("alert").inner_text()
        assert "not my password" not in page.content()
        assert _api_state(console, pid)["visits"][0]["signature"] is None
        page.get_by_label("Your password").fill(PASSWORD)
        follow(page.get_by_role("button", name="Sign", exact=True))
        assert "Visit signed." in page.get_by_role("status").first.inner_text()
        signature = page.locator("tr[data-visit=baseline]").get_by_test_id("signature")
        assert "Investigator" in signature.inner_text()
        assert "I approve the data of this visit" in signature.inner_text()
    finally:
        context.close()
    signed = _api_state(console, pid)["visits"][0]["signature"]
    assert (signed["signed_by"], signed["valid"]) == (console.logins["investigator"], True)


def _correct_baseline_worst_pain(console, pid, worst):  # noqa: F811
    events = console.admin.get(f"/v1/participants/{pid}/history").json()["events"]
    visit = next(e for e in events if e["type"] == "VisitCompleted")
    corrected = console.admin.command("CorrectData", pid, {
        "event_id": visit["event_id"], "field": "bpi_sf.worst", "value": worst},
        reason="read again from the source")
    assert corrected.status_code == 201, corrected.text


def test_a_signature_or_verification_sent_after_the_data_changed_is_refused_and_shown_again(
        console, browser, visited):  # noqa: F811
    """The signing dialog signed whatever the record held when its form was sent: data
    corrected while it was open was signed as approved by someone who never saw it (and a
    visit verified the same way). A form that attests what it shows now carries the version
    it showed, and a changed record is shown again to be looked at before it is sent."""
    pid = visited
    context, page = _as(browser, console, "investigator", pid)

    def signed_items(test_id: str) -> list[str]:
        return [" ".join(item.split()) for item in
                page.get_by_test_id(test_id).locator("div").all_inner_texts()]

    try:
        follow(page.get_by_role("link", name="Sign baseline"))
        assert "bpi_sf.worst 7" in signed_items("signed-form")  # what is signed, shown
        _correct_baseline_worst_pain(console, pid, 10)
        page.get_by_label("Your password").fill(PASSWORD)
        with page.expect_response(lambda r: r.request.method == "POST") as answer:
            follow(page.get_by_role("button", name="Sign", exact=True))
        assert answer.value.status == 409
        assert "changed since" in page.get_by_role("alert").inner_text()
        assert _api_state(console, pid)["visits"][0]["signature"] is None
        assert "bpi_sf.worst 10" in signed_items("signed-form")  # the record as it is now
        page.get_by_label("Your password").fill(PASSWORD)
        follow(page.get_by_role("button", name="Sign", exact=True))
        assert "Visit signed." in page.get_by_role("status").first.inner_text()
        # A sample is data of its visit: the dialog shows it beside the form.
        sample = {"timepoint": "baseline", "collected_at": "2026-03-04T08:30:00Z",
                  "results": {"b12_pg_ml": 410.0}}
        assert console.admin.command("RecordBloodSample", pid, sample).status_code == 201
        page.goto(console.page_url(f"/console/participants/{pid}"))
        follow(page.get_by_role("link", name="Sign baseline"))
        assert "results.b12_pg_ml 410.0" in signed_items("signed-sample")
        page.get_by_label("Your password").fill(PASSWORD)
        follow(page.get_by_role("button", name="Sign", exact=True))
        assert "Visit signed." in page.get_by_role("status").first.inner_text()
    finally:
        context.close()
    state = _api_state(console, pid)
    assert state["visits"][0]["signature"]["valid"] is True
    signed = [e for e in console.admin.get(f"/v1/participants/{pid}/history").json()["events"]
              if e["type"] == "RecordSigned"]
    assert signed[-1]["data"]["signed_version"] == state["version"] - 1
    assert len(signed) == 2
    context, page = _as(browser, console, "monitor", pid)
    try:
        _correct_baseline_worst_pain(console, pid, 9)
        with page.expect_response(lambda r: r.request.method == "POST") as answer:
            follow(page.get_by_role("button", name="Verify baseline"))
        assert answer.value.status == 409
        assert "changed since" in page.locator("#verify-baseline-error").inner_text()
        assert _api_state(console, pid)["visits"][0]["sdv"] == "not_verified"
        follow(page.get_by_role("button", name="Verify baseline"))
        assert _api_state(console, pid)["visits"][0]["sdv"] == "verified"
    finally:
        context.close()


def test_the_signing_dialog_marks_the_field_at_fault_and_names_what_is_signed(
        console, browser, visited):  # noqa: F811
    """A blank meaning was marked on the password (aria-invalid) and its message tied to
    no field; every signing page was titled "Sign"; a visit the participant has no
    schedule for offered the casebook's dialog, whose refusal named a field not shown."""
    pid = visited
    context, page = _as(browser, console, "investigator", pid)
    try:
        follow(page.get_by_role("link", name="Sign baseline"))
        assert page.title().startswith(f"Sign visit baseline of {pid}")
        page.get_by_label("Meaning of the signature").fill("   ")
        page.get_by_label("Your password").fill(PASSWORD)
        follow(page.get_by_role("button", name="Sign", exact=True))
        meaning = page.get_by_label("Meaning of the signature")
        assert meaning.get_attribute("aria-invalid") == "true"
        error = page.locator("#" + meaning.get_attribute("aria-describedby"))
        assert "blank" in error.inner_text()
        assert page.get_by_label("Your password").get_attribute("aria-invalid") is None
        assert page.title().startswith("Not signed: ")
        assert page.evaluate("document.activeElement.id") == "sign-error"  # focus on it
    finally:
        context.close()
    screened = p.participant_id("CASE")
    assert console.admin.command("ScreenParticipant", screened,
                                 p.screening("CASE")).status_code == 201
    session = form_session(console, console.logins["investigator"])
    answer = session.get(console.page_url(f"/console/participants/{screened}/sign?visit=week6"),
                         timeout=30)
    assert answer.status_code == 404 and "has no visit week6 scheduled" in answer.text


def test_a_console_address_of_no_page_answers_a_console_page(console, visited):  # noqa: F811
    """An address of no page, or a page asked by a method it doesn't take (the address a
    refused form leaves in the bar, asked again), answered the API's JSON without the
    console's headers."""
    session = form_session(console, console.logins["monitor"])
    nowhere = session.get(console.page_url("/console/nope"), timeout=30)
    assert nowhere.status_code == 404 and nowhere.headers["Content-Type"].startswith("text/html")
    assert nowhere.headers["Cache-Control"] == "no-store"
    assert "default-src 'self'" in nowhere.headers["Content-Security-Policy"]
    assert 'aria-label="Console"' in nowhere.text  # the signed-in person's navigation
    signed_out = requests.get(console.page_url("/console/nope"), timeout=30)
    assert signed_out.status_code == 404 and 'aria-label="Console"' not in signed_out.text
    put = session.put(console.page_url(f"/console/participants/{visited}/commands"), timeout=30)
    assert put.status_code == 405 and "POST" in put.headers["Allow"]
    assert put.headers["Content-Type"].startswith("text/html")
    assert 'aria-label="Console"' in put.text
    again = session.get(console.page_url(f"/console/participants/{visited}/commands"),
                        timeout=30, allow_redirects=False)
    assert again.status_code == 303
    assert again.headers["Location"].endswith(f"/console/participants/{visited}")
    bare = session.get(console.page_url("/console"), timeout=30, allow_redirects=False)
    assert bare.status_code == 308 and bare.headers["Location"].endswith("/console/")
    assert "default-src 'self'" in bare.headers["Content-Security-Policy"]
    assert bare.headers["X-Frame-Options"] == "DENY"
    api = console.admin.get("/v1/nope")  # the API's own answer is as ever
    assert api.status_code == 404 and api.json()["error"] == "not_found"


def test_a_coordinator_may_not_sign(console, browser, visited):  # noqa: F811
    context, page = _as(browser, console, "coordinator", visited)
    try:
        assert page.get_by_role("link", name="Sign baseline").count() == 0
        answer = page.goto(console.page_url(f"/console/participants/{visited}/sign"
                                            "?visit=baseline"))
        assert answer.status == 403
    finally:
        context.close()


def test_the_visits_cells_line_up_in_their_rows_empty_actions_too(console, browser, visited):  # noqa: F811
    context, page = _as(browser, console, "monitor", visited)
    try:
        rows = page.locator("[data-testid=visits] tbody tr")
        assert rows.count() > 1  # the baseline, which the monitor may verify, and the rest
        for i in range(rows.count()):
            boxes = [cell.bounding_box() for cell in rows.nth(i).locator("th, td").all()]
            assert len(boxes) == 9
            assert {(round(b["y"]), round(b["height"])) for b in boxes} == {
                (round(boxes[0]["y"]), round(boxes[0]["height"]))}, boxes
    finally:
        context.close()


def test_the_record_is_replayed_to_an_earlier_event(console, browser, visited):  # noqa: F811
    pid = visited
    raised = console.admin.command("RaiseQuery", pid, {"query_id": "9b3f0f64-4a52-4c3e-9d6b-"
                                                       f"{pid[-10:].rjust(12, '0')}",
                                                       "text": "Check", "visit": "baseline"})
    assert raised.status_code == 201, raised.text
    context, page = _as(browser, console, "auditor", pid)
    try:
        assert page.get_by_test_id("version").inner_text() == "5"
        assert page.get_by_test_id("open-queries").inner_text() == "1"
        screenshot(page, "participant")
        follow(page.get_by_role("link", name="Replay to version 4"))
        assert "as it stood at version 4" in page.get_by_test_id("replay").inner_text()
        assert page.get_by_test_id("version").inner_text() == "4"
        assert page.get_by_test_id("open-queries").inner_text() == "0"
        assert page.locator("tr[data-version]").count() == 4
        follow(page.get_by_role("link", name="Replay to version 3"))
        assert page.get_by_test_id("status").inner_text() == "randomized"
        assert page.locator("tr[data-visit=baseline] td").nth(2).inner_text() == "—"  # completed
        follow(page.get_by_role("link", name="Back to now"))
        assert page.get_by_test_id("version").inner_text() == "5"
    finally:
        context.close()


def test_the_forms_work_without_javascript(console, browser, visited):  # noqa: F811
    context, page = _as(browser, console, "monitor", visited, java_script_enabled=False)
    try:
        page.get_by_label("Question to the site").fill("Asked with scripts off")
        follow(page.get_by_role("button", name="Raise the query"))
        assert page.get_by_test_id("query-status").inner_text() == "open"
        assert page.locator("time[data-moment]").first.inner_text().endswith("UTC")
        page.goto(console.page_url("/console/"))
        assert page.locator("svg.chart").count() == 4
    finally:
        context.close()


def test_contact_details_show_to_the_roles_that_see_them_and_are_logged(
        console, browser, visited):  # noqa: F811
    pid = visited
    screening = console.admin.get(f"/v1/participants/{pid}/history").json()["events"][0]
    corrected = console.admin.command("CorrectData", pid, {
        "event_id": screening["event_id"], "field": "email", "value": "new@example.org"},
        reason="the participant moved")
    assert corrected.status_code == 201, corrected.text
    context, page = _as(browser, console, "coordinator", pid)
    try:
        facts = page.get_by_test_id("state").inner_text()
        assert "new@example.org" in facts and "participant@example.org" not in facts
    finally:
        context.close()
    context, page = _as(browser, console, "monitor", pid)
    try:
        assert "@example.org" not in page.content()
    finally:
        context.close()
    session = form_session(console, console.logins["coordinator"])  # HEAD: no page shown
    assert session.head(console.page_url(f"/console/participants/{pid}"),
                        timeout=30).status_code == 200
    log = console.admin.get("/v1/audit/access", participant_id=pid).json()["disclosures"]
    shown = [(d["actor"], d["endpoint"]) for d in log if "/console/" in d["endpoint"]]
    assert shown == [(console.logins["coordinator"], f"GET /console/participants/{pid}")]


def test_dates_are_shown_in_the_readers_locale(console, browser, visited):  # noqa: F811
    context, page = _as(browser, console, "auditor", visited, locale="de-DE",
                        timezone_id="Europe/Berlin")
    try:
        registered = page.locator("[data-testid=state] time[data-day]").first
        assert registered.get_attribute("datetime") == "2026-03-04"
        assert registered.inner_text() == "04.03.2026"
        recorded = page.locator("[data-testid=timeline] time[data-moment]").first
        # Localized, in the reader's zone, and saying which (it said no zone at all).
        assert not recorded.inner_text().endswith("UTC")
        assert recorded.inner_text().endswith(("MEZ", "MESZ")), recorded.inner_text()
    finally:
        context.close()


def test_a_time_typed_to_replay_is_the_readers_own(console, browser, visited):  # noqa: F811
    """The timeline showed times in the reader's zone, to the minute, and the replay box
    took UTC: a New York reader typing a time shown there replayed the record five hours
    early (or found nothing), and a time read to the minute missed its own event. With
    scripts on, the timeline shows seconds and the box takes the reader's time; the
    overview's box too, and it shows again, in the reader's time, the moment asked."""
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    new_york = ZoneInfo("America/New_York")
    context, page = _as(browser, console, "auditor", visited, timezone_id="America/New_York",
                        locale="en-US")
    try:
        newest = page.locator("tr[data-version]").first
        version = newest.get_attribute("data-version")
        shown = newest.locator("time[data-moment]").inner_text().replace("\u202f", " ")
        typed = datetime.strptime(shown.rsplit(" ", 1)[0], "%b %d, %Y, %I:%M:%S %p")
        box = page.get_by_label("Replay as recorded at (your time, America/New_York)")
        box.fill(typed.strftime("%Y-%m-%dT%H:%M:%S"))  # as read off the timeline
        follow(page.get_by_role("button", name="Replay"))
        assert page.get_by_test_id("version").inner_text() == version
        recorded = datetime.fromisoformat(
            page.locator("tr[data-version]").first.locator("time[data-moment]")
            .get_attribute("datetime"))
        asked = datetime.fromisoformat(page.url.split("as_of=")[1].replace("%3A", ":"))
        assert asked == typed.replace(tzinfo=new_york).astimezone(UTC)
        assert asked <= recorded < asked + timedelta(seconds=1)  # within the second typed

        page.goto(console.page_url("/console/"))
        box = page.get_by_label("Flow as recorded at (your time, America/New_York)")
        box.fill(typed.strftime("%Y-%m-%dT%H:%M:%S"))
        follow(page.get_by_role("button", name="Show"))
        asked = datetime.fromisoformat(page.url.split("as_of=")[1].replace("%3A", ":"))
        assert asked == typed.replace(tzinfo=new_york).astimezone(UTC)
        shown_again = page.get_by_label("Flow as recorded at (your time, America/New_York)"
                                        ).input_value()  # (":00" seconds left out)
        assert datetime.fromisoformat(shown_again) == typed
        # Second 0, which the field sends without its ":00": second 0, not the minute.
        box = page.get_by_label("Flow as recorded at (your time, America/New_York)")
        box.fill("2026-12-01T10:00:00")
        follow(page.get_by_role("button", name="Show"))
        shown_again = page.get_by_label("Flow as recorded at (your time, America/New_York)"
                                        ).input_value()
        assert datetime.fromisoformat(shown_again) == datetime(2026, 12, 1, 10, 0, 0)
    finally:
        context.close()


def test_a_correction_refused_then_recorded_through_the_form(console, browser, visited):  # noqa: F811
    pid = visited
    context, page = _as(browser, console, "coordinator", pid)
    try:
        page.get_by_label("Event").select_option(label="v4 VisitCompleted baseline")
        page.get_by_label("Field (as the command spells it").fill("bpi_sf.worst")
        page.get_by_label("New value").fill("11")  # out of range: the contract's 422
        page.get_by_label("Reason").fill("transcription error")
        with page.expect_response(lambda r: r.request.method == "POST") as answer:
            follow(page.get_by_role("button", name="Record the correction"))
        assert answer.value.status == 422
        value = page.get_by_label("New value")
        assert value.get_attribute("aria-invalid") == "true"
        assert page.locator("#correct-value-error").inner_text() != ""
        value.fill("8")
        follow(page.get_by_role("button", name="Record the correction"))
        assert "Correction recorded." in page.get_by_role("status").first.inner_text()
        newest = page.locator("tr[data-version]").first
        assert "bpi_sf.worst: 7 → 8" in newest.inner_text()
        assert "transcription error" in newest.inner_text()
    finally:
        context.close()


def test_a_moment_before_the_record_is_named_in_the_readers_zone(console, browser,  # noqa: F811
                                                                 visited):
    """A replay before the first event was refused naming the moment in UTC, while the
    reader had typed it in their own zone."""
    context, page = _as(browser, console, "auditor", visited, timezone_id="America/New_York",
                        locale="en-US")
    try:
        page.get_by_label("Replay as recorded at (your time, America/New_York)").fill(
            "2020-01-02T03:04:05")
        follow(page.get_by_role("button", name="Replay"))
        said = page.locator("main").inner_text()
        assert "has no event recorded at or before Jan 2, 2020, 3:04:05 AM EST" in said, said
        follow(page.get_by_role("link", name=f"The record of {visited} now"))
        assert page.get_by_test_id("version").is_visible()
        assert page.get_by_role("navigation", name="Console").is_visible()
    finally:
        context.close()


def test_a_refused_form_keeps_the_event_and_the_visit_chosen(console, browser, visited):  # noqa: F811
    """A refused form came back with its choices reset to their first option while the
    texts were kept: the correction sent again went to the newest event, not the one
    chosen, and the query to the baseline visit. Each choice now comes back as sent."""
    pid = visited
    context, page = _as(browser, console, "coordinator", pid)
    try:
        event = page.get_by_label("Event")
        options = event.locator("option")
        oldest = options.nth(options.count() - 1).get_attribute("value")
        assert oldest != options.first.get_attribute("value")
        event.select_option(oldest)
        page.get_by_label("Field (as the command spells it").fill("language")
        page.get_by_label("New value").fill('"es"')
        follow(page.get_by_role("button", name="Record the correction"))  # no reason
        assert page.get_by_label("Event").input_value() == oldest
    finally:
        context.close()
    monitor, page = _as(browser, console, "monitor", pid)
    try:
        page.get_by_label("About").select_option("visit:week6")
        follow(page.get_by_role("button", name="Raise the query"))  # no question
        assert page.locator("#raise-text-error").inner_text() != ""
        assert page.get_by_label("About").input_value() == "visit:week6"
    finally:
        monitor.close()


def test_a_query_sent_again_after_back_is_refused_not_raised_twice(console, browser,  # noqa: F811
                                                                   visited):
    """Back, then the same question sent again, raised a second query: the page drawn
    again carried new ids. The second is refused, naming the first."""
    pid = visited
    monitor, page = _as(browser, console, "monitor", pid)
    try:
        for attempt in range(2):
            page.get_by_label("About").select_option("visit:baseline")
            page.get_by_label("Question to the site").fill("Worst pain 7 but average 5?")
            follow(page.get_by_role("button", name="Raise the query"))
            if attempt == 0:
                assert "Query raised." in page.get_by_role("status").first.inner_text()
                page.go_back()
        refusal = page.get_by_role("alert").first.inner_text()
        assert "asks this already of the same target" in refusal, refusal
    finally:
        monitor.close()
    assert _api_state(console, pid)["open_queries"] == 1


def test_a_query_s_step_shows_its_reason_beside_its_text(console, visited):  # noqa: F811
    """A reopening's text hid its required reason in the page's thread."""
    import uuid

    from domain.access import Scope
    from infrastructure.store.tokens import create_token
    from tests.e2e.conftest import Client

    def client(role):
        return Client(console.url, create_token(console.engine, f"{role}-{uuid.uuid4().hex}",
                                                role, Scope.of(["CASE"])))

    monitor, coordinator, query = client("monitor"), client("coordinator"), str(uuid.uuid4())
    for who, type_, data, reason in (
            (monitor, "RaiseQuery", {"text": "Worst pain 9?", "visit": "baseline"}, None),
            (coordinator, "RespondToQuery", {"text": "9, as the source"}, None),
            (monitor, "CloseQuery", {}, None),
            (monitor, "ReopenQuery", {"text": "Please look again"}, "the source was misread")):
        answer = who.command(type_, visited, {"query_id": query, **data},
                             **({"reason": reason} if reason else {}))
        assert answer.status_code == 201, answer.text
    session = form_session(console, console.logins["monitor"])
    page = session.get(console.page_url(f"/console/participants/{visited}"), timeout=30,
                       params={"after": answer.json()["position"]})
    assert page.status_code == 200
    assert "Please look again (reason: the source was misread)</li>" in page.text
    work = session.get(console.page_url("/console/work/queries"), timeout=30,
                       params={"after": answer.json()["position"]})
    assert "<td>Please look again (reason: the source was misread)</td>" in work.text


def test_a_number_the_page_does_not_read_is_refused_not_failed(console, visited):  # noqa: F811
    """`?version=²` (a digit to str.isdigit, not to int), a version past PostgreSQL's
    bigint, and `?page=²` or `?after=²` answered 500."""
    session = form_session(console, console.logins["monitor"])
    path = console.page_url(f"/console/participants/{visited}")
    for query, status in (("version=²", 422), ("version=99999999999999999999999", 422),
                          ("version=2147483649", 422), ("page=²", 200), ("after=²", 200),
                          ("page=99999999999999999999999", 200),
                          # In the year 10000 in UTC, or at the end of what a date holds.
                          ("as_of=9999-12-31T23:59:59-01:00", 422),
                          ("as_of=9999-12-31T23:59:59", 422), ("as_of=0001-01-01", 422)):
        answer = session.get(f"{path}?{query}", timeout=30)
        assert answer.status_code == status, (query, answer.status_code)
    overview = session.get(console.page_url("/console/"), timeout=30,
                           params={"as_of": "9999-12-31T23:59:59-01:00"})
    assert overview.status_code == 422 and "must be a moment from" in overview.text


def test_a_data_manager_locks_and_unlocks_with_a_reason(console, browser, visited):  # noqa: F811
    context, page = _as(browser, console, "data_manager", visited)
    try:
        follow(page.get_by_role("button", name="Lock baseline"))
        assert "Visit locked." in page.get_by_role("status").first.inner_text()
        follow(page.get_by_role("button", name="Unlock baseline"))  # no reason: refused
        assert page.locator("#unlock-baseline-reason-error").is_visible()
        page.get_by_label("Reason to unlock baseline").fill("   ")  # the API's own refusal
        follow(page.get_by_role("button", name="Unlock baseline"))
        assert "must not be blank" in page.locator("#unlock-baseline-reason-error").inner_text()
        assert page.get_by_role("button", name="Unlock baseline").is_visible()
        page.get_by_label("Reason to unlock baseline").fill("a late lab result")
        follow(page.get_by_role("button", name="Unlock baseline"))
        assert "Visit unlocked." in page.get_by_role("status").first.inner_text()
        assert page.get_by_role("button", name="Lock baseline").is_visible()
    finally:
        context.close()


def test_the_investigator_signs_a_completed_casebook(console, browser):  # noqa: F811
    pid, _ = enrol(console.admin, "CASE")
    for code, day in (("baseline", 0), ("week6", 42), ("end_of_treatment", 90),
                      ("follow_up", 180)):
        answer = console.admin.command("CompleteVisit", pid, p.visit(code, day))
        assert answer.status_code == 201, answer.text
    context, page = _as(browser, console, "investigator", pid)
    try:
        assert page.get_by_test_id("status").inner_text() == "completed"
        follow(page.get_by_role("link", name="Sign the casebook"))
        assert "Sign the casebook" in page.get_by_role("heading", level=1).inner_text()
        page.get_by_label("Your password").fill(PASSWORD)
        follow(page.get_by_role("button", name="Sign", exact=True))
        assert "Casebook signed." in page.get_by_role("status").first.inner_text()
        assert "I approve the data of this casebook" in \
            page.get_by_test_id("casebook").inner_text()
        assert page.get_by_role("link", name="Sign the casebook").count() == 0
    finally:
        context.close()


def test_a_casebook_signing_would_refuse_is_not_offered(console, browser):  # noqa: F811
    """Withdrawn with the baseline neither completed nor marked missed: SignCasebook
    refuses it, so neither the page nor the work list offers it."""
    pid, _ = enrol(console.admin, "CASE")
    withdrawal = {"withdrawn_on": (p.REGISTERED + timedelta(days=3)).isoformat(),
                  "scope": "study", "reason_code": "moved"}
    answer = console.admin.command("WithdrawParticipant", pid, withdrawal)
    assert answer.status_code == 201, answer.text
    listed = console.admin.get(f"/v1/participants?status=withdrawn&wait=10"
                               f"&after={answer.json()['position']}")  # the read models hold it
    assert pid in {row["participant_id"] for row in listed.json()["participants"]}
    context, page = _as(browser, console, "investigator", pid)
    try:
        assert page.get_by_test_id("status").inner_text() == "withdrawn"
        assert page.get_by_role("link", name="Sign the casebook").count() == 0
        page.goto(console.page_url("/console/work/sign"))
        assert page.get_by_role("heading", level=1).count() == 1
        assert pid not in page.content()
    finally:
        context.close()
