"""API errors as the contract's JSON bodies; domain errors mapped to status codes."""

from __future__ import annotations

import logging
from typing import Any

from flask import Response, jsonify

from domain.errors import DomainError
from infrastructure.store.outages import is_unavailable
from infrastructure.store.stored import UnreadableRecord

log = logging.getLogger("trialog.http")

STATUS_OF = {
    "invalid_transition": 409, "not_eligible": 409, "version_conflict": 409,
    "idempotency_key_reused": 409, "not_found": 404, "validation_failed": 422,
    "site_not_allowed": 403, "participant_id_unavailable": 409, "locked": 409,
    "database_locked": 409, "command_record_altered": 409,
}


class ApiError(Exception):
    def __init__(self, status: int, error: str | dict[str, Any], message: str = "",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = error if isinstance(error, dict) else {"error": error, "message": message}
        self.headers = headers or {}  # beside the body (Retry-After of a lock)

    def response(self) -> Response:
        answer = error_response(self.status, self.body)
        answer.headers.update(self.headers)
        return answer


def invalid(fields: dict[str, list[str]]) -> ApiError:
    """A 422 naming each failing field (dotted paths from the body root) and its rule."""
    message = "; ".join(f"{path}: {errors[0]}" for path, errors in fields.items())
    return ApiError(422, {"error": "validation_failed", "message": message, "fields": fields})


def from_domain(e: DomainError) -> ApiError:
    body: dict[str, Any] = {"error": e.code, "message": e.message, **e.details}
    return ApiError(STATUS_OF.get(e.code, 409), body)


def forbidden(principal_name: str, role: str, what: str) -> ApiError:
    return ApiError(403, "forbidden", f"token {principal_name!r} (role {role}) may not {what}")


RETRY_AFTER_S = 2


def error_response(status: int, body: dict[str, Any]) -> Response:
    response = jsonify(body)
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="trialog"'
    if status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


UNAVAILABLE = {"error": "database_unavailable",
               "message": f"the database can't be reached; retry after {RETRY_AFTER_S} s "
                          "(a command may be sent again with the same command_id)"}


INTERNAL_ERROR = {"error": "internal_error", "message": "the server failed; the error is logged"}


def unreadable(e: UnreadableRecord, participant_id: str | None) -> dict[str, Any]:
    """The body of a 500 for a participant's record the store can't give, naming the
    event (``participant_id``: the participant asked about, when the error has none)."""
    return {"error": "record_unreadable",
            "message": e.of(e.participant_id or participant_id or "a participant")}


def database_error(e: Exception) -> Response:
    """A database that can't be reached (restarting, failing over) is a 503 the client
    retries, never a 500; any other database error is the server's fault (500, logged)."""
    if is_unavailable(e):
        return error_response(503, dict(UNAVAILABLE))
    log.exception("database error")
    return error_response(500, dict(INTERNAL_ERROR))
