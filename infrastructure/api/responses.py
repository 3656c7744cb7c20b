"""Schemas of the answers, for the OpenAPI document (views return plain JSON)."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from domain.scoring import SCORE_NAMES

STATUSES = ("screened", "screen_failed", "consented", "randomized", "off_treatment",
            "completed", "withdrawn")


def _nullable_string() -> fields.String:
    return fields.String(required=True, allow_none=True)


class Window(Schema):
    start = fields.String(required=True)
    end = fields.String(required=True)


class Visit(Schema):
    code = fields.String(required=True)
    target = fields.String(required=True)
    window = fields.Nested(Window, required=True)
    status = fields.String(required=True, validate=validate.OneOf(
        ("completed", "missed", "cancelled", "open", "upcoming", "overdue")))
    completed_on = _nullable_string()


class Signature(Schema):
    """A signature as shown (Part 11 §11.50): who, the printed name, when, what it means,
    and whether the signed data is still as signed."""

    signed_by = fields.String(required=True)
    printed_name = fields.String(required=True)
    meaning = fields.String(required=True)
    signed_at = fields.String(required=True)
    valid = fields.Boolean(required=True)


class StateVisit(Visit):
    sdv = fields.String(required=True, validate=validate.OneOf(
        ("not_verified", "verified", "changed_since_verified")))
    signature = fields.Nested(Signature, required=True, allow_none=True)
    locked = fields.Boolean(required=True)


class Casebook(Schema):
    signature = fields.Nested(Signature, required=True, allow_none=True)
    locked = fields.Boolean(required=True)


class DueVisit(Visit):
    participant_id = fields.String(required=True)
    site_id = fields.String(required=True)


class Deviation(Schema):
    deviation_id = fields.String(required=True)
    participant_id = fields.String(required=True)
    code = fields.String(required=True)
    severity = fields.String(required=True, validate=validate.OneOf(("major", "minor")))
    status = fields.String(required=True, validate=validate.OneOf(("open", "resolved")))
    detail = fields.String(required=True)
    evidence = fields.List(fields.String(), required=True)
    detected_at = fields.String(required=True)
    resolution = _nullable_string()


Scores = Schema.from_dict(
    {name: fields.Float(required=True, allow_none=True) for name in SCORE_NAMES},
    name="Scores",
)


class Contact(Schema):
    email = _nullable_string()
    birth_date = _nullable_string()


class ParticipantSummary(Schema):
    participant_id = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(STATUSES))
    arm = _nullable_string()
    version = fields.Integer(required=True)
    site_id = fields.String(required=True)
    language = fields.String(required=True)
    registered_on = _nullable_string()


class ParticipantState(ParticipantSummary):
    eligible = fields.Boolean(required=True)
    failed_criteria = fields.List(fields.String(), required=True)
    visits = fields.List(fields.Nested(StateVisit), required=True)
    open_queries = fields.Integer(required=True, metadata={
        "description": "queries open or answered, not yet closed"})
    casebook = fields.Nested(Casebook, required=True)
    open_deviations = fields.List(fields.Nested(Deviation), required=True)
    scores = fields.Dict(keys=fields.String(), values=fields.Nested(Scores), required=True)
    position = fields.Integer(required=True, allow_none=True)
    contact = fields.Nested(Contact)


class ParticipantList(Schema):
    participants = fields.List(fields.Nested(ParticipantSummary), required=True)


class DeviationList(Schema):
    deviations = fields.List(fields.Nested(Deviation), required=True)


class VisitList(Schema):
    visits = fields.List(fields.Nested(DueVisit), required=True)


class HistoryEvent(Schema):
    event_id = fields.String(required=True)
    type = fields.String(required=True)
    version = fields.Integer(required=True)
    recorded_at = fields.String(required=True)
    actor = fields.String(required=True)
    command_id = fields.String(required=True, metadata={
        "description": "the command's id; \"[redacted]\" for a reader without contact rights "
                       "when the event holds contact details"})
    reason = _nullable_string()
    data = fields.Dict(required=True)
    digest = fields.String(required=True, metadata={
        "description": "the event's chain digest, keyed (HMAC-SHA256 under the server's key)"})


class History(Schema):
    participant_id = fields.String(required=True)
    events = fields.List(fields.Nested(HistoryEvent), required=True)


class DatabaseLock(Schema):
    locked_at = fields.String(required=True)
    locked_by = fields.String(required=True)
    position = fields.Integer(required=True)


class Summary(Schema):
    participants = fields.Integer(required=True)
    by_status = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)
    by_arm = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)
    by_site = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)
    deviations_by_code = fields.Dict(keys=fields.String(), values=fields.Integer(),
                                     required=True)
    open_deviations_by_code = fields.Dict(keys=fields.String(), values=fields.Integer(),
                                          required=True)
    mean_pain_by_arm_and_visit = fields.Dict(keys=fields.String(), values=fields.Dict(),
                                             required=True)
    database_lock = fields.Nested(DatabaseLock, required=True, allow_none=True)


class Message(Schema):
    action = fields.String(required=True, validate=validate.OneOf(
        ("raise", "respond", "close", "reopen", "cancel")))
    by = fields.String(required=True)
    at = fields.String(required=True)
    text = _nullable_string()
    reason = fields.String(metadata={"description": "the step's reason, where it has a "
                                                    "text too (else the text is the reason)"})


class Query(Schema):
    query_id = fields.String(required=True)
    participant_id = fields.String(required=True)
    site_id = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(
        ("open", "answered", "closed", "cancelled")))
    target = fields.Dict(required=True)
    opened_at = fields.String(required=True)
    opened_by = fields.String(required=True)
    days_open = fields.Integer(required=True)
    thread = fields.List(fields.Nested(Message), required=True)


class QueryList(Schema):
    queries = fields.List(fields.Nested(Query), required=True)


class Problem(Schema):
    kind = fields.String(required=True)
    stream = fields.String(required=True)
    version = fields.Integer(required=True)
    notification_id = fields.Integer(required=True, allow_none=True)
    detail = fields.String(required=True)
    participant_id = _nullable_string()


class VerifyReport(Schema):
    ok = fields.Boolean(required=True)
    events_checked = fields.Integer(required=True)
    problems = fields.List(fields.Nested(Problem), required=True)
    deep = fields.Boolean(metadata={"description": "every digest was recomputed too"})
    processes = fields.Integer(metadata={"description": "processes the check ran in"})
    seconds = fields.Float(metadata={"description": "how long the check took"})
    events_per_second = fields.Float()
    snapshots_passed_over = fields.Integer(metadata={
        "description": "deep: the snapshots not compared, as this code never uses them "
                       "(another release's); not shown to a caller of some sites only"})


class VerifyJob(VerifyReport):
    """A deep verification in the background: while it runs, its progress; once done, the
    verify report's fields beside these; if it failed, why."""

    status = fields.String(required=True, validate=validate.OneOf(("running", "done",
                                                                   "failed")))
    url = fields.String(required=True, metadata={"description": "where to poll the check"})
    job_id = fields.String(required=True)
    started_by = fields.String(required=True, allow_none=True, metadata={
        "description": "who started it; null for a caller who sees only some sites"})
    started_at = fields.String(required=True)
    finished_at = _nullable_string()
    events_checked = fields.Integer(required=True, metadata={
        "description": "so far, while running"})
    ok = fields.Boolean(metadata={"description": "once done"})
    problems = fields.List(fields.Nested(Problem), metadata={"description": "once done"})
    message = fields.String(metadata={"description": "why a failed check failed"})


class Health(Schema):
    status = fields.String(required=True, validate=validate.OneOf(("ok", "degraded")))
    database = fields.String(required=True)
    read_position = fields.Integer(required=True)
    quarantined = fields.Integer(required=True, metadata={
        "description": "participants a follower of the log has set aside (see "
                       "`trialog projections status`); while any, status is degraded"})


class Disclosure(Schema):
    at = fields.String(required=True)
    actor = fields.String(required=True, metadata={"description": "the token's name"})
    participant_id = fields.String(required=True)
    endpoint = fields.String(required=True)
    request_id = _nullable_string()
    intact = fields.Boolean(required=True, metadata={
        "description": "false when the row fails its seal: changed or made up in the "
                       "database, outside trialog"})


class Holder(Schema):
    """One name the access register granted access or refused."""

    name = fields.String(required=True, metadata={
        "description": "the token's name or the person's login (the actor of their events)"})
    kind = fields.String(required=True, validate=validate.OneOf(("token", "person")))
    full_name = _nullable_string()
    role = _nullable_string()
    sites = fields.List(fields.String(), required=True, allow_none=True, metadata={
        "description": "the sites granted; null: every site (or, role null too, no grant "
                       "recorded)"})
    granted_at = _nullable_string()
    granted_by = _nullable_string()
    grant_reason = _nullable_string()
    ended_at = fields.String(required=True, allow_none=True, metadata={
        "description": "when the token was revoked or the person disabled"})
    ended_by = _nullable_string()
    end_reason = _nullable_string()
    password_changes = fields.Integer(required=True)


class AccessRegister(Schema):
    version = fields.Integer(required=True, allow_none=True, metadata={
        "description": "the register's version read: its last at or before as_of (null: "
                       "nothing recorded yet)"})
    holders = fields.List(fields.Nested(Holder), required=True, metadata={
        "description": "in the order access was granted; names refused with no grant "
                       "recorded last"})


class AccessLog(Schema):
    disclosures = fields.List(fields.Nested(Disclosure), required=True,
                              metadata={"description": "newest first"})
