"""Audit: the timeline of one participant, at any moment or version, as JSON values read
straight from the stored events; the state as recorded at a moment."""

from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson

from domain.participant import CONTACT_FIELDS, Participant, event_uuid, participant_uuid
from domain.service import TrialService
from infrastructure.logs import mask_quoted_addresses, quotes_an_address
from infrastructure.store.stored import plain_stream

log = logging.getLogger("trialog.history")

AUDIT_FIELDS = ("originator_id", "originator_version", "timestamp", "originator_topic",
                "command_id", "actor", "reason", "previous_digest", "digest")


Veil = Callable[[str], str]  # a chain digest as shown outside the store (Trialog.veil_digest)
# Hashes in an event's data that cover other events' data (a signature's: a casebook's
# covers the screening, contact details included): keyed like the digests.
HASHES = ("data_sha256",)


def event_entry(originator_id: UUID, version: int, topic: str,
                content: dict[str, Any], veil: Veil) -> dict[str, Any]:
    """One event as the history shows it, as JSON values: audit fields, then the event's
    own data; its digest, and any hash in its data, keyed by ``veil``."""
    data = {k: v for k, v in content.items() if k not in AUDIT_FIELDS}
    for name in HASHES:
        if name in data:
            data[name] = veil(data[name])
    return {
        "event_id": event_uuid(originator_id, version),
        "type": topic.rsplit(".", 1)[-1],
        "version": version,
        "recorded_at": content["timestamp"],
        "actor": content["actor"],
        "command_id": content["command_id"],
        "reason": content["reason"],
        "data": data,
        "digest": veil(content["digest"]),
    }


REDACTED = "[redacted]"


# An event's own free texts (a query's message, a resolution, a signature's meaning), and
# those of a command's data (a withdrawal's note): where a writer may quote an address.
FREE_TEXT = ("text", "resolution", "meaning")
CAPTURED_FREE_TEXT = ("note",)


def holds_address(text: Any) -> bool:
    """Whether a free text quotes an email address."""
    return isinstance(text, str) and quotes_an_address(text)


def quotes_address(content: dict[str, Any]) -> bool:
    """Whether an event's reason or one of its free texts (or a free text's correction)
    may quote an email address."""
    captured = content.get("data")
    return (any(holds_address(content.get(k))
                for k in ("reason", *FREE_TEXT, "previous_value", "value"))
            or (isinstance(captured, dict)
                and any(holds_address(captured.get(k)) for k in CAPTURED_FREE_TEXT)))


def masked_text(text: Any) -> Any:
    """A free text as a reader without contact rights sees it: an address quoted in it
    masked, as the logs mask it (anything else as it is)."""
    return mask_quoted_addresses(text) if holds_address(text) else text


def with_signatures_masked(holders: Iterable[dict[str, Any]]) -> None:
    """Each holder's ``signature`` (a visit's or the casebook's, in a state or in the read
    models' management) with an address quoted in its meaning masked: a state is shown to
    every role, and the history keeps the meaning whole for those with contact rights."""
    for holder in holders:
        signature = holder.get("signature")
        if signature and holds_address(signature.get("meaning")):
            holder["signature"] = {**signature, "meaning": masked_text(signature["meaning"])}


def _masked(texts: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {k: masked_text(texts[k]) for k in names if holds_address(texts.get(k))}


def redact_contact(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry without contact details (screening data, corrections of them, reminder
    recipients; an address quoted in its reason or a free text, masked as the logs mask
    it), nor, when it held any, its command id: a caller that may issue the command could
    send it again under that id with guessed details, and the answer (the first one, or
    409 for another body) would tell whether the guess was right."""
    data = held = entry["data"]
    quoted = _masked(entry, ("reason",))
    if quoted:
        entry = {**entry, **quoted}
    texts = _masked(data, FREE_TEXT)
    if texts:
        data = {**data, **texts}
    if isinstance(data.get("data"), dict):
        captured = data["data"]
        if CONTACT_FIELDS & captured.keys():
            captured = {k: REDACTED if k in CONTACT_FIELDS and v is not None else v
                        for k, v in captured.items()}
        notes = _masked(captured, CAPTURED_FREE_TEXT)
        if notes:
            captured = {**captured, **notes}
        if captured is not data["data"]:
            data = {**data, "data": captured}
    if data.get("field") in CONTACT_FIELDS:
        data = {**data, "previous_value": REDACTED, "value": REDACTED}
    elif str(data.get("field")).rsplit(".", 1)[-1] in FREE_TEXT + CAPTURED_FREE_TEXT:
        values = _masked(data, ("previous_value", "value"))  # a free text corrected
        if values:
            data = {**data, **values}
    if data.get("recipients"):  # the addresses a reminder went to
        data = {**data, "recipients": [REDACTED for _ in data["recipients"]]}
    if data is held and not quoted:
        return {**entry}
    return {**entry, "data": data, "command_id": REDACTED}


def history(service: TrialService, participant_id: str, as_of: datetime | None = None,
            version: int | None = None, cache: HistoryCache | None = None, *,
            veil: Veil) -> list[dict[str, Any]]:
    """The participant's events, oldest first, up to the recording time ``as_of`` or up to
    and including ``version``; the digests keyed by ``veil`` (the cache's own when
    given)."""
    if cache is not None:
        entries = cache.entries(participant_id, version)
    else:
        stream = participant_uuid(participant_id)
        entries = [event_entry(stream, v, topic, content, veil)
                   for v, topic, content in plain_stream(service, stream, lte=version)]
    if as_of is None:
        return entries
    return [e for e in entries if datetime.fromisoformat(e["recorded_at"]) <= as_of]


class HistoryCache:
    """Participants' histories, kept because recorded events never change: a read decodes
    only the events recorded since the last read of that participant. A participant not
    held yet starts from ``rendered`` when given (the entries' JSON rendered ahead beside
    the feed, with contact details; None when it can't give them) rather than from
    decoding every event. Entries are held as their JSON, which the cyclic garbage
    collector need not walk (held as dicts, a full collection over a full cache took tens
    of milliseconds of a request). Bounded by the number of events held; the least
    recently read participant goes first."""

    def __init__(self, service: TrialService, veil: Veil, max_events: int = 25_000,
                 rendered: Callable[[str], list[bytes] | None] | None = None) -> None:
        self.service = service
        self.veil = veil
        self.rendered = rendered
        self.max_events = max_events
        self._lock = threading.Lock()
        self._streams: OrderedDict[UUID, list[bytes | dict[str, Any]]] = OrderedDict()
        self._held = 0

    def entries(self, participant_id: str, version: int | None = None
                ) -> list[dict[str, Any]]:
        """The participant's events, oldest first, up to and including ``version`` (all
        when None), as new values of the caller's."""
        held = self._held_entries(participant_id)
        return [orjson.loads(e) if isinstance(e, bytes) else copy.deepcopy(e)
                for e in (held if version is None else held[:version])]

    def _held_entries(self, participant_id: str) -> list[bytes | dict[str, Any]]:
        stream = participant_uuid(participant_id)
        with self._lock:
            cached = self._streams.get(stream, [])
            if cached:
                self._streams.move_to_end(stream)
        seeded = False
        if not cached and self.rendered is not None:
            try:
                cached = list(self.rendered(participant_id) or [])
            except Exception:  # the store can still answer: decode it all from there
                log.warning("history of %s: the entries rendered ahead could not be read; "
                            "decoded from the store", participant_id, exc_info=True)
                cached = []
            seeded = bool(cached)
        # Versions run 1, 2, 3...: the list holds versions 1 to len(cached).
        new = plain_stream(self.service, stream, gt=len(cached))
        if not new and not seeded:
            return cached
        entries = cached + [_held(event_entry(stream, v, topic, content, self.veil))
                            for v, topic, content in new]
        with self._lock:
            held = self._streams.get(stream, [])
            if len(entries) > len(held):
                self._streams[stream] = entries
                self._held += len(entries) - len(held)
                while self._held > self.max_events and len(self._streams) > 1:
                    _, evicted = self._streams.popitem(last=False)
                    self._held -= len(evicted)
        return entries


def _held(entry: dict[str, Any]) -> bytes | dict[str, Any]:
    """The entry's JSON; the entry itself where orjson refuses it (an integer past 64
    bits), so that it is kept exactly."""
    try:
        return orjson.dumps(entry)
    except TypeError:
        return entry


def participant_as_of(service: TrialService, participant_id: str,
                      as_of: datetime) -> Participant | None:
    """The participant as recorded at ``as_of``; None before its first event."""
    entries = history(service, participant_id, as_of, veil=str)  # only their versions
    if not entries:
        return None
    return service.get_participant(participant_id, version=entries[-1]["version"])
