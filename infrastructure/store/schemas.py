"""marshmallow schemas of each command type's ``data``: the rules every command's fields
follow, used by the API, by the correction rules (a corrected value follows the rule of the
field it corrects) and by the exports (an ODM item per field).

Choices that come from the protocol (sites, visit codes, languages, stages, aromatase
inhibitors) are read from it, so another protocol file changes what is accepted without a
code change.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime
from typing import Any, ClassVar

import orjson
from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from domain.commands import COMMAND_TYPES
from domain.eligibility import aromatase_inhibitor_choices, aromatase_inhibitor_generic_name
from domain.protocol import EligibilityRules, Protocol
from domain.scoring import BPI_INTERFERENCE_ITEMS, BPI_PAIN_ITEMS, FACT_ITEMS
from infrastructure.logs import maskable_address


class UUIDString(fields.UUID):
    """A UUID, validated and kept as its canonical string."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        return str(super()._deserialize(value, attr, data, **kwargs))


class StrictBoolean(fields.Boolean):
    """JSON true or false only (not "yes", 1 or "on")."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class StrictFloat(fields.Float):
    """A JSON number only (not a numeric string)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class IsoDate(fields.Date):
    """A date written YYYY-MM-DD, as the contract says (marshmallow's own also takes
    20260307 and 2026-W10-6)."""

    default_error_messages: ClassVar[dict[str, str]] = {
        "invalid": "Not a valid date (YYYY-MM-DD)."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not isinstance(value, str) or not _ISO_DATE.fullmatch(value):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class IsoDateTime(fields.AwareDateTime):
    """A date and time written YYYY-MM-DDTHH:MM (or with a space for the T), seconds and a
    zone optional (none is UTC); a date alone is no time of day."""

    default_error_messages: ClassVar[dict[str, str]] = {
        "invalid": "Not a valid datetime (YYYY-MM-DDTHH:MM[:SS], then a zone such as Z "
                   "or +01:00; none is UTC)."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not isinstance(value, str) or not _ISO_DATE_TIME.match(value):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_ISO_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")  # RFC 3339 allows a space


class Whole(validate.Regexp):
    """A pattern the whole value must match (Python's "$" also matches before a last line
    break, which JSON Schema's does not: the OpenAPI document keeps the plain pattern)."""

    def __call__(self, value: Any) -> Any:
        if self.regex.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value


# PostgreSQL text can't hold NUL, no field of a trial record needs control characters
# (C0 but tab and line breaks, DEL, C1), and a lone surrogate is no character: no encoder
# writes it (JSON bodies refuse it first, see infrastructure.api.bodies; this is for
# every other way in). U+FFFE and U+FFFF are no characters either, and no XML document
# (the ODM export) may hold them.
PRINTABLE = validate.Regexp(
    r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]*$",
    error="must not contain control characters or the noncharacters U+FFFE and U+FFFF")


# The moments a replay or a report may name: a day inside what a date can hold, so that
# the day of the moment at any site (UTC-12 to UTC+14) can be found.
EARLIEST_MOMENT = datetime(1, 1, 2, tzinfo=UTC)
LATEST_MOMENT = datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=UTC)
MOMENT_RULE = (f"must be a moment from {EARLIEST_MOMENT.date().isoformat()} to "
               f"{LATEST_MOMENT.date().isoformat()} (UTC)")


def in_utc(value: datetime) -> datetime | None:
    """An aware moment in UTC; None when it is outside the moments taken (or in no year
    UTC has: 9999-12-31T23:00-01:00)."""
    try:
        moment = value.astimezone(UTC)
    except OverflowError:
        return None
    return moment if EARLIEST_MOMENT <= moment <= LATEST_MOMENT else None


def a_moment(value: datetime) -> None:
    """The rule of a moment to replay or report at (see ``in_utc``)."""
    if in_utc(value) is None:
        raise ValidationError(MOMENT_RULE)


# The largest JSON text taken, a body or an import's line: a batch of the most commands,
# each of a few kilobytes at most, fits well; a larger one is refused before it is read.
MAX_BODY = 8 * 2**20


def json_fault(error: orjson.JSONDecodeError, what: str) -> str:
    """Why ``what`` (the body, a line) is not JSON, and where in it (the decoder's own
    line and column count from the start of what it was given)."""
    if error.msg.startswith("str is not valid UTF-8"):
        return f"the {what} is not valid UTF-8"
    if error.msg == "unexpected end of data":
        return f"the {what} ends before its JSON value does"
    return f"{error.msg} at character {error.pos + 1} of the {what}"


class JsonInteger(fields.Integer):
    """A whole number, strictly (2.0 is not one). An integer of a JSON body past 64 bits is
    decoded as a float (orjson): it is taken as the integer it was, so that the refusal
    names the range it breaks, not "Not a valid integer"."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, float) and value.is_integer() and abs(value) >= 2**63:
            value = int(value)
        return super()._deserialize(value, attr, data, **kwargs)


def _int(low: int, high: int | None = None, **kwargs: Any) -> fields.Integer:
    return JsonInteger(validate=validate.Range(min=low, max=high), **kwargs)


# What shows nothing on a page: separators and white space, controls, format characters
# (U+200B ZERO WIDTH SPACE, U+00AD SOFT HYPHEN, U+2060 WORD JOINER, the bidi marks), marks
# with nothing to mark, and the letters and symbol drawn as blanks. A character this
# interpreter's Unicode tables don't know yet (a newer emoji) or of private use is taken
# as seen, but for the noncharacters and the code points Unicode reserves to be shown as
# nothing (U+2065, U+FFF0-U+FFF8, U+E0000-U+E0FFF).
_SHOWS_NOTHING = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Mn", "Me"})
_BLANK_GLYPHS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
_SEEN_ASCII = re.compile(r"[!-~]")


def unseen(c: str) -> bool:
    """Whether a character shows nothing (see _SHOWS_NOTHING)."""
    if c.isspace() or c in _BLANK_GLYPHS:
        return True
    category = unicodedata.category(c)
    if category == "Cn":
        point = ord(c)
        return (point == 0x2065 or 0xFFF0 <= point <= 0xFFF8 or 0xE0000 <= point <= 0xE0FFF
                or 0xFDD0 <= point <= 0xFDEF or point & 0xFFFE == 0xFFFE)
    return category in _SHOWS_NOTHING


def says_something(text: str) -> bool:
    """Whether a text holds a character a reader sees: a reason, a signature's meaning or
    a printed name of white space or invisible characters alone says nothing."""
    if _SEEN_ASCII.search(text):
        return True
    return not text.isascii() and not all(map(unseen, text))


class NotBlank(validate.Validator):
    """A text that must say something holds a character a reader sees (a reason for a
    change of "   ", or of a zero-width space, says nothing). A text longer than ``high``
    is left to the length's rule, which refuses it (marshmallow runs every validator):
    it is not read through here."""

    error = "must not be blank"

    def __init__(self, high: int) -> None:
        self.high = high

    def __call__(self, value: str) -> str:
        if len(value) <= self.high and not says_something(value):
            raise ValidationError(self.error)
        return value


def text(low: int = 1, high: int = 200, **kwargs: Any) -> fields.String:
    """A string of ``low`` to ``high`` characters, none a control character; unless it may
    be empty (``low`` 0), not white space or invisible characters alone."""
    rules = [validate.Length(min=low, max=high), PRINTABLE, *([NotBlank(high)] if low else [])]
    return fields.String(validate=rules, **kwargs)


class AromataseInhibitorDrug(fields.String):
    """One of the protocol's aromatase inhibitors, by its generic or a brand name in any
    case, loaded as its generic name (the name the record keeps and the criterion compares)."""

    def __init__(self, rules: EligibilityRules, **kwargs: Any) -> None:
        self.rules = rules
        self.choices = ", ".join(aromatase_inhibitor_choices(rules))
        description = f"generic or brand name, any case: {self.choices}"
        super().__init__(metadata={"description": description}, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        name = super()._deserialize(value, attr, data, **kwargs)
        generic = aromatase_inhibitor_generic_name(name, self.rules)
        if generic is None:
            raise ValidationError(f"must be one of: {self.choices}")
        return generic


class AromataseInhibitor(Schema):
    """The protocol-free fields; ``eligibility_schema`` gives ``drug`` the protocol's drugs."""

    drug = text(required=True)
    daily_dose_mg = StrictFloat(required=True, validate=validate.Range(min=0))
    started_on = IsoDate(required=True)
    planned_days_after_registration = _int(0, 36_500, required=True)


class Menopause(Schema):
    months_since_last_period = _int(0, 1_200, required=True, allow_none=True)
    bilateral_oophorectomy = StrictBoolean(required=True)
    hysterectomy_ovaries_retained = StrictBoolean(required=True)
    fsh_postmenopausal = StrictBoolean(required=True, allow_none=True)


class Analgesic(Schema):
    drug = text(required=True)
    stable_since = IsoDate(required=True)


class Eligibility(Schema):
    """The protocol-free fields; ``eligibility_schema`` gives the one a protocol loads with."""

    er_positive = StrictBoolean(required=True, allow_none=True)
    pgr_positive = StrictBoolean(required=True, allow_none=True)
    stage = fields.String(required=True)  # one of the protocol's stage_choices
    metastatic = StrictBoolean(required=True)
    surgery_completed = StrictBoolean(required=True)
    aimss_after_ai_start = StrictBoolean(required=True)
    aromatase_inhibitor = fields.Nested(AromataseInhibitor, required=True)
    menopause = fields.Nested(Menopause, required=True)
    zubrod = _int(0, 4, required=True)
    b12_allergy = StrictBoolean(required=True)
    substance_abuse_last_on = IsoDate(required=True, allow_none=True)
    chronic_liver_disease = StrictBoolean(required=True)
    end_stage_renal_disease = StrictBoolean(required=True)
    analgesics = fields.List(fields.Nested(Analgesic), required=True)
    b12_supplement_stopped_on = IsoDate(required=True, allow_none=True)
    willing_blood_samples = StrictBoolean(required=True)
    other_investigational_agents = StrictBoolean(required=True)
    uncontrolled_intercurrent_illness = StrictBoolean(required=True)
    surgery_side_effects_resolved = StrictBoolean(required=True)
    prior_therapy_toxicity_resolved = StrictBoolean(required=True)
    pain_due_to_fracture_or_injury = StrictBoolean(required=True)
    able_to_consent = StrictBoolean(required=True)

    @validates_schema
    def one_receptor_status_given(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("er_positive") is None and data.get("pgr_positive") is None:
            raise ValidationError("er_positive and pgr_positive can't both be null",
                                  "er_positive")


def eligibility_schema(protocol: Protocol) -> type[Schema]:
    """The ``eligibility`` object of ScreenParticipant, whose aromatase inhibitor must be one
    of the protocol's drugs and whose stage one of its stage choices."""
    drug = AromataseInhibitorDrug(protocol.eligibility, required=True)
    inhibitor = type("AromataseInhibitor", (AromataseInhibitor,), {"drug": drug})
    stage = fields.String(required=True,
                          validate=validate.OneOf(protocol.eligibility.stage_choices))
    return type("Eligibility", (Eligibility,),
                {"aromatase_inhibitor": fields.Nested(inhibitor, required=True),
                 "stage": stage})


BpiInterference = Schema.from_dict(
    {item: _int(0, 10, allow_none=True) for item in BPI_INTERFERENCE_ITEMS},
    name="BpiInterference",
)
BpiSf = Schema.from_dict(
    {**{item: _int(0, 10, allow_none=True) for item in BPI_PAIN_ITEMS},
     "interference": fields.Nested(BpiInterference)},
    name="BpiSf",
)
FactEs = Schema.from_dict({item: _int(0, 4) for item in sorted(FACT_ITEMS)}, name="FactEs")


class Adherence(Schema):
    doses_taken = _int(0, 100_000)
    doses_expected = _int(0, 100_000)
    missed_ai_doses_last_week = _int(0, 7)


class BloodResults(Schema):
    b12_pg_ml = StrictFloat(validate=validate.Range(min=0), allow_none=True)
    crp_mg_l = StrictFloat(validate=validate.Range(min=0), allow_none=True)
    homocysteine_umol_l = StrictFloat(validate=validate.Range(min=0), allow_none=True)
    mma_nmol_l = StrictFloat(validate=validate.Range(min=0), allow_none=True)


def field_path(**kwargs: Any) -> fields.String:
    """A field of an event's data, as a dotted path (a query's target, a correction's)."""
    return fields.String(validate=[
        validate.Length(max=200),
        Whole(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$",
              error="must be a dotted field path such as bpi_sf.worst")], **kwargs)


def maskable(address: str) -> None:
    """An address a free text quoting it is found to quote, so that it is masked there for
    readers without contact rights (see infrastructure.logs)."""
    if not maskable_address(address):
        raise ValidationError("must be an address at a domain whose last label starts with "
                              "a letter (name@example.org)")


MAX_NESTING = 32  # levels of lists and objects in a corrected value (a field's: a few)


def shallow(value: Any) -> None:
    """A value nested no deeper than MAX_NESTING levels of lists and objects: a
    correction's value is one field's, and a deeper one could not even be fingerprinted
    (the JSON encoder recurses). Walked without recursion."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth > MAX_NESTING:
                raise ValidationError(f"must not be nested more than {MAX_NESTING} levels "
                                      "of lists and objects deep")
            pending.extend((each, depth + 1)
                           for each in (item.values() if isinstance(item, dict) else item))


def _raise_query(protocol: Protocol) -> type[Schema]:
    class RaiseQueryData(Schema):
        query_id = UUIDString(required=True, metadata={"description": "a client UUID"})
        text = text(1, 4000, required=True)
        visit = fields.String(validate=validate.OneOf(protocol.visit_codes))
        event_id = UUIDString()
        field = field_path(allow_none=True)

        @validates_schema
        def one_target(self, data: dict[str, Any], **kwargs: Any) -> None:
            if ("visit" in data) == ("event_id" in data):
                raise ValidationError("give one target: visit, or event_id", "visit")
            if "field" in data and "event_id" not in data:
                raise ValidationError("is only for an event_id target", "field")

    return RaiseQueryData


def _signing(visit: Any) -> dict[str, fields.Field]:
    spec: dict[str, fields.Field] = {
        "meaning": text(1, 500, required=True, metadata={
            "description": "what the signature means, e.g. 'I approve the data of this "
                           "visit'"}),
        "password": fields.String(required=True, load_only=True,
                                  validate=validate.Length(1, 1024), metadata={
            "description": "the signer's password again (never stored, logged or echoed)"}),
    }
    if visit is not None:
        spec["visit"] = fields.String(required=True, validate=visit)
    return spec


def data_schemas(protocol: Protocol) -> dict[str, type[Schema]]:
    """The ``data`` schema of each command type, with the protocol's choices."""
    sites = validate.OneOf(protocol.site_ids)
    visit = validate.OneOf(protocol.visit_codes)
    schemas: dict[str, dict[str, Any]] = {
        "ScreenParticipant": {
            "site_id": fields.String(required=True, validate=sites),
            "screened_on": IsoDate(required=True),
            "birth_date": IsoDate(required=True),
            "email": fields.Email(allow_none=True, validate=maskable),
            "language": fields.String(required=True, validate=validate.OneOf(protocol.languages)),
            "eligibility": fields.Nested(eligibility_schema(protocol), required=True),
        },
        "RecordConsent": {
            "consent_version": text(required=True),
            "signed_on": IsoDate(required=True),
            "signed_by": fields.String(required=True, validate=validate.OneOf(
                ("participant", "legal_representative"))),
            "language": fields.String(required=True, validate=validate.OneOf(protocol.languages)),
        },
        "RandomizeParticipant": {"registered_on": IsoDate(required=True)},
        "RecordBloodSample": {
            "timepoint": fields.String(required=True, validate=visit),
            "collected_at": IsoDateTime(required=True, default_timezone=UTC),
            "results": fields.Nested(BloodResults),
        },
        "RecordDose": {
            "taken_on": IsoDate(required=True),
            "taken": StrictBoolean(required=True),
            "dose_mcg": StrictFloat(validate=validate.Range(min=0, max=100_000),
                                     allow_none=True),
        },
        "CompleteVisit": {
            "visit": fields.String(required=True, validate=visit),
            "completed_on": IsoDate(required=True),
            "bpi_sf": fields.Nested(BpiSf),
            "fact_es": fields.Nested(FactEs),
            "adherence": fields.Nested(Adherence),
        },
        "ReportMedication": {
            "drug": text(required=True),
            "started_on": IsoDate(allow_none=True),
            "stopped_on": IsoDate(allow_none=True),
            "contains_b12": StrictBoolean(required=True),
        },
        "WithdrawParticipant": {
            "withdrawn_on": IsoDate(required=True),
            "scope": fields.String(required=True,
                                   validate=validate.OneOf(("treatment", "study"))),
            "reason_code": text(required=True),
            "note": text(0, 2000, allow_none=True),
        },
        "CorrectData": {
            "event_id": UUIDString(required=True),
            "field": field_path(required=True),
            "value": fields.Raw(required=True, allow_none=True, validate=shallow),
        },
        "ResolveDeviation": {
            "deviation_id": UUIDString(required=True),
            "resolution": text(1, 2000, required=True),
        },
        "RespondToQuery": {"query_id": UUIDString(required=True),
                           "text": text(1, 4000, required=True)},
        "CloseQuery": {"query_id": UUIDString(required=True),
                       "text": text(1, 4000, allow_none=True, load_default=None)},
        "ReopenQuery": {"query_id": UUIDString(required=True),
                        "text": text(1, 4000, allow_none=True, load_default=None)},
        "CancelQuery": {"query_id": UUIDString(required=True),
                        "text": text(1, 4000, allow_none=True, load_default=None)},
        "VerifySource": {"visit": fields.String(required=True, validate=visit)},
        "SignVisit": _signing(visit),
        "SignCasebook": _signing(None),
        "LockVisit": {"visit": fields.String(required=True, validate=visit)},
        "UnlockVisit": {"visit": fields.String(required=True, validate=visit)},
        "LockCasebook": {},
        "UnlockCasebook": {},
    }
    built = {name: Schema.from_dict(spec, name=f"{name}Data") for name, spec in schemas.items()}
    built["RaiseQuery"] = _raise_query(protocol)
    assert set(built) == set(COMMAND_TYPES), "every command type has a data schema"
    return built


# What a participant id may be: no participant has an id that breaks it.
PARTICIPANT_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class CommandEnvelope(Schema):
    """A command body as POST /v1/commands and `trialog import` take it."""

    command_id = UUIDString(required=True)
    type = fields.String(required=True, validate=validate.OneOf(sorted(COMMAND_TYPES)))
    participant_id = fields.String(required=True, validate=Whole(
        PARTICIPANT_ID,
        error="must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"))
    expected_version = JsonInteger(validate=validate.Range(min=0, max=2**31),
                                      allow_none=True)
    reason = text(1, 2000, allow_none=True)
    data = fields.Dict(required=True)  # JSON keys are strings: nothing to check


def flatten(messages: Any, prefix: str = "") -> dict[str, list[str]]:
    """marshmallow's nested error messages as dotted paths from the body root."""
    if isinstance(messages, dict):
        flat: dict[str, list[str]] = {}
        for key, value in messages.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if key == "_schema":
                path = prefix or "body"
            flat.update(flatten(value, path))
        return flat
    if isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        return {prefix or "body": list(messages)}
    return {prefix or "body": [str(messages)]}
