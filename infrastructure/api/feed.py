"""GET /v1/feed and /v1/feed/checkpoint: the notification log as CloudEvents, for the
caller's sites and with contact details only for the roles that see them."""

from __future__ import annotations

from typing import Any

import orjson
from flask import Response, g
from flask_smorest import Blueprint
from marshmallow import RAISE, Schema, fields, validate
from sqlalchemy import func, select

from infrastructure.api.errors import forbidden, invalid
from infrastructure.api.schemas import ErrorBody, Parameters
from infrastructure.audit.feed import MAX_LIMIT, Reader
from infrastructure.store.stored import events_table

blp = Blueprint("feed", __name__, url_prefix="/v1/feed",
                description="The event feed: every change, in order, resumable")


class FeedArgs(Parameters):
    after = fields.Integer(load_default=0, validate=validate.Range(min=0, max=2**62),
                           metadata={"description": "the last position received"})
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=MAX_LIMIT),
                           metadata={"description": "positions of the log to cover"})


class CloudEvent(Schema):
    specversion = fields.String(required=True)
    id = fields.String(required=True)
    source = fields.String(required=True)
    type = fields.String(required=True)
    subject = fields.String(required=True)
    # An org.trialog.EventUnreadable (an event the store can't give) has no time and no
    # digests: it holds nothing of the event.
    time = fields.String(metadata={"description": "recorded at (absent in an "
                                                  "org.trialog.EventUnreadable)"})
    datacontenttype = fields.String(required=True)
    data = fields.Dict(required=True)
    position = fields.Integer(required=True)
    digest = fields.String(metadata={
        "description": "the event's chain digest, keyed (HMAC-SHA256 under the server's key);"
                       " absent in an org.trialog.EventUnreadable"})
    previousdigest = fields.String(metadata={
        "description": "the previous event's digest, keyed the same way; empty for the first"
                       ", absent in an org.trialog.EventUnreadable"})


class FeedPage(Schema):
    events = fields.List(fields.Nested(CloudEvent), required=True)
    next = fields.Integer(required=True, metadata={
        "description": "the position to resume from (after=)"})


class Checkpoint(Schema):
    position = fields.Integer(required=True, metadata={"description": "the newest position"})
    events = fields.Integer(required=True, metadata={
        "description": "the events up to it the caller may see"})
    digest = fields.String(required=True, allow_none=True, metadata={
        "description": "the digest of the newest of them"})


def _reader() -> Reader:
    principal = g.principal
    if not principal.may_read("feed"):
        raise forbidden(principal.name, principal.role, "read feed")
    return Reader(principal.scope, contact=principal.sees_contact)


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), mimetype="application/json")


@blp.route("")
@blp.arguments(FeedArgs, location="query", as_kwargs=True, unknown=RAISE)
@blp.response(200, FeedPage)
@blp.alt_response(401, schema=ErrorBody)
@blp.alt_response(403, schema=ErrorBody)
@blp.alt_response(422, schema=ErrorBody)
def get_feed(after: int, limit: int) -> Response:
    """The events after a position, oldest first, as CloudEvents 1.0 JSON."""
    from infrastructure.api import runtime
    from infrastructure.audit import access

    reader = _reader()
    disclosed: set[str] = set()
    # One transaction reads the page and records what it discloses.
    with runtime().trialog.engine.begin() as connection:
        events, next_position = runtime().feed.page_json(after, limit, reader, disclosed,
                                                         connection)
        if not events:
            _require_in_the_log(connection, after)
        if disclosed:  # the page shows these participants' contact details
            access.record(connection, g.principal.name, sorted(disclosed), "GET /v1/feed",
                          g.get("request_id"))
    g.position = next_position
    # The events come as JSON already (rendered ahead by the feed's follower).
    body = b'{"events":[' + b",".join(events) + b'],"next":%d}' % next_position
    return Response(body, mimetype="application/json")


def _require_in_the_log(connection: Any, after: int) -> None:
    """A cursor past the newest position is no cursor an answer gave (a database restored
    from an older backup, a typing slip): answered as such, not as an empty page after
    which the reader would skip every event up to it."""
    from infrastructure.api import runtime

    table = events_table(runtime().trialog.service.recorder)
    newest = connection.execute(select(func.coalesce(func.max(table.c.id), 0))).scalar_one()
    if after > newest:
        why = f"is past the newest position of the log ({newest}); an answer's next never is"
        raise invalid({"after": [why]})


@blp.route("/checkpoint")
@blp.response(200, Checkpoint)
@blp.alt_response(401, schema=ErrorBody)
@blp.alt_response(403, schema=ErrorBody)
def get_checkpoint() -> Response:
    """For reconciliation: the newest position, the count of events up to it the caller
    may see, and the newest one's digest."""
    from infrastructure.api import runtime

    answer = runtime().feed.checkpoint(_reader())
    g.position = answer["position"]
    return _json(answer)


webhooks_blp = Blueprint("webhooks", __name__, url_prefix="/v1/webhooks",
                         description="Webhook subscriptions (made with trialog webhook add)")


class Webhook(Schema):
    webhook_id = fields.String(required=True)
    url = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(("active", "disabled")))
    sites = fields.List(fields.String(), required=True, allow_none=True)
    types = fields.List(fields.String(), required=True, allow_none=True)
    position = fields.Integer(required=True, metadata={
        "description": "the last event delivered or passed over"})
    failed = fields.Integer(required=True, metadata={
        "description": "deliveries kept as failed, not redelivered yet"})
    attempts = fields.Integer(required=True, metadata={
        "description": "failed attempts at the next event so far"})
    last_error = fields.String(required=True, allow_none=True)
    retry_at = fields.String(required=True, allow_none=True)
    created_at = fields.String(required=True)


class WebhookList(Schema):
    webhooks = fields.List(fields.Nested(Webhook), required=True)


@webhooks_blp.route("")
@webhooks_blp.response(200, WebhookList)
@webhooks_blp.alt_response(401, schema=ErrorBody)
@webhooks_blp.alt_response(403, schema=ErrorBody)
def get_webhooks() -> Response:
    """Every subscription with its position and failures (admin)."""
    from infrastructure.api import runtime
    from infrastructure.jobs import webhooks

    principal = g.principal
    if not principal.may_read("webhooks"):
        raise forbidden(principal.name, principal.role, "read webhooks")
    return _json({"webhooks": webhooks.listing(runtime().trialog)})
