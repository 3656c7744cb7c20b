"""POST /v1/sessions: a person signs in with a login and password for a 12-hour token;
POST /v1/sessions/password: a person changes their own password."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flask import Response, g, request
from flask_smorest import Blueprint
from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from infrastructure.api.bodies import TOO_LARGE, BodyParser
from infrastructure.api.errors import ApiError, error_response
from infrastructure.api.schemas import ErrorBody
from infrastructure.store.people import PASSWORD_LENGTH
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


class PasswordChange(Schema):
    password = fields.String(required=True, validate=validate.Length(1, 1024), load_only=True,
                             metadata={"description": "the current password"})
    new_password = fields.String(
        required=True, load_only=True, validate=validate.Length(
            *PASSWORD_LENGTH, error="must be {min}-{max} characters"))

    @validates_schema
    def _a_new_one(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("new_password") is not None and data["new_password"] == data.get("password"):
            raise ValidationError("must differ from the current password", "new_password")


def _a_persons_session(view: Callable[..., Response]) -> Callable[..., Response]:
    """The view for a person's session alone: a machine token is refused before its body is
    read (it has no password to change, whatever the body holds)."""
    @functools.wraps(view)
    def checked(*args: Any, **kwargs: Any) -> Response:
        principal = g.principal
        if not principal.person:
            raise ApiError(403, "forbidden", f"token {principal.name!r} is a machine token: "
                                             "only a person's session has a password to "
                                             "change")
        return view(*args, **kwargs)
    return checked


@blp.route("/password", methods=["POST"])
@_a_persons_session
@blp.arguments(PasswordChange)
@blp.response(204, description="changed: every other session of the person's has ended")
@blp.alt_response(400, schema=ErrorBody, description="malformed JSON")
@blp.alt_response(401, schema=ErrorBody, description="no valid bearer token, or "
                                                      "`reauthentication_failed`: the "
                                                      "current password is wrong")
@blp.alt_response(403, schema=ErrorBody, description="a machine token: it has no password")
@blp.alt_response(409, schema=ErrorBody, description="the person's record changed "
                                                      "meanwhile: try again")
@blp.alt_response(413, schema=ErrorBody, description=TOO_LARGE)
@blp.alt_response(422, schema=ErrorBody, description="a field breaks its rule")
@blp.alt_response(423, schema=ErrorBody, description="five wrong passwords in a row: "
                                                      "locked for 15 minutes")
def post_password(body: dict[str, Any]) -> Response:
    """Change your own password, with a person's session token: the current password is
    checked again (a wrong one counts toward the lock, as at sign-in), and every other
    session of yours ends (this one goes on)."""
    from infrastructure.api import runtime
    from infrastructure.store.people import AccountLocked, LoginFailed, change_password
    from infrastructure.store.tokens import TokenError, token_hash

    principal = g.principal
    token = request.headers["Authorization"].partition(" ")[2].strip()
    try:
        change_password(runtime().trialog.engine, principal.name, body["password"],
                        body["new_password"], client=request.remote_addr,
                        keep_session=token_hash(token))
    except LoginFailed:
        raise ApiError(401, "reauthentication_failed",
                       "the password is not your current password") from None
    except AccountLocked as e:
        seconds = max(1, int((e.until - _now()).total_seconds()))
        raise ApiError(423, "account_locked", f"too many wrong passwords: locked until "
                                              f"{e.until.isoformat(timespec='seconds')}",
                       headers={"Retry-After": str(seconds)}) from None
    except TokenError as e:  # the rules were checked above: the row changed meanwhile
        raise ApiError(409, "version_conflict", str(e)) from None
    return Response(status=204)


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)
