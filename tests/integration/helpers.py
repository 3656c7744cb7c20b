from __future__ import annotations

import uuid
from datetime import date, timedelta
from typing import Any

from domain import commands as c
from infrastructure.store.bootstrap import Trialog
from tests.factories import consent, new_participant_id, screening

REGISTERED = date(2026, 3, 4)


def send(t: Trialog, command: c.Command, **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("command_id", str(uuid.uuid4()))
    kwargs.setdefault("actor", "test-service")
    return t.bus.dispatch(command, **kwargs).body


def enrol(t: Trialog, site: str = "CASE") -> str:
    """A new randomized participant; returns its id."""
    pid = new_participant_id(site)
    send(t, c.ScreenParticipant(pid, screening(site)))
    send(t, c.RecordConsent(pid, consent()))
    send(t, c.RandomizeParticipant(pid, {"registered_on": REGISTERED}))
    return pid


def dose(day: int) -> dict[str, Any]:
    return {"taken_on": REGISTERED + timedelta(days=day), "taken": True, "dose_mcg": 1000}
