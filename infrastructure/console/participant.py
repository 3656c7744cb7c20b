"""A participant's page: the state, visits with scores, queries, signatures, the timeline
of the record replayable to any earlier event, and the forms of the person's role; the
signing dialog, which asks for the password again."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from flask import abort, flash, g, make_response, redirect, render_template, request, url_for
from werkzeug.exceptions import NotFound

from domain.errors import DomainError
from infrastructure.api.errors import ApiError
from infrastructure.api.reads import MAX_POSITION, MAX_VERSION
from infrastructure.audit import access
from infrastructure.audit import history as audit
from infrastructure.console import forms, timeline
from infrastructure.console.pages import moment
from infrastructure.console.web import blp, require_read, runtime, trialog
from infrastructure.readside import queries
from infrastructure.readside.projections import without_addresses
from infrastructure.store.outages import is_unavailable
from infrastructure.store.stored import UnreadableRecord, replayed

MEANINGS = {"visit": "I approve the data of this visit",
            "casebook": "I approve the data of this casebook"}


def _visible(participant_id: str) -> None:
    if not queries.visible(trialog(), g.principal.scope, participant_id):
        abort(404, f"Participant {participant_id} was not found.")


def _disclose(participant_id: str) -> None:
    """Records that the page showed the participant's contact details."""
    access.record(trialog().engine, g.principal.name, [participant_id],
                  f"GET /console/participants/{participant_id}", g.get("request_id"))


class NotRecordedThen(NotFound):
    """A replay of a moment or version the record doesn't reach; the page names the moment
    as every time of the console (in the reader's zone), and links to the record now."""

    def __init__(self, participant_id: str, description: str,
                 at: datetime | None = None) -> None:
        super().__init__(description)
        self.moment = at.isoformat() if at is not None else None
        self.back = {"href": url_for("console.participant", participant_id=participant_id),
                     "text": f"The record of {participant_id} now"}


def _replayed(participant_id: str) -> tuple[Any, dict[str, Any]] | None:
    """The participant as recorded at ``?version=`` or ``?as_of=``, and what was asked."""
    t = trialog()
    version, as_of = request.args.get("version"), moment(request.args.get("as_of"))
    if version:
        number = forms.whole(version, MAX_VERSION)
        if number is None or number < 1:
            abort(422, f"version must be a whole number from 1 to {MAX_VERSION}")
        p = replayed(t.service, participant_id, number)
        if p.version != number:
            raise NotRecordedThen(participant_id,
                                  f"Participant {participant_id} has no version {version}.")
        return p, {"version": p.version, "moment": p.modified_on}
    if as_of is not None:
        p = audit.participant_as_of(t.service, participant_id, as_of)
        if p is None:
            raise NotRecordedThen(participant_id, f"Participant {participant_id} has no "
                                  "event recorded at or before", as_of)
        return p, {"version": p.version, "moment": as_of}
    return None


def _query_rows(p: Any) -> list[dict[str, Any]]:
    """A participant's queries as the store replays them (addresses masked, as the read
    models keep them)."""
    return [{**q, "participant_id": p.participant_id, "thread": without_addresses(q["thread"])}
            for q in p.queries.values()]


def _live_queries(participant_id: str, version: int) -> list[dict[str, Any]]:
    """The queries at the state's version, which the page's forms send back: the read
    models may not have reached it yet, and a query closed from a thread they showed
    would accept an answer not shown. A record the store can't replay: the read models'
    rows, as the state falls back to them."""
    t = trialog()
    try:
        p = replayed(t.service, participant_id, version)
    except Exception as error:  # said by the state and the history already
        if is_unavailable(error):
            raise
        return queries.list_queries(t, scope=g.principal.scope,
                                    participant_id=participant_id)
    return _query_rows(p)


def _page_data(participant_id: str) -> dict[str, Any]:
    t, principal = trialog(), g.principal
    contact = principal.sees_contact
    replay = _replayed(participant_id)
    if replay is None:
        after = forms.whole(request.args.get("after", ""), MAX_POSITION)
        if after is not None:  # read your write: the lists include the command just sent
            reached = runtime().wait_for(after, 2.0)
            if reached is not None:  # before the lists below are read
                g.position = reached
        state = queries.participant_state(t, participant_id)
        history = audit.history(t.service, participant_id, cache=runtime().histories,
                                veil=t.veil_digest)
        if contact:
            state["contact"] = timeline.contact_of(history)
        query_rows = _live_queries(participant_id, state["version"])
        asked = None
    else:
        p, asked = replay
        state = queries.shown_state(p, t.protocol, asked["moment"], contact=contact)
        history = audit.history(t.service, participant_id, version=p.version,
                                cache=runtime().histories, veil=t.veil_digest)
        query_rows = _query_rows(p)
    if not contact:
        history = [audit.redact_contact(e) for e in history]
    else:
        _disclose(participant_id)
    asked_page = forms.whole(request.args.get("page", "1"), 10**9)
    page = min(asked_page, timeline.pages(history)) if asked_page else 1
    return {"state": state, "events": timeline.page_of(history, page), "queries": query_rows,
            "captures": timeline.capture_events(history), "replay": asked,
            "total": len(history), "page": page, "pages": timeline.pages(history),
            "visit_codes": t.protocol.visit_codes}


def _render(participant_id: str, status: int = 200, failed: dict[str, Any] | None = None
            ) -> Any:
    try:
        data = _page_data(participant_id)
    except DomainError:
        abort(404, f"Participant {participant_id} was not found.")
    response = make_response(render_template(
        "console/participant.html", pid=participant_id, failed=failed or {},
        new_id=lambda: str(uuid.uuid4()), may=g.principal.may_issue, **data), status)
    return response


@blp.route("/participants/<participant_id>")
def participant(participant_id: str) -> Any:
    """The participant's page, now or as recorded at an earlier event."""
    require_read("history")
    _visible(participant_id)
    return _render(participant_id)


@blp.route("/participants/<participant_id>/sign")
def sign(participant_id: str, status: int = 200,
         failed: dict[str, Any] | None = None) -> Any:
    """The signing dialog: what is signed, its meaning, and the password again."""
    _visible(participant_id)
    visit = request.values.get("visit") or None
    kind = "SignVisit" if visit else "SignCasebook"
    if not g.principal.may_issue(kind):
        abort(403, f"Your role ({g.principal.role}) may not sign.")
    if visit is not None and visit not in trialog().protocol.visit_codes:
        abort(404, f"There is no visit {visit!r}.")
    state = queries.participant_state(trialog(), participant_id)
    shown = next((v for v in state["visits"] if v["code"] == visit), None)
    if visit is not None and shown is None:  # (the page would offer the casebook instead)
        abort(404, f"Participant {participant_id} has no visit {visit} scheduled.")
    # What is signed, replayed at the state's version: the version the form sends, so a
    # record changed after what the dialog shows is refused, never signed unseen.
    try:
        p = replayed(trialog().service, participant_id, state["version"])
    except Exception as error:
        if is_unavailable(error) or isinstance(error, UnreadableRecord):
            raise  # the console's pages for either
        abort(409, f"The record of {participant_id} can't be replayed now, so what a "
                   "signature covers can't be shown: it can't be signed (audit verify and "
                   "the read models' set-aside list say why).")
    signed = _visit_data(p, visit) if visit is not None else None
    return make_response(render_template(
        "console/sign.html", pid=participant_id, kind=kind, visit=shown, state=state,
        version=p.version, signed=signed,
        scores=p.scores().get(visit or "", {}),
        meaning=MEANINGS["visit" if visit else "casebook"],
        command_id=request.form.get("command_id") or str(uuid.uuid4()),
        failed=failed or {}), status)


def _visit_data(p: Any, code: str) -> dict[str, Any] | None:
    """A visit's data as a signature covers it: its form's fields and its blood samples'
    (each as corrected), as the timeline writes them."""
    form = p.completed_visits().get(code)
    if form is None:
        return None
    samples = [timeline.flatten(data) for _, data in p.records_of("BloodSampleCollected")
               if data["timepoint"] == code]
    return {"form": timeline.flatten({k: v for k, v in form.items()
                                      if k not in ("event_id", "visit")}),
            "samples": samples}


@blp.route("/participants/<participant_id>/commands", methods=["GET"])
def commands_page(participant_id: str) -> Any:
    """The address a refused form leaves in the bar, asked again: the participant's page."""
    return redirect(url_for("console.participant", participant_id=participant_id), code=303)


@blp.route("/participants/<participant_id>/commands", methods=["POST"])
def command(participant_id: str) -> Any:
    """One form, one command: run as POST /v1/commands runs it. A participant of another
    site is not found before anything else (a refused command shows its page again)."""
    from infrastructure.api.commands import execute

    _visible(participant_id)
    try:
        body = forms.command_body(participant_id, request.form)
    except forms.UnknownForm:
        abort(422, "The form names no command of the console.")
    kind = body["type"]
    try:
        _, answer = execute(body)
    except ApiError as e:
        errors = forms.field_errors(kind, e.body)
        forms.add_hints(request.form, errors)
        failed = {"form": request.form.get("form", ""), "status": e.status,
                  "message": forms.message(e.status, e.body, g.principal.role),
                  "errors": errors,
                  "labels": {name: forms.label(kind, name) for name in errors},
                  "values": {k: v for k, v in request.form.items()
                             if k not in ("password", "csrf_token")}}
        if e.status == 404:
            abort(404, f"Participant {participant_id} was not found.")
        if kind in forms.SIGNING:
            return sign(participant_id, e.status, failed)
        return _render(participant_id, e.status, failed)
    flash(forms.DONE[kind])
    anchor = request.form.get("anchor", "")
    target = url_for("console.participant", participant_id=participant_id,
                     after=answer.get("position"))
    return redirect(target + (f"#{anchor}" if anchor.isidentifier() else ""), code=303)
