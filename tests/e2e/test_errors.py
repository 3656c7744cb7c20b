"""Every error class of the contract, and nothing stored for any of them."""

from __future__ import annotations

import json
import re
import uuid

import pytest
import requests

from domain.participant import participant_uuid
from tests.e2e import payloads as p
from tests.e2e.test_lifecycle import enrol


def history_length(client, pid: str) -> int:
    answer = client.get(f"/v1/participants/{pid}/history")
    return len(answer.json()["events"]) if answer.status_code == 200 else 0


def test_malformed_json_is_a_400(server):
    answer = requests.post(f"{server.url}/v1/commands", data="{not json",
                           headers={"Authorization": f"Bearer {server.tokens['service']}",
                                    "Content-Type": "application/json"}, timeout=10)
    assert answer.status_code == 400
    assert answer.json()["error"] == "malformed_json"


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer not-a-token", "Basic abc"])
def test_no_or_a_bad_token_is_a_401(server, header):
    headers = {"Authorization": header} if header else {}
    pid = p.participant_id()
    body = {"command_id": str(uuid.uuid4()), "type": "ScreenParticipant",
            "participant_id": pid, "data": p.screening()}
    answer = requests.post(f"{server.url}/v1/commands", json=body, headers=headers, timeout=10)
    assert answer.status_code == 401
    assert answer.json()["error"] == "unauthorized"
    assert history_length(server.client("admin"), pid) == 0


def test_a_command_for_an_unknown_participant_is_a_404(server):
    answer = server.client("service").command("RecordConsent", p.participant_id(), p.CONSENT)
    assert answer.status_code == 404
    assert answer.json()["error"] == "not_found"


def test_randomizing_a_screen_failure_is_not_eligible(server):
    service = server.client("service")
    pid = p.participant_id()
    screened = service.command("ScreenParticipant", pid, p.screening(stage="IV"))
    assert screened.status_code == 201  # a failed criterion is a screen failure, not a 422
    refused = service.command("RecordConsent", pid, p.CONSENT)
    assert (refused.status_code, refused.json()["error"]) == (409, "not_eligible")
    assert "stage" in refused.json()["failed_criteria"]


def test_rescreening_an_eligible_participant_is_an_invalid_transition(server):
    service = server.client("service")
    pid, _ = enrol(service)
    again = service.command("ScreenParticipant", pid, p.screening())
    assert (again.status_code, again.json()["error"]) == (409, "invalid_transition")
    assert history_length(service, pid) == 3


def test_a_stale_expected_version_is_a_version_conflict(server):
    service = server.client("service")
    pid, _ = enrol(service)
    stale = service.command("RecordDose", pid, p.dose(0), expected_version=2)
    assert stale.status_code == 409
    assert stale.json() | {"message": ""} == {
        "error": "version_conflict", "message": "", "expected_version": 2,
        "actual_version": 3}
    assert service.command("RecordDose", pid, p.dose(0), expected_version=3).status_code == 201


UNPROCESSABLE = [
    ({"type": "MakeCoffee"}, "type"),
    ({"command_id": "not-a-uuid"}, "command_id"),
    ({"participant_id": ""}, "participant_id"),
    ({"data": p.screening() | {"screened_on": "2026-02-30"}}, "data.screened_on"),
    ({"data": p.screening() | {"site_id": "NOWHERE"}}, "data.site_id"),
    ({"data": p.screening() | {"language": "fr"}}, "data.language"),
    ({"data": p.screening() | {"shoe_size": 38}}, "data.shoe_size"),
    ({"data": p.screening(zubrod=7)}, "data.eligibility.zubrod"),
    ({"data": p.screening(stage="V")}, "data.eligibility.stage"),
    ({"data": p.screening(metastatic="no")}, "data.eligibility.metastatic"),
    ({"data": p.screening(analgesics=[{"drug": "gabapentin"}])},
     "data.eligibility.analgesics.0.stable_since"),
    ({"data": p.screening(er_positive=None, pgr_positive=None)}, "data.eligibility.er_positive"),
    ({"expected_version": -1}, "expected_version"),
]


@pytest.mark.parametrize(("change", "path"), UNPROCESSABLE)
def test_a_field_breaking_its_rule_is_a_422_naming_the_field(server, change, path):
    pid = p.participant_id()
    body = {"command_id": str(uuid.uuid4()), "type": "ScreenParticipant",
            "participant_id": pid, "data": p.screening(), **change}
    answer = server.client("service").post("/v1/commands", body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "validation_failed"
    assert path in answer.json()["fields"]
    assert history_length(server.client("admin"), pid) == 0


@pytest.mark.parametrize(("data", "path"), [
    (p.visit("week6", 42) | {"bpi_sf": {"worst": 11}}, "data.bpi_sf.worst"),
    (p.visit("week6", 42) | {"fact_es": {"GP1": 5}}, "data.fact_es.GP1"),
    (p.visit("week6", 42) | {"fact_es": {"XX9": 1}}, "data.fact_es.XX9"),
    (p.visit("week6", 42) | {"visit": "week7"}, "data.visit"),
])
def test_an_out_of_range_score_is_a_422(server, data, path):
    service = server.client("service")
    pid, _ = enrol(service)
    answer = service.command("CompleteVisit", pid, data)
    assert answer.status_code == 422
    assert path in answer.json()["fields"]
    assert history_length(service, pid) == 3


def test_a_correction_needs_a_reason_and_a_value_of_the_recorded_type(server):
    coordinator = server.client("coordinator")
    pid, _ = enrol(coordinator)
    screening = coordinator.get(f"/v1/participants/{pid}/history").json()["events"][0]
    data = {"event_id": screening["event_id"], "field": "birth_date", "value": "1958-06-16"}
    no_reason = coordinator.command("CorrectData", pid, data)
    assert (no_reason.status_code, list(no_reason.json()["fields"])) == (422, ["reason"])
    wrong_type = coordinator.command("CorrectData", pid, data | {"value": 1958},
                                     reason="transcription error")
    assert list(wrong_type.json()["fields"]) == ["data.value"]
    fixed = coordinator.command("CorrectData", pid, data, reason="transcription error")
    assert fixed.status_code == 201
    state = coordinator.get(f"/v1/participants/{pid}", after=fixed.json()["position"]).json()
    assert state["contact"]["birth_date"] == "1958-06-16"


@pytest.mark.parametrize("blank", ["   ", " \t ", "\n", "\u200b", "\u2060\u00ad",
                                   " \u3164 ", "\u200e\u0301"])
def test_a_required_text_of_white_space_only_is_a_422_and_stores_nothing(server, blank):
    """A reason for a change, a medication's name or a query's text that says nothing was
    stored as given; so was one of invisible characters alone (a zero-width space, a word
    joiner and a soft hyphen, a Hangul filler, a direction mark with an accent on it)."""
    coordinator = server.client("coordinator")
    pid, _ = enrol(coordinator)
    length = history_length(coordinator, pid)
    screening = coordinator.get(f"/v1/participants/{pid}/history").json()["events"][0]
    correction = coordinator.command("CorrectData", pid, {
        "event_id": screening["event_id"], "field": "birth_date", "value": "1958-06-16"},
        reason=blank)
    assert (correction.status_code, correction.json()["fields"]) == (
        422, {"reason": ["must not be blank"]})
    medication = coordinator.command("ReportMedication", pid, {
        "drug": blank, "contains_b12": False, "started_on": "2026-03-05"})
    assert (medication.status_code, medication.json()["fields"]) == (
        422, {"data.drug": ["must not be blank"]})
    query = server.client("monitor").command("RaiseQuery", pid, {
        "query_id": str(uuid.uuid4()), "event_id": screening["event_id"],
        "field": "birth_date", "text": blank})
    assert (query.status_code, query.json()["fields"]) == (
        422, {"data.text": ["must not be blank"]})
    assert history_length(coordinator, pid) == length


def test_control_characters_are_refused_in_queries_and_commands(server):
    service = server.client("service")
    query = service.get("/v1/deviations", code="wash\x00out")
    assert (query.status_code, list(query.json()["fields"])) == (422, ["code"])
    pid, _ = enrol(service)
    medication = {"drug": "multi\x00vitamin", "contains_b12": True}
    answer = service.command("ReportMedication", pid, medication)
    assert (answer.status_code, list(answer.json()["fields"])) == (422, ["data.drug"])
    assert history_length(service, pid) == 3
    # U+FFFF is no character, and no XML document (the ODM export) may hold it.
    query = server.client("monitor").command("RaiseQuery", pid, {
        "query_id": str(uuid.uuid4()), "visit": "baseline", "text": "odd \uffff text"})
    assert (query.status_code, query.json()["fields"]) == (422, {"data.text": [
        "must not contain control characters or the noncharacters U+FFFE and U+FFFF"]})
    assert history_length(service, pid) == 3


def test_a_moment_in_no_year_a_date_holds_is_refused_not_failed(server):
    """`as_of=9999-12-31T23:59:59-01:00` is in the year 10000 in UTC: the state and the
    report answered 500 (an OverflowError). (The console's replay: test_console_work.)"""
    from infrastructure.cli import CliError, parse_moment
    from infrastructure.store.schemas import MOMENT_RULE

    service = server.client("service")
    pid, _ = enrol(service)
    for moment in ("9999-12-31T23:59:59-01:00", "9999-12-31T23:00:00", "0001-01-01T00:00:00",
                   "0001-01-01T12:00:00+13:00"):
        for path in (f"/v1/participants/{pid}", f"/v1/participants/{pid}/history",
                     "/v1/reports/consort"):
            answer = service.get(path, as_of=moment)
            assert (answer.status_code, answer.json().get("fields")) == (
                422, {"as_of": [MOMENT_RULE]}), (path, moment, answer.text)
        with pytest.raises(CliError, match=re.escape(MOMENT_RULE)):
            parse_moment(moment)
    assert service.get(f"/v1/participants/{pid}", as_of="9999-12-30T23:59:59Z"
                       ).status_code == 200


def test_an_integer_past_64_bits_is_refused_for_the_range_it_breaks(server):
    """JSON decodes an integer past 64 bits as a float: the refusal said "Not a valid
    integer." of a whole number, not the range it breaks."""
    service = server.client("service")
    data = p.screening("CASE")
    data["eligibility"]["zubrod"] = 10**20
    answer = service.command("ScreenParticipant", p.participant_id("CASE"), data)
    assert (answer.status_code, answer.json()["fields"]) == (422, {
        "data.eligibility.zubrod": [
            "Must be greater than or equal to 0 and less than or equal to 4."]})
    data["eligibility"]["zubrod"] = 2.0  # a float is still no whole number
    answer = service.command("ScreenParticipant", p.participant_id("CASE"), data)
    assert answer.json()["fields"] == {"data.eligibility.zubrod": ["Not a valid integer."]}


def _raw_post(server, path: str, data: bytes, **headers: str) -> requests.Response:
    return requests.post(f"{server.url}{path}", data=data, timeout=30, headers={
        "Authorization": f"Bearer {server.tokens['service']}",
        "Content-Type": "application/json", **headers})


def test_text_no_encoder_can_write_is_malformed_json_and_stores_nothing(server):
    """A lone surrogate escape decodes to no character: refused as the body is read, it
    never reaches a transaction (where it failed every command grouped with it)."""
    service = server.client("service")
    pid, _ = enrol(service)
    body = {"command_id": str(uuid.uuid4()), "type": "ReportMedication",
            "participant_id": pid, "data": {"drug": "SURROGATE", "contains_b12": False}}
    raw = json.dumps(body).replace("SURROGATE", "a\\ud800b")  # JSON's escape of one
    answer = _raw_post(server, "/v1/commands", raw.encode())
    assert (answer.status_code, answer.json()["error"]) == (400, "malformed_json")
    assert "surrogate" in answer.json()["message"]
    batch = _raw_post(server, "/v1/commands/batch",
                      b'{"commands": [' + raw.encode() + b"]}")
    assert (batch.status_code, batch.json()["error"]) == (400, "malformed_json")
    assert history_length(service, pid) == 3


@pytest.mark.parametrize("path", ["/v1/commands", "/v1/commands/batch",
                                  "/v1/trial/commands", "/v1/sessions"])
def test_every_json_body_is_read_by_one_rule(server, path):
    """Nested past any command's depth, not UTF-8, cut short, or NaN: a 400 saying why,
    the same on every endpoint that takes a body (not a 500, not a bare 'bad request')."""
    for data, why in ((b"[" * 5000 + b"]" * 5000, "depth limit exceeded"),
                      (b'{"login": "\xff"}', "not valid UTF-8"),
                      (b'{"login": "a"', "ends before its JSON value does"),
                      (b'{"login": NaN}', "at character 11 of the body")):
        answer = _raw_post(server, path, data)
        assert answer.status_code == 400, (data[:20], answer.text)
        assert answer.json()["error"] == "malformed_json"
        assert why in answer.json()["message"], answer.json()


def test_a_body_larger_than_the_server_takes_is_a_413_before_it_is_read(server):
    answer = _raw_post(server, "/v1/commands/batch", b" " * (8 * 2**20 + 1))
    assert (answer.status_code, answer.json()["error"]) == (413, "body_too_large")
    assert "8 MiB" in answer.json()["message"]
    # Sent chunked (no Content-Length), it was cut at the limit and refused as JSON that
    # ends too soon (400 malformed_json).
    pieces = iter([b" " * (8 * 2**20), b"{"])  # one byte over: all of it read
    chunked = _raw_post(server, "/v1/commands/batch", pieces)  # type: ignore[arg-type]
    assert (chunked.status_code, chunked.json()["error"]) == (413, "body_too_large")


def test_delete_and_c1_controls_are_control_characters_too(server):
    service = server.client("service")
    pid, _ = enrol(service)
    for drug in ("multi\x7fvitamin", "multi\x85vitamin", "multi\x9bvitamin"):
        answer = service.command("ReportMedication", pid, {"drug": drug,
                                                           "contains_b12": True})
        assert (answer.status_code, list(answer.json()["fields"])) == (422, ["data.drug"])
    assert history_length(service, pid) == 3


def test_a_request_id_is_kept_as_a_log_can_hold_it(server):
    """X-Request-Id is echoed and logged (and kept in the access log of contact details,
    100 characters at most): a longer or unprintable one is kept as far as it can be, not
    a 500 when a read of contact details records it, nor a refused request."""
    admin = server.client("admin")
    pid, _ = enrol(admin)
    for given, kept in (("r" * 100, "r" * 100), ("r" * 250, "r" * 100),
                        ("two words", "twowords")):
        answer = admin.session.get(f"{server.url}/v1/participants/{pid}",
                                   headers={"X-Request-Id": given}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Request-Id"] == kept
    blank = admin.session.get(f"{server.url}/v1/participants/{pid}",
                              headers={"X-Request-Id": "\u00e9\u00e9"}, timeout=30)
    assert blank.status_code == 200 and len(blank.headers["X-Request-Id"]) == 36  # a new one


def test_a_body_may_start_with_a_byte_order_mark_and_sign_in_reads_bodies_alike(server):
    pid = p.participant_id()
    body = {"command_id": str(uuid.uuid4()), "type": "ScreenParticipant",
            "participant_id": pid, "data": p.screening()}
    answer = _raw_post(server, "/v1/commands", b"\xef\xbb\xbf" + json.dumps(body).encode())
    assert answer.status_code == 201, answer.text
    for path in ("/v1/commands", "/v1/sessions"):
        not_json = requests.post(f"{server.url}{path}", data="login=a", timeout=30, headers={
            "Authorization": f"Bearer {server.tokens['service']}",
            "Content-Type": "application/x-www-form-urlencoded"})
        assert (not_json.status_code, not_json.json()["error"]) == (400, "malformed_json")


@pytest.mark.parametrize("path", ["", "/history"])
def test_an_id_no_participant_can_have_is_not_found_on_every_participant_route(server, path):
    answer = server.client("admin").get(f"/v1/participants/a%00b{path}")
    assert (answer.status_code, answer.json()["error"]) == (404, "not_found")


def test_an_unexpected_failure_answers_the_contract_s_500(isolated_url, monkeypatch):
    from infrastructure.readside import queries
    from tests.e2e.test_consistency import _in_process

    def fails(*args, **kwargs):
        raise RuntimeError("a fault in the program")

    monkeypatch.setattr(queries, "list_participants", fails)
    with _in_process(isolated_url) as (_, app, headers):
        answer = app.test_client().get("/v1/participants", headers=headers)
    assert answer.status_code == 500
    assert answer.json == {"error": "internal_error",
                           "message": "the server failed; the error is logged"}


def _batch(app, headers, *commands):
    """POST /v1/commands/batch to the in-process app: (type, participant id, data) each."""
    body = [{"command_id": str(uuid.uuid4()), "type": kind, "participant_id": pid,
             "data": data} for kind, pid, data in commands]
    return app.test_client().post("/v1/commands/batch", json={"commands": body},
                                  headers=headers)


def test_a_batch_command_that_fails_by_a_fault_is_answered_500_alone(isolated_url, monkeypatch):
    """A command of a batch that fails otherwise than by a rule (a fault of the server) is
    answered 500 in its place, nothing of it written; the commands around it are written
    (the contract: a failed command does not stop the ones after it)."""
    from domain.service import TrialService
    from tests.e2e.test_consistency import _in_process

    faulty, sound = p.participant_id(), p.participant_id()
    consent = TrialService.record_consent

    def fails_for_one(self, participant, cmd, audit):
        decided = consent(self, participant, cmd, audit)  # its event made, then the fault
        if participant.participant_id == faulty:
            raise RuntimeError("a fault in the program")
        return decided

    monkeypatch.setattr(TrialService, "record_consent", fails_for_one)
    with _in_process(isolated_url) as (trialog, app, headers):
        answer = _batch(app, headers, ("ScreenParticipant", faulty, p.screening()),
                        ("ScreenParticipant", sound, p.screening()),
                        ("RecordConsent", faulty, p.CONSENT),
                        ("RecordConsent", sound, p.CONSENT))
        assert answer.status_code == 200, answer.text
        results = answer.json["results"]
        assert [r["status"] for r in results] == [201, 201, 500, 201]
        assert results[2]["body"]["error"] == "internal_error"
        assert trialog.service.get_participant(faulty).version == 1  # screened only
        assert trialog.service.get_participant(sound).version == 2


def test_a_database_error_in_one_command_of_a_batch_writes_nothing_of_it(isolated_url,
                                                                         monkeypatch):
    """A database error is the whole transaction's (PostgreSQL refuses every statement
    after one), not one command's: the request fails and nothing of the batch is
    written."""
    import sqlalchemy

    from domain.service import TrialService
    from tests.e2e.test_consistency import _in_process

    faulty, sound = p.participant_id(), p.participant_id()
    consent = TrialService.record_consent

    def database_fails_for_one(self, participant, cmd, audit):
        if participant.participant_id == faulty:
            raise sqlalchemy.exc.ProgrammingError("SELECT", {}, Exception("no such table"))
        return consent(self, participant, cmd, audit)

    monkeypatch.setattr(TrialService, "record_consent", database_fails_for_one)
    with _in_process(isolated_url) as (trialog, app, headers):
        answer = _batch(app, headers, ("ScreenParticipant", sound, p.screening()),
                        ("ScreenParticipant", faulty, p.screening()),
                        ("RecordConsent", faulty, p.CONSENT))
        assert answer.status_code == 500, answer.text
        assert answer.json["error"] == "internal_error"
        assert not list(trialog.service.events.get(participant_uuid(sound)))


@pytest.mark.parametrize("path, params, named", [
    ("/v1/participants/{pid}", {"asof": "2020-01-01T00:00:00"}, "asof"),
    ("/v1/participants/{pid}/history", {"version ": "1"}, "version "),
    ("/v1/participants", {"stauts": "withdrawn"}, "stauts"),
    ("/v1/feed", {"afterr": "5"}, "afterr"),
    ("/v1/exports/csv", {"deidentfy": "true"}, "deidentfy"),
])
def test_a_query_parameter_no_route_takes_is_a_422_naming_it(server, path, params, named):
    """A misspelt `as_of` answered today's record as if it were the historical one; a
    misspelt filter, the whole list."""
    auditor = server.client("auditor")
    pid, _ = enrol(server.client("service"))
    answer = auditor.get(path.format(pid=pid), **params)
    assert answer.status_code == 422, answer.text
    assert list(answer.json()["fields"]) == [named]


@pytest.mark.parametrize("path, name, values", [
    ("/v1/queries", "status", ["open", "closed"]),
    ("/v1/participants", "status", ["randomized", "completed"]),
    ("/v1/participants/{pid}/history", "version", ["1", "2"]),
    ("/v1/feed", "after", ["0", "5"]),
    ("/v1/exports/csv", "deidentify", ["true", "false"]),
    ("/v1/reports/consort", "as_of", ["2026-01-01T00:00:00", "2026-02-01T00:00:00"]),
])
def test_a_query_parameter_given_twice_is_a_422_naming_it(server, path, name, values):
    """`?status=open&status=closed` answered the open queries alone, as if the list were
    whole: the second value was dropped unseen."""
    auditor = server.client("auditor")
    pid, _ = enrol(server.client("service"))
    answer = auditor.get(path.format(pid=pid), **{name: values})
    assert answer.status_code == 422, answer.text
    assert answer.json()["fields"] == {name: ["given 2 times: give one value"]}
    assert auditor.get(path.format(pid=pid), **{name: values[0]}).status_code == 200
    unknown = auditor.get(path.format(pid=pid), **{name: values, "zz": ["1", "2"]})
    assert unknown.json()["fields"] == {name: ["given 2 times: give one value"],
                                        "zz": ["Unknown field."]}
    assert auditor.get(path.format(pid=pid), zz=["1", "2"]).json()["fields"] == {
        "zz": ["Unknown field."]}


@pytest.mark.parametrize("path, name, wrong, right, named", [
    ("/v1/participants", "arm", "B12", "b12", "b12, control"),
    ("/v1/deviations", "code", "missed_visit", "visit_missed", "visit_missed"),
    ("/v1/participants", "site_id", "case", "CASE", "CASE, METRO"),
    ("/v1/queries", "site_id", "NOPE", "METRO", "CASE, METRO"),
])
def test_a_filter_on_a_value_no_row_can_hold_is_a_422_naming_it(server, path, name, wrong,
                                                                  right, named):
    """`?arm=B12` (or `?site_id=case`) answered an empty list, as if no participant were
    in the arm (or at the site)."""
    monitor = server.client("monitor")
    answer = monitor.get(path, **{name: wrong})
    assert (answer.status_code, list(answer.json()["fields"])) == (422, [name])
    assert named in answer.text
    assert monitor.get(path, **{name: right}).status_code == 200


def test_history_checks_its_after_as_the_state_does(server):
    service = server.client("service")
    pid, position = enrol(service)
    answer = service.get(f"/v1/participants/{pid}/history", after=2**40)
    assert (answer.status_code, list(answer.json()["fields"])) == (422, ["after"])
    assert service.get(f"/v1/participants/{pid}/history", after=position).status_code == 200

