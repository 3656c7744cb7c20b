"""GET /v1/reports/consort: the CONSORT flow counts, as recorded at any moment."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from flask import Response, g, jsonify
from flask_smorest import Blueprint
from marshmallow import Schema, fields

from infrastructure.api.reads import _read, _trialog, query
from infrastructure.api.schemas import Parameters
from infrastructure.readside.consort import consort
from infrastructure.store.schemas import a_moment

blp = Blueprint("reports", __name__, url_prefix="/v1/reports",
                description="Reports drawn from the events")


class ConsortArgs(Parameters):
    as_of = fields.AwareDateTime(default_timezone=UTC, validate=a_moment, metadata={
        "description": "the counts as recorded at this moment (no zone: UTC); now if absent"})


def _counts() -> fields.Dict:
    return fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)


class Reasons(Schema):
    total = fields.Integer(required=True)
    reasons = _counts()


class Excluded(Schema):
    total = fields.Integer(required=True)
    not_eligible = fields.Integer(required=True, metadata={
        "description": "screen failures (their latest screening)"})
    failed_criteria = _counts()
    withdrew_before_randomization = fields.Nested(Reasons, required=True)


class ArmFlow(Schema):
    name = fields.String(required=True)
    allocated = fields.Integer(required=True)
    received = fields.Integer(required=True, metadata={
        "description": "an arm given the product: a dose taken; an arm given none: no "
                       "dose taken"})
    not_received = fields.Integer(required=True)
    discontinued = fields.Nested(Reasons, required=True, metadata={
        "description": "withdrawn from treatment after randomization, by reason"})
    left_study = fields.Nested(Reasons, required=True, metadata={
        "description": "withdrawn from the study after randomization (lost to follow-up "
                       "among them), by reason"})
    analysed = fields.Integer(required=True, metadata={
        "description": "the primary endpoint (BPI average pain at the end of treatment) "
                       "recorded"})
    not_analysed = fields.Integer(required=True)


class Unreadable(Schema):
    total = fields.Integer(required=True)
    participants = fields.List(fields.String(), required=True, metadata={
        "description": "their ids; one whose first event can't be read has none to give"})


class Consort(Schema):
    as_of = fields.String(required=True, allow_none=True)
    assessed = fields.Integer(required=True, metadata={
        "description": "participants screened (assessed for eligibility)"})
    excluded = fields.Nested(Excluded, required=True)
    awaiting_randomization = fields.Integer(required=True, metadata={
        "description": "eligible, not randomized yet, not withdrawn"})
    randomized = fields.Integer(required=True)
    arms = fields.Dict(keys=fields.String(), values=fields.Nested(ArmFlow), required=True)
    primary_endpoint_visit = fields.String(required=True)
    unreadable = fields.Nested(Unreadable, required=True, metadata={
        "description": "participants with an event the store can't give (a damaged or "
                       "altered row, which trialog audit verify names): counted as assessed, "
                       "in no other box"})


@query(blp, "/consort", ConsortArgs, Consort)
def get_consort(**args: Any) -> Response:
    """The CONSORT 2025 flow counts of the caller's sites, from the events."""
    from infrastructure.api import runtime

    _read("summary")
    # Counted from the store itself, which holds at least every event up to its newest
    # position now: the position the answer reflects (the read models' may be behind).
    g.position = runtime().projection.head()
    return jsonify(consort(_trialog(), g.principal.scope, args.get("as_of")))
