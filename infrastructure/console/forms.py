"""The console's forms as the contract's command bodies: each form posts one command, which
runs exactly as POST /v1/commands runs it (the same validation, roles, scope and rules);
its refusal is shown next to the field it names."""

from __future__ import annotations

import json
import uuid
from typing import Any

from marshmallow import fields
from werkzeug.datastructures import MultiDict

from infrastructure.api.reads import MAX_VERSION
from infrastructure.store.corrections import NOT_A_FIELD

# The fields of each command's data a form may send; anything else in the form is ignored.
DATA_FIELDS: dict[str, tuple[str, ...]] = {
    "RaiseQuery": ("query_id", "text", "field"),
    "RespondToQuery": ("query_id", "text"),
    "CloseQuery": ("query_id", "text"),
    "CancelQuery": ("query_id", "text"),
    "ReopenQuery": ("query_id",),
    "VerifySource": ("visit",),
    "SignVisit": ("visit", "meaning", "password"),
    "SignCasebook": ("meaning", "password"),
    "LockVisit": ("visit",),
    "UnlockVisit": ("visit",),
    "LockCasebook": (),
    "UnlockCasebook": (),
    "ResolveDeviation": ("deviation_id", "resolution"),
    "CorrectData": ("event_id", "field", "value"),
}
WITH_REASON = frozenset({"ReopenQuery", "UnlockVisit", "UnlockCasebook", "CorrectData"})
# Optional fields: white space alone there is nothing typed (a required one is sent as
# typed, and refused as blank).
OPTIONAL = frozenset({("RaiseQuery", "field"), ("CloseQuery", "text"), ("CancelQuery", "text")})
SIGNING = frozenset({"SignVisit", "SignCasebook"})
# Forms that attest or change the data the page shows: each carries the participant's
# version it was shown at (`expected_version`), so that a record changed meanwhile is
# refused and shown again, not signed, verified, locked, corrected or closed unseen (a
# query closed accepts the answer shown).
AS_SHOWN = SIGNING | {"VerifySource", "LockVisit", "LockCasebook", "CorrectData",
                      "CloseQuery"}

DONE = {
    "RaiseQuery": "Query raised.", "RespondToQuery": "Response sent.",
    "CloseQuery": "Query closed.", "CancelQuery": "Query cancelled.",
    "ReopenQuery": "Query reopened.", "VerifySource": "Visit verified against the source.",
    "SignVisit": "Visit signed.", "SignCasebook": "Casebook signed.",
    "LockVisit": "Visit locked.", "UnlockVisit": "Visit unlocked.",
    "LockCasebook": "Casebook locked.", "UnlockCasebook": "Casebook unlocked.",
    "ResolveDeviation": "Deviation resolved.", "CorrectData": "Correction recorded.",
}


# What a refusal's summary calls each field: the words of its label on the page, not the
# API's name (``text``, ``target``).
LABELS = {"target": "About", "field": "Field", "value": "New value", "reason": "Reason",
          "event_id": "Event", "visit": "Visit", "meaning": "Meaning of the signature",
          "password": "Your password", "resolution": "Resolution", "query_id": "Query",
          "deviation_id": "Deviation"}
TEXT_LABELS = {"RaiseQuery": "Question to the site", "RespondToQuery": "Your response",
               "CloseQuery": "Note", "CancelQuery": "Note"}


def label(kind: str, name: str) -> str:
    """A field of a form as its label names it."""
    if name == "text":
        return TEXT_LABELS.get(kind, "Text")
    return LABELS.get(name, name)


# A value refused for not being a text (marshmallow's words, as the API gives them).
NOT_TEXT = fields.String.default_error_messages["invalid"]


class UnknownForm(ValueError):
    """A form naming no command the console posts."""


def _value(text: str) -> Any:
    """A correction's value as typed: JSON when it reads as JSON (7, true, null, "x"),
    else the text itself (a date, a word, or brackets nested past what the decoder
    reads)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _typed(text: str) -> str:
    """A form's text as sent: trimmed, or as typed when it is white space alone, so that
    the refusal is the API's own (``must not be blank``), not that of a missing field."""
    return text.strip() or text


def whole(text: str, largest: int) -> int | None:
    """A whole number written in ASCII digits, at most ``largest`` (the API's bounds);
    None for anything else (``str.isdigit`` also takes "²", which ``int`` refuses)."""
    if not (text.isascii() and text.isdigit()) or len(text.lstrip("0")) > len(str(largest)):
        return None
    number = int(text)
    return number if number <= largest else None


def command_body(participant_id: str, form: MultiDict[str, str]) -> dict[str, Any]:
    """The command body of a posted form (its ``type``, ``command_id`` and fields)."""
    kind = form.get("type", "")
    if kind not in DATA_FIELDS:
        raise UnknownForm(kind)
    data: dict[str, Any] = {}
    for name in DATA_FIELDS[kind]:
        text = form.get(name, "")
        if name == "password":
            data[name] = text  # as typed: never trimmed, never shown again
        elif name == "value":
            if text.strip():
                data[name] = _value(text.strip())
        elif text.strip() or (text and (kind, name) not in OPTIONAL):
            data[name] = _typed(text)
    if kind == "RaiseQuery":
        target_kind, _, target = form.get("target", "").partition(":")
        if target_kind in ("visit", "event_id") and target:
            data[target_kind] = target
    if kind == "CorrectData" and "value" not in data and "value" in form:
        data["value"] = None
    body: dict[str, Any] = {"command_id": form.get("command_id") or str(uuid.uuid4()),
                            "type": kind, "participant_id": participant_id, "data": data}
    if kind in WITH_REASON and form.get("reason"):
        body["reason"] = _typed(form["reason"])
    shown = form.get("expected_version", "")
    if kind in AS_SHOWN and shown:
        # a version as such; anything else as sent, for the API to refuse it
        version = whole(shown, MAX_VERSION)
        body["expected_version"] = shown if version is None else version
    return body


def field_errors(kind: str, body: dict[str, Any]) -> dict[str, list[str]]:
    """A refusal's fields (dotted paths from the body root) by the form's field names."""
    found: dict[str, list[str]] = {}
    for path, messages in (body.get("fields") or {}).items():
        if path == "expected_version":  # no field of the page: see ``message``
            continue
        name = path.split(".", 1)[1] if path.startswith("data.") else path
        if kind == "RaiseQuery" and name.split(".")[0] in ("visit", "event_id"):
            name = "target"
        name = name.split(".")[0]
        for text in messages:
            # The contract names `data.value` for a field the event's command doesn't
            # define: the form marks the field typed, which is the one at fault.
            at_fault = "field" if kind == "CorrectData" and NOT_A_FIELD in text \
                else name
            found.setdefault(at_fault, []).append(text)
    return found


def message(status: int, body: dict[str, Any], role: str) -> str:
    """What the page says of a refusal, to a person (the API's words speak to a client)."""
    error = body.get("error")
    if error == "validation_failed" and "expected_version" in (body.get("fields") or {}):
        return (f"Refused ({status}): the form was changed or is not this page's: reload "
                "the page and send it again.")
    if error == "validation_failed":
        return "The form has a problem: see the fields marked below."
    if error == "forbidden":
        return f"Refused ({status}): your role ({role.replace('_', ' ')}) may not do this."
    if error == "idempotency_key_reused":
        return (f"Refused ({status}): this form was sent before with other values, and "
                "that version was recorded (see the timeline). Reload the page to send "
                "another.")
    if error == "version_conflict":
        return (f"Refused ({status}): the record changed since this page was shown. What "
                "it holds now is shown here: look at it again before you send the form "
                "again.")
    text = str(body.get("message") or error or "refused")
    return f"Refused ({status}): {text}"


def add_hints(form: MultiDict[str, str], errors: dict[str, list[str]]) -> None:
    """Adds to ``errors``, for a correction's value typed as a number, true, false, null, a
    list or an object and refused as not a text, how to record it as the text typed."""
    typed = form.get("value", "").strip()
    refused = errors.get("value") or []
    if (form.get("type") == "CorrectData" and typed and not isinstance(_value(typed), str)
            and any(message.endswith(NOT_TEXT) for message in refused)):
        refused.append(f"to record it as text, type it in quotes: {json.dumps(typed)}")
