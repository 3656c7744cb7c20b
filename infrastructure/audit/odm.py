"""The auditors' export: one CDISC ODM 1.3.2 document, transactional, built from the event
store, so every change to the record is in it with its AuditRecord.

Each data-capturing event is one ``FormData`` (its repeat key is the event's version) with
one AuditRecord: who (``UserRef``), where (the participant's site), when (the recording
time) and the command (``SourceID``). A correction is an ``ItemData`` update of the item it
names, in the same form, with its own AuditRecord and ``ReasonForChange``, so the document
holds both values. Deviations, missed visits and reminders are forms too.

Data management is recorded where it applies, each step in a ``Context`` element with its
own AuditRecord: a query step as an ``Annotation`` (the thread's text as ``Comment``, flags
``QUERY_STATUS`` and ``QUERY_ID``) on the visit, form or item it targets; source
verification, and a later correction of the verified visit, as an ``SDV`` flag on the
visit; a signature as a ``Signature`` (its meaning a ``SignatureDef`` in ``AdminData``, the
signer a ``User`` with the printed name as ``FullName``) on the visit, or on the subject for
the casebook; invalidated signatures and locks as flags. Casebook-level steps follow the
participant's ``SubjectData`` as ``SubjectData`` elements of their own (a transactional
file may repeat a subject; a subject holds one ``AuditRecord`` and one ``Signature``).

The items are the fields of each command's ``data`` schema, so what is exported is what
is accepted. The document is streamed with constant memory: the clinical data goes to a
spooled temporary file while the users are gathered (``AdminData`` comes before
``ClinicalData`` in ODM), then the whole is yielded in chunks.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from dataclasses import field as default
from datetime import UTC, date, datetime
from typing import Any
from xml.sax.saxutils import escape as _escape
from xml.sax.saxutils import quoteattr

from marshmallow import Schema, fields

from domain.access import EVERY_SITE, Scope
from domain.errors import DomainError
from domain.management import CASEBOOK, QUERY_TRANSITIONS
from domain.participant import (
    CAPTURED_BY,
    CONTACT_FIELDS,
    Participant,
    event_uuid,
    screening_outcome,
)
from domain.participant import place as participant_place
from domain.protocol import Protocol
from infrastructure.audit.exports import Deidentifier
from infrastructure.audit.history import holds_address, masked_text, quotes_address
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.stored import UnreadableEvent, participant_events

ODM_NAMESPACE = "http://www.cdisc.org/ns/odm/v1.3"
METADATA_VERSION = "MDV.1"
# Contact details: the contact fields and the addresses reminders went to.
CONTACT_ITEMS = CONTACT_FIELDS | {"recipients"}
# Query texts: free text, like a note (not an item of any form).
QUERY_TEXT = "query_text"
# Not exported when de-identifying: contact details, free text that may name a person or
# hold real dates (a deviation's detail, a resolution, a withdrawal's reason), and the
# allocation index (the order of randomization, which dates moved back hide).
IDENTIFYING_ITEMS = CONTACT_ITEMS | {"note", QUERY_TEXT, "detail", "resolution",
                                     "reason_code", "allocation_index"}
# Ids derived from the participant's id without a key (a deviation's, the events it cites):
# keyed pseudonyms when de-identifying.
DERIVED_IDS = frozenset({"deviation_id", "evidence"})


@dataclass(frozen=True)
class Form:
    """Where one event type goes: a form, in a fixed study event or in the visit named by
    a field of the event."""

    key: str  # the OID suffix of the form, its item group and its items
    name: str
    attributes: tuple[tuple[str, str], ...]  # items from the event's own fields: (name, type)
    study_event: str | None = None
    visit_field: str | None = None
    command: str | None = None  # the command whose ``data`` schema lists the captured items

    @property
    def oid(self) -> str:
        return f"F.{self.key}"

    @property
    def group_oid(self) -> str:
        return f"IG.{self.key}"

    def item_oid(self, path: str) -> str:
        return f"I.{self.key}.{path}"


SCREENING = Form("SCREENING", "Screening",
                 (("eligible", "boolean"), ("failed_criteria", "text")), "SE.SCREENING")
_FORMS: dict[str, Form] = {
    "ParticipantScreened": SCREENING,
    "ParticipantRescreened": SCREENING,
    "ConsentRecorded": Form("CONSENT", "Informed consent", (), "SE.SCREENING"),
    "ParticipantRandomized": Form("RANDOMIZATION", "Randomization",
                                  (("arm", "text"), ("allocation_index", "integer")),
                                  "SE.RANDOMIZATION"),
    "BloodSampleCollected": Form("BLOOD", "Blood sample", (), visit_field="timepoint"),
    "VisitCompleted": Form("VISIT", "Visit assessments",
                           (("completes_study", "boolean"),), visit_field="visit"),
    "VisitMissed": Form("VISIT_MISSED", "Visit missed", (("visit", "text"),),
                        visit_field="visit"),
    "ReminderSent": Form("REMINDER", "Visit reminder sent",
                         (("visit", "text"), ("kind", "text"), ("recipients", "text")),
                         visit_field="visit"),
    "DoseRecorded": Form("DOSE", "Study drug dose", (), "SE.ON_STUDY"),
    "MedicationReported": Form("MEDICATION", "Concomitant medication", (), "SE.ON_STUDY"),
    "ParticipantWithdrawn": Form("WITHDRAWAL", "Withdrawal", (), "SE.ON_STUDY"),
    "DeviationFlagged": Form("DEVIATION", "Protocol deviation",
                             (("deviation_id", "text"), ("code", "text"),
                              ("severity", "text"), ("evidence", "text"),
                              ("detail", "text")), "SE.DEVIATIONS"),
    "DeviationResolved": Form("DEVIATION_RESOLVED", "Protocol deviation resolved",
                              (("deviation_id", "text"), ("resolution", "text")),
                              "SE.DEVIATIONS"),
}
# Each data-capturing event's form lists the fields of the command that records it.
FORMS = {event: replace(form, command=CAPTURED_BY.get(event))
         for event, form in _FORMS.items()}
DISTINCT_FORMS = tuple({form.key: form for form in FORMS.values()}.values())
FIXED_STUDY_EVENTS = (("SE.SCREENING", "Screening"), ("SE.RANDOMIZATION", "Randomization"))
COMMON_STUDY_EVENTS = (("SE.ON_STUDY", "On study: doses, medications, withdrawals"),
                       ("SE.DEVIATIONS", "Protocol deviations"))


def visit_study_event(code: str) -> str:
    return f"SE.{code.upper()}"


# Annotation flags: each type and the values it takes (a code list each in the metadata).
FLAGS: dict[str, tuple[str, ...]] = {
    "QUERY_STATUS": tuple(dict.fromkeys(["open", *(to for _, to in QUERY_TRANSITIONS.values())])),
    "SDV": ("verified", "changed_since_verified"),
    "SIGNATURE_STATUS": ("invalidated",),
    "LOCK": ("locked", "unlocked"),
}
# The query a step belongs to (the steps of one thread share it): the service's query ids,
# an external code list.
QUERY_ID = "QUERY_ID"
FLAG_TYPES = "CL.FLAG_TYPE"
LEGAL_REASON = ("21 CFR 11.50 and 11.200: the signer's printed name, the date and time and "
                "the meaning, signed in a session of the signer's with the password "
                "entered again")


def codelist_oid(flag_type: str) -> str:
    return f"CL.{flag_type}"


def signature_def_oid(meaning: str) -> str:
    """The same meaning has the same SignatureDef in every export."""
    return "SD." + hashlib.sha256(meaning.encode()).hexdigest()[:16]


# --- metadata -------------------------------------------------------------------------------

def _datatype(field: fields.Field) -> str:
    if isinstance(field, fields.Boolean):
        return "boolean"
    if isinstance(field, fields.Integer):
        return "integer"
    if isinstance(field, fields.Float):
        return "float"
    if isinstance(field, fields.Date):  # before DateTime: a Date is a DateTime field
        return "date"
    if isinstance(field, fields.DateTime):
        return "datetime"
    return "text"


def _schema_items(schema: Schema, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted path, ODM data type) of every leaf field; lists are one text item (JSON)."""
    for name, field in schema.fields.items():
        if isinstance(field, fields.Nested) and isinstance(field.schema, Schema):
            yield from _schema_items(field.schema, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", _datatype(field)


def form_items(protocol: Protocol) -> dict[str, list[tuple[str, str]]]:
    """The items of each form, by form key, from the command schemas."""
    from infrastructure.store.schemas import data_schemas

    schemas = data_schemas(protocol)
    items: dict[str, list[tuple[str, str]]] = {}
    for form in DISTINCT_FORMS:
        captured = list(_schema_items(schemas[form.command]())) if form.command else []
        items[form.key] = captured + list(form.attributes)
    return items


def _study_events(protocol: Protocol) -> list[tuple[str, str, str, list[Form]]]:
    """(OID, name, type, forms) of each study event, in protocol order."""
    fixed = [(oid, name, "Scheduled", [f for f in DISTINCT_FORMS if f.study_event == oid])
             for oid, name in FIXED_STUDY_EVENTS]
    by_visit = [f for f in DISTINCT_FORMS if f.visit_field]
    visits = [(visit_study_event(v.code), f"Visit {v.code}", "Scheduled", by_visit)
              for v in protocol.visits]
    common = [(oid, name, "Common", [f for f in DISTINCT_FORMS if f.study_event == oid])
              for oid, name in COMMON_STUDY_EVENTS]
    return fixed + visits + common


# What no XML document may hold (C0 controls but tab and line breaks, lone surrogates,
# U+FFFE, U+FFFF): a text recorded before the commands refused them is written with
# U+FFFD in their place, so that the document stays well-formed. Applied to each part of
# the document once (the parts hold no markup these could break), not to every value.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_chars(part: str) -> str:
    return _NOT_XML.sub("\ufffd", part)


def escape(text: str) -> str:
    """An element's text: a carriage return as a character reference too, which a reader
    of XML would otherwise read as a line feed."""
    return _escape(text, {"\r": "&#13;"})


def _attr(name: str, value: Any) -> str:
    return f" {name}={quoteattr(str(value))}"


def metadata_xml(protocol: Protocol, items: dict[str, list[tuple[str, str]]]) -> str:
    """The Study element: global variables and the MetaDataVersion every OID refers to,
    with the ``form_items``."""
    study_events = _study_events(protocol)
    out = [f"<Study{_attr('OID', protocol.study_id)}>",
           (f"<GlobalVariables><StudyName>{escape(protocol.study_id)}</StudyName>"
           f"<StudyDescription>{escape(protocol.title)}</StudyDescription>"
           f"<ProtocolName>{escape(protocol.study_id)}</ProtocolName></GlobalVariables>"),
           (f"<MetaDataVersion{_attr('OID', METADATA_VERSION)}"
           f"{_attr('Name', protocol.study_id + ' data capture')}>"),
           "<Protocol>"]
    out += [f"<StudyEventRef{_attr('StudyEventOID', oid)}{_attr('OrderNumber', n)}"
            f' Mandatory="No"/>' for n, (oid, *_) in enumerate(study_events, 1)]
    out.append("</Protocol>")
    for oid, name, kind, forms in study_events:
        out.append(f"<StudyEventDef{_attr('OID', oid)}{_attr('Name', name)}"
                   f' Repeating="No"{_attr("Type", kind)}>')
        out += [f'<FormRef{_attr("FormOID", f.oid)} Mandatory="No"/>' for f in forms]
        out.append("</StudyEventDef>")
    for form in DISTINCT_FORMS:
        out.append(f'<FormDef{_attr("OID", form.oid)}{_attr("Name", form.name)} '
                   f'Repeating="Yes"><ItemGroupRef{_attr("ItemGroupOID", form.group_oid)} '
                   f'Mandatory="Yes"/></FormDef>')
    for form in DISTINCT_FORMS:
        out.append(f'<ItemGroupDef{_attr("OID", form.group_oid)}{_attr("Name", form.name)} '
                   f'Repeating="No">')
        out += [f'<ItemRef{_attr("ItemOID", form.item_oid(path))} Mandatory="No"/>'
                for path, _ in items[form.key]]
        out.append("</ItemGroupDef>")
    for form in DISTINCT_FORMS:
        out += [f"<ItemDef{_attr('OID', form.item_oid(path))}{_attr('Name', path)}"
                f"{_attr('DataType', datatype)}/>" for path, datatype in items[form.key]]
    out += codelists_xml()
    out.append("</MetaDataVersion></Study>")
    return "\n".join(out) + "\n"


def _codelist(oid: str, name: str, values: tuple[str, ...]) -> str:
    entries = "".join(f"<EnumeratedItem{_attr('CodedValue', v)}/>" for v in values)
    return f'<CodeList{_attr("OID", oid)}{_attr("Name", name)} DataType="text">{entries}</CodeList>'


def codelists_xml() -> list[str]:
    """The code lists of the annotation flags: their types, and the values of each."""
    out = [_codelist(FLAG_TYPES, "Annotation flag types", (*FLAGS, QUERY_ID))]
    out += [_codelist(codelist_oid(kind), kind, values) for kind, values in FLAGS.items()]
    out.append(f'<CodeList{_attr("OID", codelist_oid(QUERY_ID))} Name="Query ids" '
               'DataType="text"><ExternalCodeList Dictionary="Trialog queries"/></CodeList>')
    return out


@dataclass
class Gathered:
    """What ``AdminData`` lists, gathered while the clinical data is written: every actor
    and signer, each signer's printed name and each meaning signed with."""

    users: set[str] = default(default_factory=set)
    full_names: dict[str, str] = default(default_factory=dict)
    meanings: dict[str, str] = default(default_factory=dict)  # SignatureDef OID -> meaning

    def signature(self, login: str, printed_name: str, meaning: str) -> str:
        """Notes a signature; answers the OID of its SignatureDef."""
        self.users.add(login)
        self.full_names[login] = printed_name  # staff, not participants: kept de-identified
        oid = signature_def_oid(meaning)
        self.meanings[oid] = meaning
        return oid


def _user_xml(login: str, full_name: str | None) -> str:
    name = f"<FullName>{escape(full_name)}</FullName>" if full_name else ""
    return (f"<User{_attr('OID', user_oid(login))}><LoginName>{escape(login)}</LoginName>"
            f"{name}</User>")


def admin_xml(protocol: Protocol, gathered: Gathered, effective: date) -> str:
    """Users (every actor of an exported event and every signer), locations (the sites)
    and a SignatureDef per meaning signed with."""
    out = [f"<AdminData{_attr('StudyOID', protocol.study_id)}>"]
    out += [_user_xml(u, gathered.full_names.get(u)) for u in sorted(gathered.users)]
    for site in protocol.sites:
        out.append(f"<Location{_attr('OID', location_oid(site.id))}{_attr('Name', site.name)}"
                   f' LocationType="Site"><MetaDataVersionRef'
                   f"{_attr('StudyOID', protocol.study_id)}"
                   f"{_attr('MetaDataVersionOID', METADATA_VERSION)}"
                   f"{_attr('EffectiveDate', effective.isoformat())}/></Location>")
    out += [f'<SignatureDef{_attr("OID", oid)} Methodology="Electronic"><Meaning>'
            f"{escape(meaning)}</Meaning><LegalReason>{escape(LEGAL_REASON)}</LegalReason>"
            f"</SignatureDef>" for oid, meaning in sorted(gathered.meanings.items())]
    out.append("</AdminData>")
    return "\n".join(out) + "\n"


def user_oid(actor: str) -> str:
    return f"USR.{actor}"


def location_oid(site_id: str) -> str:
    return f"LOC.{site_id}"


# --- clinical data --------------------------------------------------------------------------

def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str, ensure_ascii=False, sort_keys=True)
    return str(value)


def _flatten(value: Any, path: str, leaves: set[str]) -> Iterator[tuple[str, Any]]:
    """(item path, value) pairs of a captured value: nested objects are walked down to the
    items the form defines; anything else is one item."""
    if isinstance(value, dict) and path not in leaves:
        for key, inner in value.items():
            yield from _flatten(inner, f"{path}.{key}" if path else key, leaves)
    else:
        yield path, value


@dataclass(frozen=True)
class Place:
    """Where a data-management step goes: the subject (the casebook), a study event (a
    visit), a form of one, or an item of that form."""

    study_event: str | None = None
    form: Form | None = None
    repeat_key: int | None = None
    item: str | None = None

    def wrap(self, body: str) -> str:
        """The step's elements (AuditRecord, Signature, Annotation) in Context elements
        down to the place; not for the subject."""
        if self.form is not None and self.item is not None:
            body = (f"<ItemGroupData{_attr('ItemGroupOID', self.form.group_oid)} "
                    f'TransactionType="Context"><ItemData'
                    f"{_attr('ItemOID', self.form.item_oid(self.item))} "
                    f'TransactionType="Context">{body}</ItemData></ItemGroupData>')
        if self.form is not None:
            body = (f"<FormData{_attr('FormOID', self.form.oid)}"
                    f"{_attr('FormRepeatKey', self.repeat_key)} "
                    f'TransactionType="Context">{body}</FormData>')
        return (f"<StudyEventData{_attr('StudyEventOID', self.study_event)} "
                f'TransactionType="Context">{body}</StudyEventData>')


def _annotation(seq: int, flags: list[tuple[str, str]], comment: str | None = None,
                by: str | None = None) -> str:
    """An Annotation with a flag per (type, value); ``by`` is Sponsor or Site."""
    comment_xml = ""
    if comment:
        source = _attr("SponsorOrSite", by) if by else ""
        comment_xml = f"<Comment{source}>{escape(comment)}</Comment>"
    flags_xml = "".join(
        f"<Flag><FlagValue{_attr('CodeListOID', codelist_oid(kind))}>{escape(value)}"
        f"</FlagValue><FlagType{_attr('CodeListOID', FLAG_TYPES)}>{kind}</FlagType></Flag>"
        for kind, value in flags)
    return (f'<Annotation{_attr("SeqNum", seq)} TransactionType="Insert">{comment_xml}'
            f"{flags_xml}</Annotation>")


def _scope_place(scope: str) -> Place:
    """The place of a signature or lock scope: ``casebook`` or ``visit:<code>``."""
    if scope == CASEBOOK:
        return Place()
    return Place(visit_study_event(scope.split(":", 1)[1]))


# The _Subject method that writes each data-management event (and every QueryEvent).
MANAGEMENT_STEPS = {"QueryRaised": "_query", "SourceVerified": "_verified",
                    "RecordSigned": "_signed", "SignatureInvalidated": "_invalidated",
                    "ScopeLocked": "_lock", "ScopeUnlocked": "_lock"}


class _Subject:
    """Writes one participant's events as a SubjectData element (and the casebook's
    data-management steps as SubjectData elements after it)."""

    def __init__(self, first: Any, masker: Deidentifier | None, withheld: frozenset[str],
                 leaves: dict[str, set[str]], gathered: Gathered, protocol: Protocol) -> None:
        self.participant_id: str = first.participant_id
        self.protocol = protocol
        self.site = location_oid(first.data["site_id"])
        self.masker = masker
        self.withheld = withheld
        self.leaves = leaves
        self.gathered = gathered
        self.forms: dict[str, tuple[str, Form, int]] = {}  # captured event id -> its place
        self.queries: dict[str, tuple[dict[str, Any], int]] = {}  # query id -> target, steps
        self.verified: set[str] = set()  # visit study events verified and not changed since
        self.moved: dict[str, str] = {}  # a blood sample's event id -> the visit it moved to
        self.missed: dict[str, int] = {}  # a visit -> the version of its VISIT_MISSED form
        self.screening: int | None = None  # the version of the latest SCREENING form
        self.outcome: tuple[bool, list[str]] | None = None  # and its items' values now
        # A captured event's data as corrected so far, and its own fields' items: what a
        # form moved to another visit is inserted there with.
        self.current: dict[str, tuple[dict[str, Any], list[tuple[str, Any]]]] = {}
        # The items of a captured event's form that the file holds so far (given a value or
        # set to null): a correction updates those and inserts the others.
        self.held: dict[str, set[str]] = {}
        # The command that moved a form last, and the form's event id.
        self.last_moved: tuple[str, str] | None = None
        self.key = masker.pseudonym(self.participant_id) if masker else self.participant_id
        self.out = [(f"<SubjectData{_attr('SubjectKey', self.key)} TransactionType=\"Insert\">"
                    f"<SiteRef{_attr('LocationOID', self.site)}/>")]
        self.after: list[str] = []

    def _plain(self, path: str, value: Any) -> str | None:
        """The exported text of a value, or None when it is withheld."""
        name = path.rsplit(".", 1)[-1]
        if name in self.withheld:
            return None
        if self.masker is not None:
            value = self._referenced(value) if name in DERIVED_IDS else self._shifted(value)
        else:
            value = self._as_shown(value)
        return _value(value)

    def _as_shown(self, text: Any) -> Any:
        """A free text as the export's reader may see it: where contact details are left
        out, an address quoted in it masked, as the history shows it."""
        return masked_text(text) if CONTACT_ITEMS <= self.withheld else text

    def _referenced(self, value: Any) -> Any:
        """An id, or a list of them, as keyed pseudonyms."""
        assert self.masker is not None
        if isinstance(value, list):
            return [self._referenced(inner) for inner in value]
        return self.masker.reference_pseudonym(str(value))

    def _shifted(self, value: Any) -> Any:
        """The value with every date in it moved back, in lists and objects too."""
        assert self.masker is not None
        if isinstance(value, datetime):
            return self.masker.shift_datetime(self.participant_id, value)
        if isinstance(value, date):
            return self.masker.shift(self.participant_id, value)
        if isinstance(value, list):
            return [self._shifted(inner) for inner in value]
        if isinstance(value, dict):
            return {key: self._shifted(inner) for key, inner in value.items()}
        return value

    def _stamp(self, event: Any) -> str:
        stamp = event.timestamp
        if self.masker is not None:
            stamp = self.masker.shift_datetime(self.participant_id, stamp)
        return f"<DateTimeStamp>{stamp.isoformat()}</DateTimeStamp>"

    def _audit(self, event: Any, reason: str | None = None, contact: bool = False) -> str:
        """The event's AuditRecord; ``contact``: the event holds contact details."""
        if self.masker is not None:
            reason = None  # free text, like a note
        elif CONTACT_ITEMS <= self.withheld and (holds_address(reason)
                                                  or quotes_address(vars(event))):
            reason = self._as_shown(reason)
            contact = True  # an address quoted: its command's id is left out as well
        reason_xml = f"<ReasonForChange>{escape(reason)}</ReasonForChange>" if reason else ""
        # A command id is listed with the participant's id (history, feed): de-identified,
        # it would lead back from the pseudonym. Where contact details are left out, so is
        # the id of a command that carried them (see audit.history.redact_contact).
        if self.masker is not None:
            source: str | None = self.masker.command_pseudonym(event.command_id)
        elif contact and CONTACT_ITEMS <= self.withheld:
            source = None
        else:
            source = event.command_id
        source_xml = f"<SourceID>{escape(source)}</SourceID>" if source else ""
        return (f"<AuditRecord><UserRef{_attr('UserOID', user_oid(event.actor))}/>"
                f"<LocationRef{_attr('LocationOID', self.site)}/>"
                f"{self._stamp(event)}{reason_xml}{source_xml}</AuditRecord>")

    def _study_event(self, form: Form, event: Any) -> str:
        if form.study_event:
            return form.study_event
        source = event.data if form.command else vars(event)
        return visit_study_event(source[form.visit_field])

    def add(self, event: Any) -> None:
        kind = type(event).__name__
        if kind == "DataCorrected":
            self._correction(event)
            return
        if kind in MANAGEMENT_STEPS or isinstance(event, Participant.QueryEvent):
            getattr(self, MANAGEMENT_STEPS.get(kind, "_query"))(event)
            return
        if kind == "VisitMissedRetracted":
            self._retracted(event)
            return
        if kind == "ScreeningReassessed":
            self._reassessed(event)
            return
        if kind == "StudyCompletionReassessed":
            self._completion_reassessed(event)
            return
        form = FORMS.get(kind)
        if form is None:
            return
        study_event = self._study_event(form, event)
        if kind == "VisitMissed":
            self.missed[event.visit] = event.originator_version
        if form.key == SCREENING.key:
            self.screening = event.originator_version
            self.outcome = (event.eligible, list(event.failed_criteria))
        values: list[tuple[str, Any]] = []
        attributes = [(name, getattr(event, name)) for name, _ in form.attributes]
        if form.command:
            event_id = event_uuid(event.originator_id, event.originator_version)
            self.forms[event_id] = (study_event, form, event.originator_version)
            self.current[event_id] = (copy.deepcopy(event.data), attributes)
            values += _flatten(event.data, "", self.leaves[form.key])
        values += attributes
        contact = any(value and path.rsplit(".", 1)[-1] in CONTACT_ITEMS
                      for path, value in values)
        inserted = self._insert(study_event, form, event.originator_version,
                                self._audit(event, contact=contact), values)
        if form.command:
            self.held[event_uuid(event.originator_id, event.originator_version)] = inserted
        if kind == "BloodSampleCollected":  # new data of its visit
            self._changed(study_event, event)

    def _changed(self, study_event: str, event: Any) -> None:
        """As the participant's sdv_status: a verified visit's data corrected, or new data
        of it, is changed since it was verified."""
        if study_event in self.verified:
            self.verified.discard(study_event)
            self._note(Place(study_event), event, annotation=_annotation(
                1, [("SDV", "changed_since_verified")]))

    def _insert(self, study_event: str, form: Form, version: int, audit: str,
                values: list[tuple[str, Any]]) -> set[str]:
        """A form inserted in a study event, with its AuditRecord and the items of
        ``values`` that are exported (not null, not withheld); the paths of those items."""
        items, inserted = [], set()
        for path, value in values:
            text = None if value is None else self._plain(path, value)
            if text is not None:
                inserted.add(path)
                items.append(f"<ItemData{_attr('ItemOID', form.item_oid(path))}"
                             f"{_attr('Value', text)} TransactionType=\"Insert\"/>")
        self.out.append(
            f"<StudyEventData{_attr('StudyEventOID', study_event)} TransactionType=\"Upsert\">"
            f"<FormData{_attr('FormOID', form.oid)}"
            f"{_attr('FormRepeatKey', version)} TransactionType=\"Insert\">{audit}"
            f"<ItemGroupData{_attr('ItemGroupOID', form.group_oid)} "
            f"TransactionType=\"Insert\">{''.join(items)}</ItemGroupData></FormData>"
            f"</StudyEventData>")
        return inserted

    def _reassessed(self, event: Any) -> None:
        """The screening's outcome recorded again after a correction (before a consent)."""
        self._outcome_now((event.eligible, list(event.failed_criteria)), event)

    def _outcome_now(self, outcome: tuple[bool, list[str]], event: Any) -> None:
        """The SCREENING form's two items updated, when the outcome of its data as they
        stand is not what they say: from ``event``, the correction that changed it (after
        a consent, no event records the outcome again; the state evaluates it), or the
        ScreeningReassessed that records it."""
        if self.screening is None or outcome == self.outcome:
            return
        self.outcome = outcome
        items = "".join(
            f"<ItemData{_attr('ItemOID', SCREENING.item_oid(name))}"
            f"{_attr('Value', self._plain(name, value))} "
            f"TransactionType=\"Update\">"
            f"{self._audit(event, event.reason)}</ItemData>"
            for (name, _), value in zip(SCREENING.attributes, outcome, strict=True))
        self.out.append(
            f"<StudyEventData{_attr('StudyEventOID', SCREENING.study_event)} "
            f"TransactionType=\"Context\"><FormData{_attr('FormOID', SCREENING.oid)}"
            f"{_attr('FormRepeatKey', self.screening)} TransactionType=\"Context\">"
            f"<ItemGroupData{_attr('ItemGroupOID', SCREENING.group_oid)} "
            f"TransactionType=\"Context\">{items}</ItemGroupData></FormData></StudyEventData>")

    def _retracted(self, event: Any) -> None:
        """A missed mark retracted: its VISIT_MISSED form removed, with why."""
        version = self.missed.pop(event.visit, None)
        if version is None:
            return
        self.out.append(
            f"<StudyEventData{_attr('StudyEventOID', visit_study_event(event.visit))} "
            f"TransactionType=\"Context\"><FormData{_attr('FormOID', FORMS['VisitMissed'].oid)}"
            f"{_attr('FormRepeatKey', version)} TransactionType=\"Remove\">"
            f"{self._audit(event, event.cause)}</FormData></StudyEventData>")

    def _correction(self, event: Any) -> None:
        place = self.forms.get(event.target_event_id)
        if place is None:
            return
        study_event, form, version = place
        for visit in self._visits_changed(event, study_event, form):
            self._changed(visit, event)
        participant_place(self.current[event.target_event_id][0], event.field,
                          copy.deepcopy(event.value))
        if event.field == form.visit_field and event.value is not None \
                and visit_study_event(event.value) != study_event:
            self._moved(event, study_event, form, version)
            return
        items = []
        held = self.held.setdefault(event.target_event_id, set())
        for path, value in self._corrected_items(event, form):
            if value is None:
                if path not in held:  # null where the form never held the item: no change
                    continue
                value_xml = ' IsNull="Yes"'
            else:
                text = self._plain(path, value)
                if text is None:
                    continue
                value_xml = _attr("Value", text)
            # An item the form holds (given a value or set to null since) is updated; one it
            # never held (an answer left out at first) is inserted.
            step = "Update" if path in held else "Insert"
            held.add(path)
            items.append(f"<ItemData{_attr('ItemOID', form.item_oid(path))}{value_xml} "
                         f"TransactionType=\"{step}\">{self._audit(event, event.reason)}"
                         f"</ItemData>")
        if items:
            self.out.append(
                f"<StudyEventData{_attr('StudyEventOID', study_event)} "
                f"TransactionType=\"Context\"><FormData{_attr('FormOID', form.oid)}"
                f"{_attr('FormRepeatKey', version)} TransactionType=\"Context\">"
                f"<ItemGroupData{_attr('ItemGroupOID', form.group_oid)} "
                f"TransactionType=\"Context\">{''.join(items)}</ItemGroupData></FormData>"
                f"</StudyEventData>")
        if form.key == SCREENING.key and version == self.screening:
            try:
                outcome = screening_outcome(self.current[event.target_event_id][0],
                                            self.protocol)
            except DomainError:  # a site the protocol no longer lists: as recorded
                return
            self._outcome_now(outcome, event)

    def _moved(self, event: Any, study_event: str, form: Form, version: int) -> None:
        """A form whose visit was corrected (data keyed under the wrong visit, a blood
        sample drawn for another): removed from the visit it was in, inserted in its own
        with its data as corrected, each with the correction's AuditRecord."""
        moved_to = visit_study_event(event.value)
        self.forms[event.target_event_id] = (moved_to, form, version)
        self.last_moved = (event.command_id, event.target_event_id)
        audit = self._audit(event, event.reason)
        data, attributes = self.current[event.target_event_id]
        self.out.append(
            f"<StudyEventData{_attr('StudyEventOID', study_event)} "
            f"TransactionType=\"Context\"><FormData{_attr('FormOID', form.oid)}"
            f"{_attr('FormRepeatKey', version)} TransactionType=\"Remove\">{audit}"
            f"</FormData></StudyEventData>")
        self.held[event.target_event_id] = self._insert(
            moved_to, form, version, audit,
            [*_flatten(data, "", self.leaves[form.key]), *attributes])

    def _completion_reassessed(self, event: Any) -> None:
        """The study completed, or not, by the visit form moved in the same command: its
        ``completes_study`` item updated."""
        if self.last_moved is None or self.last_moved[0] != event.command_id:
            return  # recorded by the command that moved the form, or by none
        moved = self.last_moved[1]
        place = self.forms.get(moved)
        if place is None or "completes_study" not in dict(place[1].attributes):
            return
        study_event, form, version = place
        data, attributes = self.current[moved]
        self.current[moved] = (data, [
            (name, event.completed if name == "completes_study" else value)
            for name, value in attributes])
        self.out.append(
            f"<StudyEventData{_attr('StudyEventOID', study_event)} "
            f"TransactionType=\"Context\"><FormData{_attr('FormOID', form.oid)}"
            f"{_attr('FormRepeatKey', version)} TransactionType=\"Context\">"
            f"<ItemGroupData{_attr('ItemGroupOID', form.group_oid)} "
            f"TransactionType=\"Context\"><ItemData"
            f"{_attr('ItemOID', form.item_oid('completes_study'))}"
            f"{_attr('Value', _value(event.completed))} TransactionType=\"Update\">"
            f"{self._audit(event, event.reason)}</ItemData></ItemGroupData></FormData>"
            f"</StudyEventData>")

    def _visits_changed(self, event: Any, study_event: str, form: Form) -> list[str]:
        """The visits (study events) whose data a correction changes, as the participant's
        state has them: the one its record is in now, and the one a blood sample moves to
        when its timepoint is corrected."""
        if form.visit_field is None:
            return []
        now = self.moved.get(event.target_event_id, study_event)
        if event.field != form.visit_field or event.value is None:
            return [now]
        moved = visit_study_event(event.value)
        self.moved[event.target_event_id] = moved
        return list(dict.fromkeys((now, moved)))

    def _corrected_items(self, event: Any, form: Form) -> list[tuple[str, Any]]:
        """The items a correction sets: those its value gives; for a whole group (bpi_sf,
        fact_es: never an item itself), every item under it, null where the value leaves it
        out (as the record now has it)."""
        defined = self.leaves[form.key]
        given = list(_flatten(event.value, event.field, defined))
        under = sorted(p for p in defined if p.startswith(event.field + "."))
        if event.field in defined or not under:
            return given
        values = dict(given)
        return [(path, values.get(path)) for path in under]

    # --- data management -----------------------------------------------------------------

    def _note(self, place: Place, event: Any, signature: str = "",
              annotation: str = "") -> None:
        """One data-management step at its place, with its AuditRecord."""
        audit = self._audit(event, event.reason)
        if place.study_event is not None:
            self.out.append(place.wrap(audit + signature + annotation))
            return
        self.after.append(f"<SubjectData{_attr('SubjectKey', self.key)} "
                          f'TransactionType="Context">{audit}{signature}'
                          f"<SiteRef{_attr('LocationOID', self.site)}/>{annotation}"
                          f"</SubjectData>\n")

    def _target(self, target: dict[str, Any]) -> Place:
        """The place a query targets: a visit, or a captured event's form or its item."""
        if target.get("visit") is not None:
            return Place(visit_study_event(target["visit"]))
        captured = self.forms.get(target["event_id"])
        if captured is None:
            return Place()
        study_event, form, version = captured
        item = target.get("field")
        if item not in self.leaves[form.key] or item.rsplit(".", 1)[-1] in self.withheld:
            item = None  # a group of items, or an item left out of this export
        return Place(study_event, form, version, item)

    def _query(self, event: Any) -> None:
        """A step of a query's thread: its status after the step, its text (the reason
        where a step has no text, as in the thread) from the sponsor or, answering, the
        site."""
        if isinstance(event, Participant.QueryRaised):
            self.queries[event.query_id] = (event.target, 0)
            action, status, text = "raise", "open", event.text
        else:
            action, status = event.action, QUERY_TRANSITIONS[event.action][1]
            text = event.text if event.text is not None else event.reason
        if event.query_id not in self.queries:
            return
        target, step = self.queries[event.query_id]
        self.queries[event.query_id] = (target, step + 1)
        place = self._target(target)  # where the form is now (a correction may move it)
        query = (self.masker.query_pseudonym(event.query_id) if self.masker
                 else event.query_id)
        comment = None if QUERY_TEXT in self.withheld else self._as_shown(text)
        self._note(place, event, annotation=_annotation(
            step + 1, [("QUERY_STATUS", status), (QUERY_ID, query)], comment,
            "Site" if action == "respond" else "Sponsor"))

    def _verified(self, event: Any) -> None:
        study_event = visit_study_event(event.visit)
        self.verified.add(study_event)
        self._note(Place(study_event), event, annotation=_annotation(1, [("SDV", "verified")]))

    def _signed(self, event: Any) -> None:
        # (its SignatureDef's OID derived from the meaning as shown: no digest of the whole)
        oid = self.gathered.signature(event.signed_by, event.printed_name,
                                      self._as_shown(event.meaning))
        signature = (f"<Signature><UserRef{_attr('UserOID', user_oid(event.signed_by))}/>"
                     f"<LocationRef{_attr('LocationOID', self.site)}/>"
                     f"<SignatureRef{_attr('SignatureOID', oid)}/>{self._stamp(event)}"
                     f"</Signature>")
        self._note(_scope_place(event.scope), event, signature=signature)

    def _invalidated(self, event: Any) -> None:
        self._note(_scope_place(event.scope), event, annotation=_annotation(
            1, [("SIGNATURE_STATUS", "invalidated")], event.cause))

    def _lock(self, event: Any) -> None:
        state = "locked" if type(event).__name__ == "ScopeLocked" else "unlocked"
        self._note(_scope_place(event.scope), event,
                   annotation=_annotation(1, [("LOCK", state)]))

    def unreadable(self, version: int) -> None:
        """An event the store can't give: said where it would be (the events after it
        are exported as recorded; those that refer to it find nothing)."""
        self.out.append(f"<!-- event {version} of this subject can't be read from the "
                        f"store: trialog audit verify names the fault -->")

    def close(self) -> str:
        self.out.append("</SubjectData>\n")
        return "\n".join(self.out + self.after)


def subjects_xml(t: Trialog, items: dict[str, list[tuple[str, str]]],
                 masker: Deidentifier | None, withheld: frozenset[str], gathered: Gathered,
                 shown: list[str] | None = None, scope: Scope = EVERY_SITE
                 ) -> Iterator[tuple[str, str]]:
    """Each participant of the scope's sites, in the streams' order: its key (id or
    pseudonym) and its SubjectData, from the events in version order, without the
    ``withheld`` items; collects the actors and signatures into ``gathered``."""
    leaves = {key: {path for path, _ in form} for key, form in items.items()}
    subject: _Subject | None = None
    stream = None
    skipped = None
    for event in participant_events(t.service):
        if event.originator_id == skipped:
            continue
        if event.originator_id != stream:
            if subject is not None:
                yield subject.key, subject.close()
                subject = None
            stream = event.originator_id
            if isinstance(event, UnreadableEvent):  # no screening: whose, which site?
                skipped = stream  # (audit verify names it; the followers set it aside)
                if scope.sites is None:  # said to a reader of every site, as the feed does
                    yield "", ("<!-- a subject whose screening can't be read from the "
                               "store is left out: trialog audit verify names it -->\n")
                continue
            # A stream opens with its screening, which names the site.
            if scope.sites is not None and not scope.admits(event.data["site_id"]):
                skipped = stream
                continue
            subject = _Subject(event, masker, withheld, leaves, gathered, t.protocol)
            if shown is not None and not CONTACT_ITEMS & withheld:
                shown.append(subject.participant_id)
        assert subject is not None
        if isinstance(event, UnreadableEvent):
            subject.unreadable(event.originator_version)
            continue
        gathered.users.add(event.actor)
        subject.add(event)
    if subject is not None:
        yield subject.key, subject.close()


def odm_document(t: Trialog, deidentify: bool = False, contact: bool = True,
                 created: datetime | None = None,
                 shown: list[str] | None = None,
                 scope: Scope = EVERY_SITE) -> Iterator[str]:
    """The ODM document in chunks, for the participants of the scope's sites; without
    contact details unless ``contact``."""
    created = created or datetime.now(UTC)
    masker = Deidentifier(t.settings.pseudonym_key) if deidentify else None
    withheld = (frozenset(IDENTIFYING_ITEMS) if deidentify
                else frozenset() if contact else frozenset(CONTACT_ITEMS))
    items = form_items(t.protocol)
    gathered = Gathered()
    # The subjects are written first (the AdminData before them lists the users and
    # signatures they gather), each at its place in the file, then read back in the
    # streams' order or, de-identified, the pseudonyms' (the streams' follows the real ids).
    with tempfile.SpooledTemporaryFile(max_size=4 << 20) as body:
        places = []
        for key, text in subjects_xml(t, items, masker, withheld, gathered, shown, scope):
            data = _xml_chars(text).encode()
            places.append((key, body.tell(), len(data)))
            body.write(data)
        yield ('<?xml version="1.0" encoding="UTF-8"?>\n'
               f'<ODM xmlns="{ODM_NAMESPACE}" ODMVersion="1.3.2" FileType="Transactional"'
               f"{_attr('FileOID', f'Trialog.{uuid.uuid4()}')}"
               f"{_attr('CreationDateTime', created.isoformat())}"
               ' Originator="Trialog" SourceSystem="Trialog">\n')
        yield _xml_chars(metadata_xml(t.protocol, items))
        yield _xml_chars(admin_xml(t.protocol, gathered, created.date()))
        yield (f"<ClinicalData{_attr('StudyOID', t.protocol.study_id)}"
               f"{_attr('MetaDataVersionOID', METADATA_VERSION)}>\n")
        for _, offset, size in sorted(places) if masker else places:
            body.seek(offset)
            yield body.read(size).decode()
    yield "</ClinicalData>\n</ODM>\n"
