"""The console's forms as command bodies: what a person typed, as the API takes it."""

from __future__ import annotations

from werkzeug.datastructures import MultiDict

from infrastructure.console.forms import command_body


def _body(kind: str, **fields: str) -> dict:
    return command_body("CASE-0001", MultiDict({"type": kind, **fields}))


def test_white_space_alone_is_sent_as_typed_where_the_field_is_required():
    """So the refusal is the API's `must not be blank`, not that of a missing field."""
    assert _body("RaiseQuery", query_id="q", text="  \n")["data"]["text"] == "  \n"
    assert _body("UnlockVisit", visit="baseline", reason=" ")["reason"] == " "
    assert _body("RaiseQuery", query_id="q", text="  Worst pain?  ")["data"]["text"] == \
        "Worst pain?"


def test_white_space_alone_in_an_optional_field_is_nothing_typed():
    """A stray newline in an optional note refused the whole form."""
    assert "text" not in _body("CloseQuery", query_id="q", text="\n")["data"]
    assert "text" not in _body("CancelQuery", query_id="q", text=" ")["data"]
    assert "field" not in _body("RaiseQuery", query_id="q", text="?", field=" ")["data"]
    assert _body("CloseQuery", query_id="q", text=" fixed ")["data"]["text"] == "fixed"


def test_a_value_nested_past_what_the_decoder_reads_is_sent_as_typed():
    """Brackets nested 100,000 deep failed the page (500): the decoder's recursion limit
    is no ValueError. The text goes as typed, and the API's rules judge it."""
    deep = "[" * 100_000
    assert _body("CorrectData", event_id="e", field="f", value=deep)["data"]["value"] == deep
    assert _body("CorrectData", event_id="e", field="f", value="[[7]]")["data"]["value"] == [[7]]


def test_a_refusal_speaks_to_a_person_and_says_how_to_type_a_number_as_text():
    from infrastructure.console.forms import add_hints, message

    assert message(403, {"error": "forbidden", "message": "token 'mon' (role monitor) may "
                         "not issue CorrectData"}, "data_manager") == \
        "Refused (403): your role (data manager) may not do this."
    assert "that version was recorded" in message(
        409, {"error": "idempotency_key_reused", "message": "command_id x was ..."}, "monitor")
    form = MultiDict({"type": "CorrectData", "value": "2.0"})
    errors = {"value": ["Not a valid string."]}
    add_hints(form, errors)
    hint = 'to record it as text, type it in quotes: "2.0"'
    assert errors["value"] == ["Not a valid string.", hint]
    out_of_range = {"value": ["Must be between 0 and 10."]}
    add_hints(MultiDict({"type": "CorrectData", "value": "11"}), out_of_range)
    assert len(out_of_range["value"]) == 1  # no hint where a number was asked for
    an_object = {"value": ["Not a valid string."]}
    add_hints(MultiDict({"type": "CorrectData", "value": '{"a": 1}'}), an_object)
    assert an_object["value"][1].endswith(r'"{\"a\": 1}"')  # quoted as JSON reads it


def test_a_correction_of_a_field_the_event_has_not_is_marked_on_the_field():
    """The API names `data.value` (as the contract says); the form marked the value
    typed, not the field that names nothing."""
    from infrastructure.console.forms import field_errors

    body = {"fields": {"data.value": ["'visit_note' is not a field of CompleteVisit"]}}
    assert field_errors("CorrectData", body) == {
        "field": ["'visit_note' is not a field of CompleteVisit"]}
    body = {"fields": {"data.value": ["bpi_sf.worst: Must be between 0 and 10."]}}
    assert list(field_errors("CorrectData", body)) == ["value"]


def test_a_refusal_names_each_field_as_its_label_does():
    from infrastructure.console.forms import label

    assert [label("RaiseQuery", n) for n in ("text", "target", "field")] == [
        "Question to the site", "About", "Field"]
    assert [label("CorrectData", n) for n in ("event_id", "value", "reason")] == [
        "Event", "New value", "Reason"]
    assert label("RespondToQuery", "text") == "Your response"


def test_a_moment_to_replay_is_the_end_of_the_second_written():
    """A time read off the timeline (to the second) and typed to replay came before the
    event recorded within that second, which the replay then left out. A time without
    seconds is second 0 (a date-and-time field sends ":00" seconds so)."""
    from datetime import UTC, datetime

    from flask import Flask

    from infrastructure.console.pages import moment

    with Flask(__name__).test_request_context():
        assert moment("2026-12-07T05:13:43Z") == datetime(2026, 12, 7, 5, 13, 43, 999999,
                                                          tzinfo=UTC)
        assert moment("2026-12-07 05:13") == datetime(2026, 12, 7, 5, 13, 0, 999999,
                                                      tzinfo=UTC)
        assert moment("2026-12-07T00:13:43-05:00") == datetime(2026, 12, 7, 5, 13, 43,
                                                               999999, tzinfo=UTC)
        assert moment("2026-12-07T05:13:43.25Z") == datetime(2026, 12, 7, 5, 13, 43, 250000,
                                                             tzinfo=UTC)
        assert moment("") is None


def test_a_form_that_attests_what_it_shows_sends_the_version_shown():
    assert _body("SignVisit", visit="baseline", meaning="m", password="p",
                 expected_version="7")["expected_version"] == 7
    assert _body("CloseQuery", query_id="q", expected_version="3")["expected_version"] == 3
    assert "expected_version" not in _body("RespondToQuery", query_id="q", text="t",
                                           expected_version="3")
    assert "expected_version" not in _body("VerifySource", visit="baseline",
                                           expected_version="")
    for tampered in ("abc", "-1", "\u0663", " 5", "9" * 5000):  # as sent, for the API
        assert _body("VerifySource", visit="baseline",
                     expected_version=tampered)["expected_version"] == tampered


def test_a_tampered_version_is_no_field_of_the_page_but_a_page_to_reload():
    """A refused expected_version was marked on a field the page doesn't have, and the
    page said to see the fields marked below."""
    from infrastructure.console.forms import field_errors, message

    refused = {"error": "validation_failed",
               "fields": {"expected_version": ["Not a valid integer."]}}
    assert field_errors("VerifySource", refused) == {}
    assert "reload the page" in message(422, refused, "monitor")
