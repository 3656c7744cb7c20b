"""The console's blueprint: who is signed in (every page but the sign-in form needs a
person), CSRF on every form, the headers every page carries, sign-in and sign-out."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Response,
    abort,
    flash,
    g,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_wtf.csrf import CSRFError, generate_csrf, validate_csrf
from werkzeug.exceptions import HTTPException
from wtforms import ValidationError

from infrastructure.api.errors import RETRY_AFTER_S
from infrastructure.console import auth
from infrastructure.store.outages import DATABASE_ERRORS, is_unavailable
from infrastructure.store.people import (
    SESSION_HOURS,
    AccountLocked,
    LoginFailed,
    change_password,
    check_new_password,
)
from infrastructure.store.stored import UnreadableRecord
from infrastructure.store.tokens import TokenError

log = logging.getLogger("trialog.console")
blp = Blueprint("console", __name__, url_prefix=auth.PREFIX, template_folder="templates",
                static_folder="static", static_url_path="/static")
OPEN_ENDPOINTS = frozenset({"console.sign_in", "console.static"})
# The query parameters the pages read: each taken once (a second value was dropped unseen,
# as the API refuses it); a parameter no page reads is left alone.
PAGE_PARAMETERS = frozenset({"as_of", "status", "site_id", "version", "after", "page",
                             "visit"})
# Every asset is the console's own: nothing is loaded from another host.
POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
          "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")


def runtime() -> Any:
    from infrastructure.api import runtime as api_runtime

    return api_runtime()


def trialog() -> Any:
    return runtime().trialog


def _key() -> str:
    from flask import current_app

    key: str = current_app.session_interface.key()  # type: ignore[attr-defined]
    return key


def csrf_token() -> str:
    return str(generate_csrf(secret_key=_key()))


@blp.app_template_global("console_csrf")
def _template_csrf() -> str:
    return csrf_token()


def _sign_in_redirect() -> Response:
    target = request.full_path if request.method == "GET" else url_for("console.overview")
    return redirect(url_for("console.sign_in", next=target.rstrip("?")))


@blp.before_request
def _who() -> Response | None:
    g.person = None
    if request.method == "POST":
        try:
            # As long as a sign-in lasts (Flask-WTF's default, an hour, refused a form
            # left open that long while its person worked on in another tab).
            validate_csrf(request.form.get("csrf_token"), secret_key=_key(),
                          time_limit=SESSION_HOURS * 3600)
        except ValidationError as e:
            raise CSRFError(str(e)) from None
    if request.endpoint in OPEN_ENDPOINTS:
        return None
    cookie = request.cookies.get(auth.COOKIE)
    try:
        person = auth.person(trialog().engine, cookie) if cookie else None
    except auth.IdleTimeout:
        flash(f"You were signed out after {auth.IDLE_MINUTES} minutes without activity.")
        person = None
    if person is None:
        return _sign_in_redirect()
    g.person, g.principal = person, person.principal
    for name in sorted(PAGE_PARAMETERS.intersection(request.args)):
        if (count := len(request.args.getlist(name))) > 1:
            abort(422, f"{name}: given {count} times: give one value.")
    if request.method == "GET":
        # A page is read from the read models (and the store, which is never behind them):
        # the position it reflects is theirs before it reads, not a newer one taken after.
        g.position = runtime().projection.position()
    return None


@blp.after_request
def console_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["X-Frame-Options"] = "DENY"
    if request.endpoint != "console.static":
        response.headers["Cache-Control"] = "no-store"  # pages may show personal data
    return response


@blp.errorhandler(HTTPException)
def error_page(e: HTTPException) -> tuple[str, int]:
    """An HTTP error as a console page (also for a console address that names no page, or
    a page by a method it doesn't take: see ``routing_error``)."""
    code = e.code or 500
    if isinstance(e, CSRFError):
        description = ("The form had expired or did not come from this console. Go back, "
                       "reload the page and send it again.")
    else:
        description = e.description or ""
    return render_template("console/error.html", code=code, title=e.name,
                           description=description, moment_at=getattr(e, "moment", None),
                           back=getattr(e, "back", None)), code


def _database_error(e: Exception) -> tuple[str, int, dict[str, str]]:
    """As the API answers it (503 while the database can't be reached, else 500, logged),
    as a page."""
    if is_unavailable(e):
        return render_template(
            "console/error.html", code=503, title="The database can't be reached",
            description="Nothing was lost. Try again in a few seconds: a form sent again "
                        "is recorded once."), 503, {"Retry-After": str(RETRY_AFTER_S)}
    log.exception("database error")
    return render_template("console/error.html", code=500, title="The server failed",
                           description="The error is logged."), 500, {}


for _kind in DATABASE_ERRORS:
    blp.register_error_handler(_kind, _database_error)


def routing_error(e: HTTPException) -> Response:
    """A console address that names no page, or a page asked by a method it doesn't take,
    as a console page (the blueprint's own handlers and headers apply only once a page
    of it is found; the API's hook adds the headers)."""
    _known_person()
    body, code = error_page(e)
    response = make_response(body, code)  # (the console's headers: see api's hook)
    for header, value in e.get_headers():
        if header.lower() == "allow":
            response.headers[header] = value
    return response


def _known_person() -> None:
    """The person signed in, for the navigation of a page no console page took (the
    blueprint's hook, which finds them, didn't run): none when signed out, idle, or when
    the session can't be read, and the error page is shown as ever."""
    cookie = request.cookies.get(auth.COOKIE)
    if not cookie or g.get("person") is not None:
        return
    try:
        person = auth.person(trialog().engine, cookie)
    except (auth.IdleTimeout, *DATABASE_ERRORS):
        return
    if person is not None:
        g.person, g.principal = person, person.principal


@blp.errorhandler(UnreadableRecord)
def _unreadable(e: UnreadableRecord) -> tuple[str, int]:
    """A participant's record the store can't give, as the API says it: the event named
    (the other participants' pages are shown as ever)."""
    log.error("record unreadable", extra={"error": str(e)})
    participant_id = (request.view_args or {}).get("participant_id") or "a participant"
    return render_template(
        "console/error.html", code=500, title="This record can't be read",
        description="E" + e.of(participant_id)[1:] + "."), 500


def _safe_next(target: str | None) -> str:
    """Only a page of the console: never another host."""
    if target:
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc and auth.is_console(parts.path):
            return target
    return url_for("console.overview")


@blp.route("/sign-in", methods=["GET", "POST"])
def sign_in() -> Any:
    """The sign-in form; the same sign-in as POST /v1/sessions."""
    target = _safe_next(request.values.get("next"))
    if request.method == "GET":
        return render_template("console/sign_in.html", next=target, login="", error=None)
    login = request.form.get("login", "").strip()
    password = request.form.get("password", "")
    error, status = None, 200
    if not login or not password:
        error, status = "Enter your login and your password.", 422
    else:
        try:
            cookie = auth.start(trialog().engine, login, password, request.remote_addr)
        except LoginFailed:
            error, status = "The login or password is not valid.", 401
        except AccountLocked as e:
            error, status = (f"Too many wrong passwords: sign-in is locked until "
                             f"{e.until.isoformat(timespec='minutes')} (UTC)."), 423
        else:
            _new_form_secret()
            response = redirect(target, code=303)
            response.set_cookie(auth.COOKIE, cookie, **auth.cookie_options(request))
            return response
    return make_response(render_template("console/sign_in.html", next=target, login=login,
                                         error=error), status)


def _new_form_secret() -> None:
    """The forms' CSRF secret is drawn anew at each sign-in and sign-out, so no form drawn
    for one sign-in is taken in another (a person's after they left, or the next
    person's on a shared computer)."""
    session.pop("csrf_token", None)


@blp.route("/sign-out", methods=["POST"])
def sign_out() -> Response:
    """Ends the session."""
    auth.end(trialog().engine, request.cookies.get(auth.COOKIE, ""))
    _new_form_secret()
    flash("You are signed out.")
    response = redirect(url_for("console.sign_in"), code=303)
    response.delete_cookie(auth.COOKIE, path=auth.PREFIX, httponly=True, samesite="Lax",
                           secure=request.is_secure)
    return response


@blp.route("/password", methods=["GET", "POST"])
def password() -> Any:
    """A person changes their own password, with the current one again (a wrong one counts
    toward the lock, as at sign-in); every other session of theirs ends."""
    if request.method == "GET":
        return render_template("console/password.html", error=None)
    current = request.form.get("password", "")
    new, again = request.form.get("new_password", ""), request.form.get("new_password_again", "")
    error, status = None, 200
    try:
        if not current or not new:
            raise TokenError("enter your current password and a new one")
        if new != again:
            raise TokenError("the new password and its repetition differ")
        check_new_password(new, current)
    except TokenError as e:
        error, status = f"{str(e)[0].upper()}{str(e)[1:]}.", 422
    else:
        engine = trialog().engine
        try:
            change_password(engine, g.principal.name, current, new, request.remote_addr,
                            keep_session=auth.session_of(engine, request.cookies[auth.COOKIE]))
        except LoginFailed:
            error, status = "Your current password is not that one.", 401
        except AccountLocked as e:
            error, status = (f"Too many wrong passwords: your sign-in is locked until "
                             f"{e.until.isoformat(timespec='minutes')} (UTC)."), 423
        except TokenError:  # the rules were checked above: another change meanwhile
            error, status = "Your password was changed meanwhile: try again.", 409
        else:
            flash("Your password is changed. Your other sessions have ended.")
            return redirect(url_for("console.overview"), code=303)
    return make_response(render_template("console/password.html", error=error), status)


def require_read(what: str) -> None:
    if not g.principal.may_read(what):
        abort(403, f"Your role ({g.principal.role}) may not read {what}.")
