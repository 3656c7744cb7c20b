"""The work lists offer the steps their commands take: a casebook is listed to sign only
when SignCasebook would take it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from domain import commands as c
from domain.access import EVERY_SITE
from domain.errors import InvalidTransition
from infrastructure.readside.projections import TrialProjection
from infrastructure.readside.worklists import casebooks_to_sign
from infrastructure.store.tables import participants
from tests.integration.helpers import REGISTERED, enrol, send

BASELINE = {"visit": "baseline", "completed_on": REGISTERED,
            "bpi_sf": {"worst": 6, "least": 2, "average": 4, "now": 3}}
SIGNATURE = {"meaning": "I approve this casebook", "signer": "dr-okafor",
             "printed_name": "A. Okafor"}


def _withdrawn(t, *, baseline: bool) -> str:
    pid = enrol(t)
    if baseline:
        send(t, c.CompleteVisit(pid, BASELINE))
    send(t, c.WithdrawParticipant(pid, {"withdrawn_on": REGISTERED + timedelta(days=3),
                                        "scope": "study", "reason_code": "moved"}))
    return pid


def test_a_withdrawn_casebook_is_listed_to_sign_only_when_every_visit_is_done_or_cancelled(
        isolated):
    done, overdue = _withdrawn(isolated, baseline=True), _withdrawn(isolated, baseline=False)
    TrialProjection(isolated).catch_up()

    listed = {row["participant_id"] for row in casebooks_to_sign(isolated, EVERY_SITE)}
    # The baseline's window (registration day) closed before the day it left: it is still
    # to be completed or marked missed, and signing refuses the casebook till then.
    assert listed == {done}
    with isolated.engine.begin() as connection:  # as rows written before the day was kept
        connection.execute(update(participants).values(left_on=None))
    assert {row["participant_id"] for row in casebooks_to_sign(isolated, EVERY_SITE)} == {
        done}
    with pytest.raises(InvalidTransition, match="visits not completed or missed: baseline"):
        send(isolated, c.SignCasebook(overdue, SIGNATURE), actor="dr-okafor")
    send(isolated, c.SignCasebook(done, SIGNATURE), actor="dr-okafor")

    send(isolated, c.RecordVisitMissed(overdue, {"visit": "baseline"}))
    TrialProjection(isolated).catch_up()
    assert [row["participant_id"] for row in casebooks_to_sign(isolated, EVERY_SITE)] == [
        overdue]
