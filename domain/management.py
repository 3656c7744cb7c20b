"""Data management on a participant's record: queries to the site, source data
verification, signatures and locks (the commands; their events are the Participant's).

Query status: open -> answered -> closed; answered or closed -> open (reopen); open or
answered -> cancelled. A visit's source verification becomes ``changed_since_verified``
when its data is corrected later, or new data of it (a blood sample) is recorded. A
correction of signed data, or an unlock, invalidates the signature in the same command. A
locked visit or casebook refuses every change of its data; queries, verification and
signing go on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from domain.chain import canonical_json
from domain.commands import Audit
from domain.errors import InvalidTransition, Locked, ValidationFailed
from domain.protocol import Protocol

if TYPE_CHECKING:
    from domain.participant import FieldDefined

# Where each query action may start from, and where it leads.
QUERY_TRANSITIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "respond": (("open",), "answered"),
    "close": (("answered",), "closed"),
    "reopen": (("answered", "closed"), "open"),
    "cancel": (("open", "answered"), "cancelled"),
}
UNRESOLVED = ("open", "answered")  # a query still waiting for someone
CASEBOOK = "casebook"


def visit_key(code: str) -> str:
    return f"visit:{code}"


def data_digest(content: Any) -> str:
    """SHA-256 of the signed data, as canonical JSON."""
    return hashlib.sha256(canonical_json({"signed": content}).encode()).hexdigest()


def signature_view(signature: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if signature is None:
        return None
    return {k: signature[k] for k in ("signed_by", "printed_name", "meaning", "signed_at",
                                      "valid")}


class DataManagement:
    """The data-management commands of a participant (a mixin of Participant, whose
    events and state they use)."""

    if TYPE_CHECKING:
        def __getattr__(self, name: str) -> Any: ...

    # --- queries -------------------------------------------------------------------------

    def raise_query(self, data: Mapping[str, Any], protocol: Protocol, audit: Audit,
                    defined: FieldDefined | None = None) -> None:
        """Opens a query on a visit, or on a captured event and one of its fields (see
        ``require_field``)."""
        query_id = data["query_id"]
        if query_id in self.queries:
            raise InvalidTransition(f"query {query_id} exists already "
                                    f"(status {self.queries[query_id]['status']})")
        target: dict[str, Any]
        if data.get("visit") is not None:
            if protocol.visit(data["visit"]) is None:
                message = f"must be one of: {', '.join(protocol.visit_codes)}"
                raise ValidationFailed({"data.visit": [message]})
            target = {"visit": data["visit"]}
        else:
            version = self.version_of(data["event_id"])
            if version is None:
                message = "is not a data-capturing event of this participant"
                raise ValidationFailed({"data.event_id": [message]})
            if data.get("field") is not None:
                self.require_field(version, data["field"], defined)
            target = {"event_id": data["event_id"], "field": data.get("field")}
        self._require_not_asked(data["text"], target)
        self.trigger_event(self.QueryRaised, query_id=query_id, text=data["text"],
                           target=target, **audit.event_fields())

    def _require_not_asked(self, text: str, target: Mapping[str, Any]) -> None:
        """A query asking what a query still waiting (open or answered) asks of the same
        target is refused: it is the same question sent twice (a form sent again, a
        client's retry under a new id), and would leave the site two to answer."""
        for query in self.queries.values():
            if (query["status"] in UNRESOLVED and query["target"] == target
                    and query["thread"][0]["text"] == text):
                raise InvalidTransition(
                    f"query {query['query_id']} asks this already of the same target "
                    f"(status {query['status']})", status=query["status"],
                    query_id=query["query_id"])

    def act_on_query(self, action: str, data: Mapping[str, Any],
                     audit: Audit) -> None:
        query = self.queries.get(data["query_id"])
        if query is None:
            raise ValidationFailed({"data.query_id": ["is not a query of this participant"]})
        allowed, _ = QUERY_TRANSITIONS[action]
        if query["status"] not in allowed:
            raise InvalidTransition(
                f"can't {action} query {data['query_id']} in status {query['status']}",
                status=query["status"])
        if action == "reopen" and not audit.gives_reason:
            raise ValidationFailed({"reason": ["is required for ReopenQuery"]})
        event = {"respond": self.QueryAnswered, "close": self.QueryClosed,
                 "reopen": self.QueryReopened, "cancel": self.QueryCancelled}[action]
        self.trigger_event(event, query_id=data["query_id"], text=data.get("text"),
                           **audit.event_fields())

    @property
    def open_queries(self) -> int:
        return sum(q["status"] in UNRESOLVED for q in self.queries.values())

    # --- source data verification --------------------------------------------------------

    def sdv_status(self, code: str) -> str:
        verified = self.verified.get(code)
        if verified is None:
            return "not_verified"
        return "verified" if self.changed.get(code, 0) < verified else "changed_since_verified"

    def verify_source(self, data: Mapping[str, Any], protocol: Protocol,
                      audit: Audit) -> None:
        code = data["visit"]
        _require_visit_code(protocol, code)
        if code not in self.completed_visits():
            raise InvalidTransition(f"visit {code} is not completed; only a completed "
                                    "visit can be verified", status="not_completed")
        if self.sdv_status(code) == "verified":
            raise InvalidTransition(f"visit {code} is verified already", status="verified")
        self.trigger_event(self.SourceVerified, visit=code, **audit.event_fields())

    # --- signatures ----------------------------------------------------------------------

    def sign_visit(self, data: Mapping[str, Any], protocol: Protocol,
                   audit: Audit) -> None:
        code = data["visit"]
        _require_visit_code(protocol, code)
        completed = self.completed_visits().get(code)
        if completed is None:
            raise InvalidTransition(f"visit {code} is not completed; only a completed "
                                    "visit can be signed", status="not_completed")
        self._require_unsigned(visit_key(code))
        record = self.records[self.version_of(completed["event_id"])]
        # the visit's data: its form and its blood samples (new data of it, a sample
        # invalidates its signature), each as corrected
        samples = [d for _, d in self.records_of("BloodSampleCollected")
                   if d["timepoint"] == code]
        self._sign(visit_key(code), data, {"form": record["data"], "blood_samples": samples},
                   audit)

    def sign_casebook(self, data: Mapping[str, Any], visit_statuses: dict[str, str],
                      audit: Audit) -> None:
        if self.status not in ("completed", "withdrawn"):
            raise InvalidTransition(f"a casebook is signed once the participant is completed "
                                    f"or withdrawn, not {self.status}", status=self.status)
        pending = [code for code, status in visit_statuses.items()
                   if status not in ("completed", "missed", "cancelled")]
        if pending:
            raise InvalidTransition(f"visits not completed or missed: {', '.join(pending)}",
                                    status=self.status)
        if self.open_queries:
            raise InvalidTransition(f"{self.open_queries} queries are not closed",
                                    status=self.status)
        self._require_unsigned(CASEBOOK)
        records = {str(v): r for v, r in sorted(self.records.items())}
        self._sign(CASEBOOK, data, records, audit)

    def _require_unsigned(self, key: str) -> None:
        signature = self.signatures.get(key)
        if signature is not None and signature["valid"]:
            raise InvalidTransition(f"the {key.replace(':', ' ')} is signed already "
                                    f"by {signature['signed_by']}", status="signed")

    def _sign(self, key: str, data: Mapping[str, Any], content: Any,
              audit: Audit) -> None:
        self.trigger_event(self.RecordSigned, scope=key, meaning=data["meaning"],
                           signed_by=data["signer"], printed_name=data["printed_name"],
                           signed_version=self.version, data_sha256=data_digest(content),
                           **audit.event_fields())

    def invalidate_signatures(self, keys: list[str], cause: str,
                              audit: Audit) -> None:
        """Records, in the command that changed them, that these signatures no longer
        hold."""
        for key in keys:
            signature = self.signatures.get(key)
            if signature is not None and signature["valid"]:
                self.trigger_event(self.SignatureInvalidated, scope=key, cause=cause,
                                   **audit.event_fields())

    # --- locks ---------------------------------------------------------------------------

    def lock(self, key: str, audit: Audit,
             protocol: Protocol | None = None) -> None:
        if key != CASEBOOK:
            code = key.split(":", 1)[1]
            if protocol is not None:
                _require_visit_code(protocol, code)
            if code not in self.completed_visits() and code not in self.missed_visits:
                raise InvalidTransition(f"visit {code} is neither completed nor missed",
                                        status="open")
        if key in self.locks:
            raise InvalidTransition(f"the {key.replace(':', ' ')} is locked already",
                                    status="locked")
        self.trigger_event(self.ScopeLocked, scope=key, **audit.event_fields())

    def unlock(self, key: str, audit: Audit) -> None:
        if key not in self.locks:
            raise InvalidTransition(f"the {key.replace(':', ' ')} is not locked",
                                    status="unlocked")
        if not audit.gives_reason:
            command = "UnlockCasebook" if key == CASEBOOK else "UnlockVisit"
            raise ValidationFailed({"reason": [f"is required for {command}"]})
        self.trigger_event(self.ScopeUnlocked, scope=key, **audit.event_fields())
        self.invalidate_signatures([key], "unlocked", audit)

    def require_unlocked(self, visit: str | None = None) -> None:
        """Refuses a change of data while the casebook, or the visit it belongs to, is
        locked."""
        if CASEBOOK in self.locks:
            raise Locked(f"participant {self.participant_id}'s casebook is locked")
        if visit is not None and visit_key(visit) in self.locks:
            raise Locked(f"visit {visit} of participant {self.participant_id} is locked")


def _require_visit_code(protocol: Protocol, code: str) -> None:
    if protocol.visit(code) is None:
        choices = ", ".join(protocol.visit_codes)
        raise ValidationFailed({"data.visit": [f"must be one of: {choices}"]})
