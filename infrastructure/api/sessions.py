"""POST /v1/sessions: a person signs in with a login and password for a 12-hour token."""

from __future__ import annotations

from typing import Any

from flask import Response, request
from flask_smorest import Blueprint
from marshmallow import Schema, fields, validate

from infrastructure.api.bodies import TOO_LARGE, BodyParser
from infrastructure.api.errors import ApiError, error_response
from infrastructure.api.schemas import ErrorBody
from infrastructure.store.schemas import text

blp = Blueprint("sessions", __name__, url_prefix="/v1/sessions",
                description="Sign-in: a person's bearer token")
blp.ARGUMENTS_PARSER = BodyParser()

REFUSED = "the login or password is not valid"


class SignIn(Schema):
    login = text(1, 100, required=True)
    password = fields.String(required=True, validate=validate.Length(1, 1024),
                             load_only=True)


class SessionAnswer(Schema):
    token = fields.String(required=True, metadata={"description": "the bearer token"})
    expires_at = fields.String(required=True)
    login = fields.String(required=True)
    role = fields.String(required=True)
    sites = fields.List(fields.String(), required=True,
                        metadata={"description": "the sites the person sees"})
    all_sites = fields.Boolean(required=True, metadata={
        "description": "true when the person sees every site, present and future"})


@blp.route("", methods=["POST"])
@blp.doc(security=[])
@blp.arguments(SignIn)
@blp.response(201, SessionAnswer)
@blp.alt_response(400, schema=ErrorBody, description="malformed JSON")
@blp.alt_response(413, schema=ErrorBody, description=TOO_LARGE)
@blp.alt_response(401, schema=ErrorBody, description="wrong login or password, or a "
                                                      "disabled person")
@blp.alt_response(422, schema=ErrorBody, description="a field breaks its rule")
@blp.alt_response(423, schema=ErrorBody, description="five wrong passwords in a row: "
                                                      "locked for 15 minutes")
def post_session(body: dict[str, Any]) -> Response:
    """Sign in: a bearer token valid 12 hours."""
    from infrastructure.api import runtime
    from infrastructure.store.people import AccountLocked, LoginFailed, sign_in

    trialog = runtime().trialog
    try:
        session = sign_in(trialog.engine, body["login"], body["password"],
                          client=request.remote_addr)
    except LoginFailed:
        raise ApiError(401, "unauthorized", REFUSED) from None
    except AccountLocked as e:
        seconds = max(1, int((e.until - _now()).total_seconds()))
        response = error_response(423, {
            "error": "account_locked",
            "message": f"too many wrong passwords: sign-in is locked until "
                       f"{e.until.isoformat(timespec='seconds')}"})
        response.headers["Retry-After"] = str(seconds)
        return response
    sites = session.scope.as_list()
    return error_response(201, {
        "token": session.token, "expires_at": session.expires_at.isoformat(),
        "login": session.login, "role": session.role,
        "sites": list(trialog.protocol.site_ids) if sites is None else sites,
        "all_sites": sites is None})


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)
