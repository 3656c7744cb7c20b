"""The access register: each name refused once and for good, its events chained."""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import pairwise

import pytest

from domain.chain import compute_digest
from domain.commands import Audit
from domain.errors import InvalidTransition
from domain.revocations import AccessRegister, register_uuid


def audit(n: int) -> Audit:
    return Audit(command_id=f"c-{n}", actor="admin", recorded_at=datetime.now(UTC))


def test_a_revoked_token_and_a_disabled_person_are_refused_in_order():
    register = AccessRegister.open("NCT04205786", audit(1))
    register.revoke("RevokeToken", "lab-1", audit(2))
    register.revoke("DisablePerson", "ada", audit(3))
    assert register.id == register_uuid("NCT04205786")
    assert register.refused == ["lab-1", "ada"]
    events = register.collect_events()
    assert [type(e).__name__ for e in events] == ["RegisterOpened", "TokenRevoked",
                                                   "PersonDisabled"]
    assert (events[1].name, events[2].login) == ("lab-1", "ada")
    for before, after in pairwise(events):
        assert after.previous_digest == before.digest == compute_digest(before)


def test_a_name_is_refused_once():
    register = AccessRegister.open("NCT04205786", audit(1))
    register.revoke("RevokeToken", "lab-1", audit(2))
    for type_name in ("RevokeToken", "DisablePerson"):
        with pytest.raises(InvalidTransition, match="'lab-1' is refused already"):
            register.revoke(type_name, "lab-1", audit(3))
    assert register.version == 2


def test_each_grant_is_recorded_in_order_and_a_name_is_granted_once():
    register = AccessRegister.open("NCT04205786", audit(1))
    register.grant("lab-1", "service", ["CASE"], audit(2))
    register.grant("ada", "investigator", None, audit(3), full_name="Ada Example")
    register.revoke("RevokeToken", "lab-1", audit(4))
    assert register.names_granted == ["lab-1", "ada"]
    for full_name in (None, "Lab One"):
        with pytest.raises(InvalidTransition, match="'lab-1' was granted access already"):
            register.grant("lab-1", "service", ["CASE"], audit(5), full_name=full_name)
    assert register.version == 4
    events = register.collect_events()
    assert [type(e).__name__ for e in events] == ["RegisterOpened", "TokenGranted",
                                                   "PersonGranted", "TokenRevoked"]
    assert (events[1].name, events[1].role, events[1].sites) == ("lab-1", "service", ["CASE"])
    assert (events[2].login, events[2].full_name, events[2].role, events[2].sites) == (
        "ada", "Ada Example", "investigator", None)
    for before, after in pairwise(events):
        assert after.previous_digest == before.digest == compute_digest(before)


def test_each_change_of_a_password_is_counted_in_order():
    register = AccessRegister.open("NCT04205786", audit(1))
    register.password_changed("ada", 1, audit(2))
    register.password_changed("bob", 1, audit(3))
    register.password_changed("ada", 2, audit(4))
    assert register.password_generations == {"ada": 2, "bob": 1}
    assert register.refused == []
    events = register.collect_events()
    assert [(type(e).__name__, getattr(e, "generation", None)) for e in events[1:]] == [
        ("PasswordChanged", 1), ("PasswordChanged", 1), ("PasswordChanged", 2)]
    for before, after in pairwise(events):
        assert after.previous_digest == before.digest == compute_digest(before)


def test_a_change_out_of_its_turn_or_of_a_refused_person_is_refused():
    register = AccessRegister.open("NCT04205786", audit(1))
    register.password_changed("ada", 1, audit(2))
    for generation in (1, 3):  # a row behind the register, or ahead of it
        with pytest.raises(InvalidTransition, match="changed 1 times: this change is "
                                                    f"number 2, not {generation}"):
            register.password_changed("ada", generation, audit(3))
    register.revoke("DisablePerson", "ada", audit(4))
    with pytest.raises(InvalidTransition, match="'ada' is refused"):
        register.password_changed("ada", 2, audit(5))
    assert register.version == 3


def test_the_holders_are_who_was_granted_and_refused_as_recorded_at_a_moment():
    from datetime import timedelta

    from domain.revocations import holders

    start = datetime(2026, 3, 1, tzinfo=UTC)

    def at(n: int, actor: str = "admin", reason: str | None = None) -> Audit:
        return Audit(command_id=f"c-{n}", actor=actor, reason=reason,
                     recorded_at=start + timedelta(days=n))

    register = AccessRegister.open("NCT04205786", at(0))
    register.revoke("DisablePerson", "old", at(1, "trialog user disable"))  # never granted
    register.grant("lab-1", "service", ["CASE"], at(2, "trialog token create"))
    register.grant("ada", "investigator", None, at(3, "trialog user create", "new PI"),
                   full_name="Ada Example")
    register.password_changed("ada", 1, at(4, "ada"))
    register.revoke("RevokeToken", "lab-1", at(5, "trialog token revoke", "lost"))
    # made on day 0, before the register recorded grants, and recorded on day 6
    register.grant("zed", "monitor", ["METRO"], at(6, "trialog db upgrade"),
                   granted_at=start)
    events = register.collect_events()
    day = timedelta(days=1)
    lab = {"name": "lab-1", "kind": "token", "full_name": None, "role": "service",
           "sites": ["CASE"], "granted_at": start + 2 * day,
           "granted_by": "trialog token create", "grant_reason": None, "ended_at": None,
           "ended_by": None, "end_reason": None, "password_changes": 0}
    ada = {"name": "ada", "kind": "person", "full_name": "Ada Example",
           "role": "investigator", "sites": None, "granted_at": start + 3 * day,
           "granted_by": "trialog user create", "grant_reason": "new PI", "ended_at": None,
           "ended_by": None, "end_reason": None, "password_changes": 0}
    zed = {"name": "zed", "kind": "token", "full_name": None, "role": "monitor",
           "sites": ["METRO"], "granted_at": start, "granted_by": "trialog db upgrade",
           "grant_reason": None, "ended_at": None, "ended_by": None, "end_reason": None,
           "password_changes": 0}
    old = {"name": "old", "kind": "person", "full_name": None, "role": None, "sites": None,
           "granted_at": None, "granted_by": None, "grant_reason": None,
           "ended_at": start + day, "ended_by": "trialog user disable", "end_reason": None,
           "password_changes": 0}
    assert holders(events) == [
        zed, {**lab, "ended_at": start + 5 * day, "ended_by": "trialog token revoke",
              "end_reason": "lost"},
        {**ada, "password_changes": 1}, old]
    assert holders(events, as_of=start + 3 * day + timedelta(hours=12)) == [zed, lab, ada,
                                                                             old]
    assert holders(events, as_of=start + 2 * day) == [zed, lab, old]
    assert holders(events, as_of=start + timedelta(hours=1)) == [zed]
    assert holders(events, as_of=start - timedelta(seconds=1)) == []
