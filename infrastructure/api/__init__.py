"""The HTTP API: an app factory, bearer-token authentication, errors as the contract's
JSON bodies, and one structured log line per request."""

from __future__ import annotations

import logging
import re
import time
import uuid
from datetime import date, datetime
from typing import Any
from uuid import UUID

from flask import Flask, Response, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from flask_smorest import Api
from werkzeug.exceptions import HTTPException

from infrastructure import console
from infrastructure.api import commands, feed, reads, reports, sessions
from infrastructure.api.errors import (
    INTERNAL_ERROR,
    ApiError,
    database_error,
    error_response,
    invalid,
    unreadable,
)
from infrastructure.api.runtime import Runtime
from infrastructure.api.schemas import MAX_BATCH, document_commands
from infrastructure.heap import freeze_startup
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.outages import DATABASE_ERRORS
from infrastructure.store.schemas import MAX_BODY, PARTICIPANT_ID
from infrastructure.store.stored import UnreadableRecord

log = logging.getLogger("trialog.http")
PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json", "/v1/sessions"})
POSITION_HEADER = "Trialog-Position"
# A correlation id a client or proxy sends: kept in the logs and the access log's rows.
REQUEST_ID_CHARACTERS = re.compile(r"[\x21-\x7e]+")


class TrialogJSON(DefaultJSONProvider):
    """Dates and datetimes as ISO 8601 (Flask's default is the HTTP date format)."""

    sort_keys = False
    ensure_ascii = False

    @staticmethod
    def default(o: Any) -> Any:
        if isinstance(o, (date, datetime)):
            return o.isoformat()
        if isinstance(o, UUID):
            return str(o)
        return DefaultJSONProvider.default(o)


class TrialogApi(Api):  # type: ignore[misc]
    DEFAULT_ERROR_RESPONSE_NAME = None  # our error bodies are documented per endpoint


def create_app(trialog: Trialog, *, follow: bool = True) -> Flask:
    """The Flask app; ``follow`` runs the read-model projection in this process."""
    app = Flask("trialog")
    app.json = TrialogJSON(app)
    app.config.update(
        MAX_CONTENT_LENGTH=MAX_BODY,
        API_TITLE="Trialog", API_VERSION="1", OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/", OPENAPI_JSON_PATH="openapi.json",
        API_SPEC_OPTIONS={
            "info": {"description": "Event-sourced clinical data capture: commands, "
                                    "queries and audit of one trial."},
            "security": [{"bearerAuth": []}],
        },
    )
    api = TrialogApi(app)
    api.spec.components.security_scheme("bearerAuth", {"type": "http", "scheme": "bearer"})
    document_commands(api.spec, trialog.protocol)
    app.extensions["trialog"] = Runtime(trialog, follow=follow)
    for blueprint in (commands.blp, commands.trial_blp, sessions.blp, feed.blp,
                      feed.webhooks_blp,
                      *reads.BLUEPRINTS):
        api.register_blueprint(blueprint)
    api.register_blueprint(reports.blp)
    console.register(app)  # /console/: people sign in with a cookie session of its own
    app.before_request(_authenticate)
    app.after_request(_log_request)
    app.after_request(_console_headers)
    app.register_error_handler(ApiError, ApiError.response)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(UnreadableRecord, _unreadable)
    for error in DATABASE_ERRORS:
        app.register_error_handler(error, database_error)
    # What exists now lives as long as the process: out of the collector's way, so a full
    # collection scans only what requests create (a 500-event history is ~5k objects).
    freeze_startup()
    return app


def runtime() -> Runtime:
    from flask import current_app

    value: Runtime = current_app.extensions["trialog"]
    return value


def _authenticate() -> None:
    g.started = time.perf_counter()
    g.request_id = _request_id(request.headers.get("X-Request-Id", ""))
    g.principal = None
    if request.path in PUBLIC_PATHS or console.serves(request.path):
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "an Authorization: Bearer <token> header is required")
    principal = runtime().authenticate(token.strip())
    if principal is None:
        raise ApiError(401, "unauthorized", "the bearer token is not valid (unknown, revoked "
                                            "or expired; a person's session also ends at "
                                            "sign-out and at a change of password: sign "
                                            "in again)")
    g.principal = principal
    participant_id = (request.view_args or {}).get("participant_id")
    if participant_id is not None:
        _gate(participant_id)


def _request_id(given: str) -> str:
    """A correlation id a client or proxy sent, as the logs and the access log keep it: its
    visible ASCII characters, the first 100 (some proxies send 200); a new one when none
    is left. Echoed in the answer's X-Request-Id, so the client sees what was kept."""
    kept = "".join(REQUEST_ID_CHARACTERS.findall(given))[:100]
    return kept or str(uuid.uuid4())


def _gate(participant_id: str) -> None:
    """A participant outside the caller's sites does not exist for the caller: every
    route about one participant answers as for an unknown id, before its view runs; so
    does an id no participant can have (a NUL in it would fail the database's query)."""
    from infrastructure.readside.queries import visible

    if (not re.fullmatch(PARTICIPANT_ID, participant_id)
            or not visible(runtime().trialog, g.principal.scope, participant_id)):
        raise ApiError(404, "not_found", f"participant {participant_id} not found")


def _unreadable(e: UnreadableRecord) -> Response:
    """A participant's record the store can't give: said so, as the server's fault (500),
    naming the event; the other participants are read as ever."""
    log.error("record unreadable", extra={"error": str(e)})
    return error_response(500, unreadable(e, (request.view_args or {}).get("participant_id")))


def _console_unrouted() -> bool:
    """Whether the request is to a console address that no page of the console took (its
    own handlers and headers apply only once one does)."""
    return console.serves(request.path) and request.blueprint is None


def _http_error(e: HTTPException) -> Response:
    if _console_unrouted():
        from infrastructure.console.web import routing_error

        return routing_error(e)  # no page of the console's matched: its own error page
    code = e.code or 500
    if code == 500:  # an unhandled error, logged by Flask: the contract's body
        return error_response(500, dict(INTERNAL_ERROR))
    if code == 413:
        return error_response(413, {"error": "body_too_large", "message": (
            f"the body is larger than {MAX_BODY // 2**20} MiB (a batch takes at most "
            f"{MAX_BATCH:,} commands)")})
    data = getattr(e, "data", None)
    if code == 422 and data and "messages" in data:
        from infrastructure.store.schemas import flatten

        messages = data["messages"]
        error = invalid(flatten(next(iter(messages.values())) if len(messages) == 1
                                else messages))
        return error_response(error.status, error.body)
    name = (e.name or "error").lower().replace(" ", "_")
    response = error_response(code, {"error": name, "message": e.description or name})
    for header, value in e.get_headers():
        if header.lower() != "content-type":
            response.headers[header] = value  # e.g. Allow on a 405
    return response


def _console_headers(response: Response) -> Response:
    """A console address no page of it answered (its 404 or 405 page, the redirect from
    /console to /console/) carries the console's headers too (its pages get them from
    the console's own hook)."""
    if _console_unrouted():
        from infrastructure.console.web import console_headers

        return console_headers(response)
    return response


def _log_request(response: Response) -> Response:
    principal = getattr(g, "principal", None)
    started = getattr(g, "started", time.perf_counter())
    participant_id = (request.view_args or {}).get("participant_id") or g.get("participant_id")
    log.info("request", extra={
        "request_id": g.get("request_id"), "method": request.method, "path": request.path,
        "status": response.status_code,
        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        "actor": principal.name if principal else None,
        "command_id": g.get("command_id"), "participant_id": participant_id,
    })
    response.headers["X-Request-Id"] = g.get("request_id", "")
    position = _position()
    if position is not None:
        response.headers[POSITION_HEADER] = str(position)
    return response


def _position() -> int | None:
    """The newest log position the answer reflects: the one a view set (a command's, a
    participant's newest event), else the read models'."""
    position: int | None = g.get("position")
    if position is None:
        try:
            position = runtime().projection.position()
        except DATABASE_ERRORS:
            return None
    return position


__all__ = ["create_app", "jsonify"]
