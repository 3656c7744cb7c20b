"""Query endpoints: the read models, the audit history and verification, liveness."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC
from typing import Any
from uuid import UUID

import orjson
from flask import Response, g, jsonify, request
from flask_smorest import Blueprint
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema
from werkzeug.wsgi import wrap_file

from domain.deviations import SEVERITY
from domain.errors import DomainError
from domain.revocations import holders, register_uuid
from infrastructure.api import responses as r
from infrastructure.api.errors import ApiError, forbidden, from_domain, invalid
from infrastructure.api.schemas import ErrorBody, Parameters
from infrastructure.audit import access, exports
from infrastructure.audit import history as audit
from infrastructure.readside import queries
from infrastructure.store.outages import is_unavailable
from infrastructure.store.schemas import a_moment, text
from infrastructure.store.stored import replayed

participants_blp = Blueprint("participants", __name__, url_prefix="/v1/participants",
                             description="Participants: current state, history, the list")
trial_blp = Blueprint("trial", __name__, url_prefix="/v1",
                      description="Deviations, visits due, the trial summary, audit")
health_blp = Blueprint("health", __name__, description="Liveness")
log = logging.getLogger("trialog.http")
# The largest log position and participant version a read may name.
MAX_POSITION, MAX_VERSION = 2**62, 2**31


class ReadArgs(Parameters):
    after = fields.Integer(validate=validate.Range(min=0, max=MAX_POSITION), metadata={
        "description": "wait until the read models include this position (read your write)"})
    wait = fields.Float(load_default=2.0, validate=validate.Range(min=0, max=10),
                        metadata={"description": "longest wait for `after`, in seconds"})


class StateArgs(ReadArgs):
    as_of = fields.AwareDateTime(default_timezone=UTC, validate=a_moment, metadata={
        "description": "the state as recorded at this moment (no zone: UTC)"})
    version = fields.Integer(validate=validate.Range(min=1, max=MAX_VERSION), metadata={
        "description": "the state as it was at this version of the participant"})

    @validates_schema
    def one_moment(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("as_of") is not None and data.get("version") is not None:
            raise ValidationError("give as_of or version, not both", "version")


def _limit(default: int | None) -> fields.Integer:
    return fields.Integer(load_default=default, validate=validate.Range(min=1, max=10_000),
                          metadata={"description": "a page: at most this many" + (
                              "" if default else " (without it, the whole list)")})


class PageArgs(ReadArgs):
    """A list's page: at most ``limit`` rows after the first ``offset``, in the list's
    own order."""
    limit = _limit(1000)
    offset = fields.Integer(load_default=0, validate=validate.Range(min=0, max=10**9),
                            metadata={"description": "the rows before the page"})


class ListArgs(PageArgs):
    status = fields.String(validate=validate.OneOf(r.STATUSES))
    arm = text(1, 32)
    site_id = text(1, 32)


class DeviationArgs(PageArgs):
    limit = _limit(None)  # the whole list unless a page is asked for, as before pages
    status = fields.String(validate=validate.OneOf(("open", "resolved")))
    code = fields.String(validate=validate.OneOf(tuple(SEVERITY)))  # the catalogue's codes
    participant_id = text(1, 64)


class QueryArgs(PageArgs):
    status = fields.String(validate=validate.OneOf(("open", "answered", "closed",
                                                    "cancelled")))
    site_id = text(1, 32)
    participant_id = text(1, 64)
    limit = _limit(100)


class DueArgs(PageArgs):
    limit = _limit(None)
    within_days = fields.Integer(load_default=14, validate=validate.Range(min=0, max=3660))


def _read(what: str, args: dict[str, Any] | None = None, *, waits: bool = True) -> None:
    """Checks the caller's role may read ``what``, then honours ``?after=``: refused
    beyond the newest event and, unless what is read is the store itself (``waits`` false:
    the history), waited for until the read models include it."""
    from infrastructure.api import runtime

    principal = g.principal
    if not principal.may_read(what):
        raise forbidden(principal.name, principal.role, f"read {what}")
    if args and args.get("after") is not None:
        head = runtime().projection.head()
        if args["after"] > head:
            raise invalid({"after": [f"is beyond the newest event position, {head}"]})
        if not waits:
            return
        reached = runtime().wait_for(args["after"], args["wait"])
        if reached is None:
            raise ApiError(503, "read_side_behind",
                           f"the read models have not reached position {args['after']} "
                           f"within {args['wait']} s; retry")
        g.position = reached  # taken before the view reads them


def _one_of(args: dict[str, Any], name: str, values: list[str]) -> None:
    """A filter on a value no row can hold is a mistake (a wrong case, a misspelling), not
    an empty list: a 422 naming the filter and the values it takes."""
    if args.get(name) is not None and args[name] not in values:
        raise invalid({name: [f"must be one of: {', '.join(values)}"]})


def _known_site(args: dict[str, Any]) -> None:
    """``site_id`` as ``_one_of``: a site of the protocol, or one that a participant the
    caller may see is at (a site taken out of the protocol may still hold participants)."""
    site_id, t = args.get("site_id"), _trialog()
    if site_id is not None and site_id not in t.protocol.site_ids and not (
            g.principal.scope.admits(site_id) and queries.holds_site(t, site_id)):
        # (a site outside the caller's scope holds nothing for it, whatever it holds)
        _one_of(args, "site_id", list(t.protocol.site_ids))


def _reflecting_read_models() -> None:
    """The answer is read from the read models: its position is theirs, taken before they
    are read. A follower may commit between the read and the answer, so a position taken
    after it could name events the answer does not show."""
    from infrastructure.api import runtime

    if g.get("position") is None:  # else ``?after=`` has just taken it
        g.position = runtime().projection.position()


def _trialog() -> Any:
    from infrastructure.api import runtime

    return runtime().trialog


COMMON = (401, 403, 422, 503)


def query(blp: Blueprint, path: str, args: type[Schema] | None, answer: type[Schema],
          *errors: int) -> Any:
    """Routes a GET view with its query arguments, answer and error answers documented."""
    def decorate(view: Any) -> Any:
        for code in (*COMMON, *errors):
            view = blp.alt_response(code, schema=ErrorBody)(view)
        view = blp.response(200, answer)(view)
        if args is not None:
            view = blp.arguments(args, location="query", as_kwargs=True, unknown=RAISE)(view)
        return blp.route(path)(view)
    return decorate


@query(participants_blp, "", ListArgs, r.ParticipantList)
def list_participants(**args: Any) -> Response:
    """Participants, filtered by status, arm and site."""
    _read("participants", args)
    _one_of(args, "arm", [arm.code for arm in _trialog().protocol.arms])
    _known_site(args)
    _reflecting_read_models()
    rows = queries.list_participants(
        _trialog(), scope=g.principal.scope, status=args.get("status"), arm=args.get("arm"),
        site_id=args.get("site_id"), limit=args["limit"], offset=args["offset"])
    return jsonify({"participants": rows})


@query(participants_blp, "/<participant_id>", StateArgs, r.ParticipantState, 404)
def get_participant(participant_id: str, **args: Any) -> Response:
    """One participant's current state, or its state as recorded at ``as_of``."""
    _read("participants", args)
    t = _trialog()
    contact = g.principal.sees_contact
    try:
        if args.get("version") is not None:
            participant = replayed(t.service, participant_id, args["version"])
            if participant.version != args["version"]:
                raise ApiError(404, "not_found", f"participant {participant_id} has no "
                                                 f"version {args['version']}")
            moment = participant.modified_on
        elif args.get("as_of") is not None:
            participant = audit.participant_as_of(t.service, participant_id, args["as_of"])
            moment = args["as_of"]
        else:
            current = queries.participant_state(t, participant_id, contact=contact)
            g.position = current["position"]
            if contact:
                _disclose([participant_id], f"GET /v1/participants/{participant_id}")
            return jsonify(current)
    except DomainError as e:
        raise from_domain(e) from None
    if participant is None:
        raise ApiError(404, "not_found", f"participant {participant_id} has no events "
                                         f"recorded at or before {moment.isoformat()}")
    state = queries.shown_state(participant, t.protocol, moment, contact=contact)
    if contact:
        _disclose([participant_id], f"GET /v1/participants/{participant_id}")
    g.position = queries.event_position(t, participant_id, participant.version)
    state.update(language=participant.screening["language"], position=g.position)
    return jsonify(state)


def _until(args: dict[str, Any]) -> str:
    if args.get("as_of") is not None:
        return f" at or before {args['as_of'].isoformat()}"
    return f" up to version {args['version']}" if args.get("version") is not None else ""


@query(participants_blp, "/<participant_id>/history", StateArgs, r.History, 404)
def get_history(participant_id: str, **args: Any) -> Response:
    """Every event of one participant, oldest first, with who, when and why."""
    _read("history", args, waits=False)  # read from the store: every command is in it
    from infrastructure.api import runtime

    if args.get("as_of") is None and args.get("version") is None:
        rendered = _rendered_history(participant_id)
        if rendered is not None:
            return rendered
    entries = audit.history(_trialog().service, participant_id, args.get("as_of"),
                            args.get("version"), cache=runtime().histories,
                            veil=_trialog().veil_digest)
    if not entries:
        raise ApiError(404, "not_found", f"participant {participant_id} has no events "
                                         f"recorded{_until(args)}")
    if args.get("version") is not None and entries[-1]["version"] != args["version"]:
        # As the state at that version answers: a version not recorded is not shown as
        # the whole record.
        raise ApiError(404, "not_found", f"participant {participant_id} has no "
                                         f"version {args['version']}")
    t = _trialog()
    with t.engine.begin() as connection:  # one round of the pool for both
        if g.principal.sees_contact:
            access.record(connection, g.principal.name, [participant_id],
                          f"GET /v1/participants/{participant_id}/history",
                          g.get("request_id"))
        else:
            entries = [audit.redact_contact(e) for e in entries]
        # The position of the last event shown (the history may stop at as_of or a version).
        g.position = queries.event_position(t, participant_id, entries[-1]["version"],
                                            connection)
    body = {"participant_id": participant_id, "events": entries}
    try:
        return Response(orjson.dumps(body), mimetype="application/json")
    except TypeError:  # what orjson refuses (an integer past 64 bits), the slower way
        return jsonify(body)


def _rendered_history(participant_id: str) -> Response | None:
    """The whole history as rendered ahead beside the feed (see Feed.history_json), the
    entries' JSON joined as it is; None when it must be read from the store."""
    from infrastructure.api import runtime

    t, contact = _trialog(), g.principal.sees_contact
    found = runtime().feed.history_json(participant_id, contact)
    if found is None or not found[0]:
        return None
    if contact:  # one participant's row: one statement, committed by itself
        with t.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db:
            access.record(db, g.principal.name, [participant_id],
                          f"GET /v1/participants/{participant_id}/history",
                          g.get("request_id"))
    entries, g.position = found
    body = b"".join((b'{"participant_id":', orjson.dumps(participant_id), b',"events":[',
                     b",".join(entries), b"]}"))
    return Response(body, mimetype="application/json")


@query(trial_blp, "/deviations", DeviationArgs, r.DeviationList)
def get_deviations(**args: Any) -> Response:
    """Protocol deviations, filtered by status, code and participant."""
    _read("deviations", args)
    _reflecting_read_models()
    return jsonify({"deviations": queries.list_deviations(
        _trialog(), scope=g.principal.scope, status=args.get("status"), code=args.get("code"),
        participant_id=args.get("participant_id"), limit=args["limit"],
        offset=args["offset"])})


@query(trial_blp, "/queries", QueryArgs, r.QueryList)
def get_queries(**args: Any) -> Response:
    """Queries to the sites, oldest first, filtered by status, site and participant."""
    _read("queries", args)
    _known_site(args)
    _reflecting_read_models()
    return jsonify({"queries": queries.list_queries(
        _trialog(), scope=g.principal.scope, status=args.get("status"),
        site_id=args.get("site_id"), participant_id=args.get("participant_id"),
        limit=args["limit"], offset=args["offset"])})


@query(trial_blp, "/visits/due", DueArgs, r.VisitList)
def get_visits_due(**args: Any) -> Response:
    """Visits whose window is open or opens within ``within_days``."""
    _read("visits", args)
    _reflecting_read_models()
    return jsonify({"visits": queries.visits_due(
        _trialog(), args["within_days"], scope=g.principal.scope, limit=args["limit"],
        offset=args["offset"])})


@query(trial_blp, "/trial/summary", ReadArgs, r.Summary)
def get_summary(**args: Any) -> Response:
    """Counts by status, arm and site; deviations by code; mean pain by arm and visit."""
    _read("summary", args)
    _reflecting_read_models()
    return jsonify(queries.trial_summary(_trialog(), scope=g.principal.scope))


class VerifyArgs(Parameters):
    deep = fields.Boolean(load_default=False, metadata={
        "description": "also recompute every event's digest from its content: the check "
                       "runs in the background (202) and is polled at its `url`"})


JOB_STARTED = ("the deep check runs in the background: poll its `url` (200 while running, "
               "then the report with status `done`). While one runs, every deep request is "
               "pointed to it: one at a time.")
JOB_LOCATION = {"Location": {"description": "the check's `url`", "required": True,
                             "schema": {"type": "string"}}}


@query(trial_blp, "/audit/verify", VerifyArgs, r.VerifyReport)
@trial_blp.alt_response(202, schema=r.VerifyJob, description=JOB_STARTED,
                        headers=JOB_LOCATION, success=True)
def get_verify(deep: bool) -> Response:
    """Checks every stored event: it decrypts, its versions and links follow on; the deep
    check runs in the background."""
    from infrastructure.api import runtime
    from infrastructure.audit.verification import as_seen_by, check_store

    _read("audit")
    scope = g.principal.scope
    if not deep:
        return jsonify(as_seen_by(_trialog(), scope, check_store(_trialog()).as_dict()))
    job = runtime().verify_jobs.start(g.principal.name)
    answer = jsonify(as_seen_by(_trialog(), scope, job))
    answer.status_code = 202
    answer.headers["Location"] = job["url"]
    return answer


@query(trial_blp, "/audit/verify/jobs/<uuid:job_id>", None, r.VerifyJob, 404)
def get_verify_job(job_id: UUID) -> Response:
    """A deep check started by ``/audit/verify?deep=true``: running, done or failed."""
    from infrastructure.api import runtime
    from infrastructure.audit.verification import as_seen_by

    _read("audit")
    job = runtime().verify_jobs.get(str(job_id))
    if job is None:
        raise ApiError(404, "not_found", f"no verification {job_id}")
    return jsonify(as_seen_by(_trialog(), g.principal.scope, job))


class AccessArgs(Parameters):
    participant_id = text(1, 64, metadata={"description": "one participant's disclosures"})
    limit = fields.Integer(load_default=1000, validate=validate.Range(min=1, max=10_000))


@query(trial_blp, "/audit/access", AccessArgs, r.AccessLog)
def get_access_log(**args: Any) -> Response:
    """Who was shown a participant's contact details, when, by which endpoint."""
    _read("access_log")
    return jsonify({"disclosures": access.disclosures(
        _trialog().engine, args.get("participant_id"), args["limit"], g.principal.scope)})


class RegisterArgs(Parameters):
    as_of = fields.AwareDateTime(default_timezone=UTC, validate=a_moment, metadata={
        "description": "the holders as recorded at this moment (no zone: UTC)"})


@query(trial_blp, "/audit/register", RegisterArgs, r.AccessRegister)
def get_access_register(**args: Any) -> Response:
    """Who was granted access (machine tokens, people: role, sites, when, by whom) and
    whose access ended, from the access register, for callers of every site."""
    _read("access_register")
    principal = g.principal
    if not principal.scope.every_site:
        raise ApiError(403, "forbidden", f"{principal.kind} {principal.name!r} may not read "
                       "the access register: it is the deployment's, read by callers of "
                       "every site")
    service, as_of = _trialog().service, args.get("as_of")
    try:
        events = list(service.events.get(register_uuid(service.protocol.study_id)))
    except Exception as error:  # said, with what to run
        if is_unavailable(error):
            raise
        log.exception("the access register can't be read")
        raise ApiError(500, "record_unreadable", "the access register can't be read: "
                       "`trialog audit verify` names the event") from None
    listed = holders(events, as_of)
    for holder in listed:
        for moment in ("granted_at", "ended_at"):
            if holder[moment] is not None:
                holder[moment] = holder[moment].astimezone(UTC).isoformat()
    recorded = [e for e in events if as_of is None or e.timestamp <= as_of]
    return jsonify({"version": recorded[-1].originator_version if recorded else None,
                    "holders": listed})


SPOOLED = 8 * 1024 * 1024  # an export's bytes kept in memory before its file goes to disk
SENT_AT_ONCE = 256 * 1024  # bytes of an export read from its file for each write
exports_blp = Blueprint("exports", __name__, url_prefix="/v1/exports",
                        description="Exports for statisticians and auditors")


class ExportArgs(Parameters):
    deidentify = fields.Boolean(load_default=False, metadata={
        "description": "pseudonymous ids, dates shifted per participant"})


EXPORTS = (
    ("csv", "text/csv", "one row per participant and visit with the scores (statisticians)"),
    ("odm", "application/xml", ("one CDISC ODM 1.3.2 document: ClinicalData with an "
                               "AuditRecord per change")),
    ("fhir", "application/fhir+ndjson", "one FHIR R4 ResearchSubject per line"),
)


def _disclose(participant_ids: list[str], endpoint: str) -> None:
    """Records that this answer shows these participants' contact details."""
    access.record(_trialog().engine, g.principal.name, participant_ids, endpoint,
                  g.get("request_id"))


def _whole(chunks: Iterator[str], shown: list[str], endpoint: str, mimetype: str) -> Response:
    """The export written whole to a temporary file (memory stays constant: in memory up to
    SPOOLED bytes, then on disk), then sent with its length; the response closes the file.
    A failure while it is made is an error answer, never a document cut short that looks
    complete (a server ends a response whose chunks stop with an error as if it were
    whole). The participants whose contact details it carries are recorded before it
    leaves."""
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOLED)  # noqa: SIM115 - see above
    try:
        with closing(chunks):  # its cursor, if writing fails (a full disk)
            for chunk in chunks:
                spool.write(chunk.encode())
        size = spool.tell()
        spool.seek(0)
        _disclose(shown, endpoint)
    except BaseException:
        spool.close()
        raise
    response = Response(wrap_file(request.environ, spool, buffer_size=SENT_AT_ONCE),
                        mimetype=mimetype, direct_passthrough=True)
    response.content_length = size
    return response


SET_ASIDE = "Trialog-Set-Aside"
SET_ASIDE_HEADER = {SET_ASIDE: {
    "description": ("how many participants of the caller's sites the read models, which this "
                    "export reads, had set aside as it began or as it ended (an event of "
                    "theirs can't be applied): each is given as it stood before that event, "
                    "or left out; `trialog projections status` names them, and the ODM export "
                    "reads the store. One whose site the read models never learnt counts for "
                    "every caller"),
    "required": True, "schema": {"type": "integer", "minimum": 0}}}


def _set_aside() -> set[str]:
    """The participants within the caller's sites the read models have set aside."""
    from infrastructure.readside.projections import TrialProjection
    from infrastructure.readside.quarantine import set_aside_within

    with _trialog().engine.connect() as connection:
        return set_aside_within(connection, TrialProjection.name, g.principal.scope)


def _export_view(kind: str, mimetype: str, description: str) -> None:
    def view(deidentify: bool) -> Response:
        _read("exports")
        if request.method == "HEAD":  # its type alone: no export made, nothing shown, and
            return Response(iter(()), mimetype=mimetype)  # no length until it is made
        shown: list[str] = []
        aside = _set_aside() if kind in exports.FROM_READ_MODELS else None
        chunks = exports.document(_trialog(), kind, deidentify,
                                  contact=g.principal.sees_contact, shown=shown,
                                  scope=g.principal.scope)
        response = _whole(chunks, shown, f"GET /v1/exports/{kind}", mimetype)
        if aside is not None:
            try:  # and once it is made: one set aside or let go meanwhile is counted
                aside |= _set_aside()
            except BaseException:
                response.close()  # its file
                raise
            response.headers[SET_ASIDE] = str(len(aside))
        return response

    view.__name__ = f"get_{kind}"
    view.__doc__ = f"Export: {description}."
    routed = exports_blp.arguments(ExportArgs, location="query", as_kwargs=True, unknown=RAISE)(view)
    routed = exports_blp.response(200, description=description, content_type=mimetype,
                                  headers=SET_ASIDE_HEADER if kind in exports.FROM_READ_MODELS
                                  else None)(routed)
    for code in (401, 403, 422):
        routed = exports_blp.alt_response(code, schema=ErrorBody)(routed)
    exports_blp.route(f"/{kind}")(routed)


for _kind, _mimetype, _description in EXPORTS:
    _export_view(_kind, _mimetype, _description)


@health_blp.route("/healthz")
@health_blp.doc(security=[])
@health_blp.response(200, r.Health)
def healthz() -> Response:
    """Liveness: the database answers; the read models' position; ``degraded`` while a
    follower of the log has participants set aside."""
    from infrastructure.api import runtime
    from infrastructure.readside import quarantine

    rt = runtime()
    with rt.trialog.engine.connect() as connection:
        held = quarantine.count(connection)  # a count only: /healthz needs no token
    g.position = rt.projection.position()
    return jsonify({"status": "degraded" if held else "ok",
                    "database": rt.trialog.engine.dialect.name,
                    "read_position": g.position, "quarantined": held})


BLUEPRINTS = (participants_blp, trial_blp, exports_blp, health_blp)
