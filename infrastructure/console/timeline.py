"""The timeline of a participant's record as the page shows it: for each event, who, when,
why, and what it recorded or changed, from the history the API answers."""

from __future__ import annotations

from typing import Any

from domain.participant import CAPTURED_BY

MAX_ITEMS = 40


def _text(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value) or "—"
    return str(value)


def flatten(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted path, value as text) of every leaf of a JSON value."""
    if isinstance(data, dict):
        items: list[tuple[str, str]] = []
        for key, value in data.items():
            items += flatten(value, f"{prefix}{key}.")
        return items
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        return [item for i, v in enumerate(data) for item in flatten(v, f"{prefix}{i}.")]
    return [(prefix[:-1], _text(data))]


def changes(entry: dict[str, Any]) -> list[tuple[str, str]]:
    """What the event recorded or changed, as (field, value) pairs."""
    data = entry["data"]
    if entry["type"] == "DataCorrected":
        return [(data["field"], f"{_text(data['previous_value'])} → {_text(data['value'])}")]
    if entry["type"] in CAPTURED_BY:
        shown = flatten(data.get("data") or {})
        shown += [(k, _text(v)) for k, v in data.items()
                  if k in ("eligible", "failed_criteria", "arm")]
    else:
        shown = flatten({k: v for k, v in data.items()
                         if k not in ("data_sha256", "signed_version", "participant_id")})
    return shown[:MAX_ITEMS]


PAGE = 100  # events a page shows; older ones are a link away


def page_of(history: list[dict[str, Any]], page: int) -> list[dict[str, Any]]:
    """One page of the history's events, newest first, each with its ``changes``."""
    newest = len(history) - (page - 1) * PAGE
    shown = history[max(0, newest - PAGE):max(0, newest)]
    return [{**e, "changes": changes(e)} for e in reversed(shown)]


def pages(history: list[dict[str, Any]]) -> int:
    return max(1, -(-len(history) // PAGE))


def capture_events(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events whose data can be corrected or queried: id, version, type and a label."""
    found = []
    for e in history:
        if e["type"] in CAPTURED_BY:
            data = e["data"].get("data") or {}
            detail = data.get("visit") or data.get("taken_on") or data.get("timepoint") or ""
            found.append({"event_id": e["event_id"], "version": e["version"],
                          "type": e["type"],
                          "label": f"v{e['version']} {e['type']} {detail}".strip()})
    return found


SCREENINGS = ("ParticipantScreened", "ParticipantRescreened")


def contact_of(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The contact details as the record holds them: the latest screening's, with the
    corrections of that screening applied (read from the history the page shows, so the
    record is not replayed a second time)."""
    screening, contact = None, {"email": None, "birth_date": None}
    for e in history:
        data = e["data"]
        if e["type"] in SCREENINGS:
            captured = data.get("data") or {}
            screening = e["event_id"]
            contact = {k: captured.get(k) for k in contact}
        elif (e["type"] == "DataCorrected" and data.get("target_event_id") == screening
              and data.get("field") in contact):
            contact[data["field"]] = data["value"]
    return contact
