"""Who may no longer call, as the access register in the event store says (see
``domain.revocations``): a token's or a person's row put back as it was before its
revocation or disable, seal and all, is still refused. A caller's look-up reads the
register's newest version in the same statement (one probe of the events table's key);
the names the register refuses are kept per version, read again when it moves on. A
register found at a lower version than a process saw (its last events deleted) refuses
everyone in that process; one cut back while no process ran, its commands' records
deleted with it, is seen neither here nor by audit verify: the feed's and webhooks'
consumers hold its events.

Granting access (``grant``), revoking a token or disabling a person (``revoke``)
records the event and writes the row in one transaction. Grants made before the register
recorded them, and revocations made before it existed, are recorded in it when the
database is upgraded (``record_earlier``)."""

from __future__ import annotations

import json
import logging
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from domain.errors import InvalidTransition
from domain.revocations import register_uuid
from infrastructure.store.access_seals import seals_for
from infrastructure.store.outages import is_unavailable
from infrastructure.store.stored import events_table
from infrastructure.store.tables import as_utc, tokens, users

if TYPE_CHECKING:
    from infrastructure.store.bootstrap import Trialog

log = logging.getLogger("trialog.access")
# The actor of the revocations an upgrade records (see ``record_earlier``).
UPGRADE_ACTOR = "trialog db upgrade"


class Revocations:
    def __init__(self, trialog: Trialog) -> None:
        # Weakly: the registry's key is the trialog's engine, which it must not keep alive.
        self._trialog = weakref.ref(trialog)
        table = events_table(trialog.service.recorder)
        # The register's newest version (NULL: nothing recorded yet), as a column of a
        # caller's look-up.
        self.version_column = (
            select(func.max(table.c.originator_version))
            .where(table.c.originator_id == register_uuid(trialog.protocol.study_id))
            .scalar_subquery().label("register_version"))
        # At a version: the names refused, and how many times each person's password
        # was changed.
        self._known: tuple[int | None, frozenset[str], dict[str, int]] = (None, frozenset(), {})
        self._highest = 0  # the newest version this process has seen the register at

    @property
    def trialog(self) -> Trialog:
        trialog = self._trialog()
        if trialog is None:
            raise RuntimeError("the application this access register belongs to is gone")
        return trialog

    def refuses(self, name: str, version: int | None, password_set: int | None = None) -> bool:
        """Whether the register at ``version`` refuses ``name`` (whose row, then, was put
        back: that is logged), or, given a person's row's ``password_set``, a row from
        before a change of their password (put back, with the older password). It
        refuses everyone when it can't be read (who is revoked is not known), and when it
        is found at a version below one this process has seen (its last events deleted,
        which a row put back would otherwise get past). The database unavailable is
        raised, as for any look-up."""
        if (version or 0) < self._highest:
            # Read before a revocation that another thread has seen committed, or the
            # register cut back: its version now tells which.
            with self.trialog.engine.connect() as connection:
                version = connection.execute(select(self.version_column)).scalar()
            if (version or 0) < self._highest:
                log.error("the access register went back from version %s to %s: its last "
                          "events were deleted; every caller is refused", self._highest,
                          version)
                return True
        if version is None:
            return False
        known = self._known
        if known[0] != version:
            try:
                register = self.trialog.service.access_register(version)
            except Exception as error:  # fail closed, and say why
                if is_unavailable(error):
                    raise
                log.exception("the access register can't be read: every caller is refused")
                return True
            known = self._known = (
                version, frozenset(register.refused if register else ()),
                register.password_generations if register else {})
            self._highest = max(self._highest, version)
        if name in known[1]:
            log.warning("a revoked token's or a disabled person's row was put back: refused",
                        extra={"holder": name})
            return True
        if password_set is not None and password_set < known[2].get(name, 0):
            log.warning("a person's row from before a change of their password was put "
                        "back: refused", extra={"holder": name})
            return True
        return False

    def password_changes(self, login: str) -> int:
        """How many times the register has recorded a change of ``login``'s password (read
        now, not from what this process keeps)."""
        register = self.trialog.service.access_register()
        return register.password_generations.get(login, 0) if register is not None else 0

    def change_password(self, login: str, generation: int, actor: str,
                        keep: Callable[[Any], None]) -> None:
        """Records the ``generation``-th change of ``login``'s password; ``keep`` writes
        the row's new hash in the same transaction."""
        self.trialog.bus.dispatch_password_change(login, generation,
                                                  command_id=str(uuid.uuid4()), actor=actor,
                                                  keep=keep)

    def grant(self, name: str, role: str, sites: list[str] | None, granted_at: datetime,
              actor: str, keep: Callable[[Any], None], full_name: str | None = None,
              reason: str | None = None) -> None:
        """Records access granted at ``granted_at`` to a machine token, or a person
        (``full_name`` given); ``keep`` writes the access table's row in the same
        transaction."""
        self.trialog.bus.dispatch_grant(name, role, sites, granted_at,
                                        command_id=str(uuid.uuid4()), actor=actor,
                                        keep=keep, full_name=full_name, reason=reason)

    def revoke(self, type_name: str, name: str, actor: str, keep: Callable[[Any], None],
               reason: str | None = None) -> None:
        """Records RevokeToken or DisablePerson of ``name``; ``keep`` writes the access
        table's copy in the same transaction."""
        self.trialog.bus.dispatch_revocation(type_name, name, command_id=str(uuid.uuid4()),
                                             actor=actor, keep=keep, reason=reason)


@dataclass(frozen=True)
class Earlier:
    """What an upgrade recorded in the register of what was done before it recorded it."""

    grants: int = 0
    revocations: int = 0


def record_earlier(trialog: Trialog) -> Earlier:
    """Records in the register the access granted before it recorded grants (each token
    and person whose row holds its seal, in the order made), then the tokens revoked and
    the people disabled before it existed (their rows say so); how many of each. Run
    after each upgrade: once they are recorded, it records nothing. A register that
    can't be read is left as it is (audit verify reports it; meanwhile it refuses every
    caller)."""
    seals = seals_for(trialog.engine)
    with trialog.engine.connect() as connection:
        made = sorted(
            [*((as_utc(row.created_at), row.name, row.role, row.sites, None, row.revoked_at)
               for row in connection.execute(select(tokens)) if seals.token_holds(row)),
             *((as_utc(row.created_at), row.login, row.role, row.sites, row.full_name,
                row.disabled_at)
               for row in connection.execute(select(users, users.c.seal.label("user_seal")))
               if seals.user_holds(row))],
            key=lambda holder: (holder[0], holder[1]))
    if not made:
        return Earlier()
    try:
        register = trialog.service.access_register()
    except Exception:  # said, and left to audit verify
        log.exception("the access register can't be read: earlier grants and revocations "
                      "are not recorded in it")
        return Earlier()
    granted = set(register.names_granted) if register is not None else set()
    refused = set(register.refused) if register is not None else set()
    revocations = revocations_for(trialog.engine)
    grants = recorded = 0
    for created_at, name, role, sites, full_name, _ in made:
        if name in granted:
            continue
        try:
            revocations.grant(
                name, role, None if sites is None else json.loads(sites), created_at,
                UPGRADE_ACTOR, lambda _: None, full_name=full_name,
                reason="recorded on upgrade: granted before the register recorded grants")
        except InvalidTransition:  # another process starting recorded it meanwhile
            continue
        grants += 1
    for _, name, _, _, full_name, ended_at in made:
        if ended_at is None or name in refused:
            continue
        try:
            revocations.revoke("RevokeToken" if full_name is None else "DisablePerson",
                               name, UPGRADE_ACTOR, lambda _: None,
                               reason=f"recorded on upgrade: done at "
                                      f"{as_utc(ended_at).isoformat()}, before the register")
        except InvalidTransition:
            continue
        recorded += 1
    return Earlier(grants, recorded)


_REGISTERED: weakref.WeakKeyDictionary[Any, Revocations] = weakref.WeakKeyDictionary()


def register(trialog: Trialog) -> Revocations:
    revocations = _REGISTERED[trialog.engine] = Revocations(trialog)
    return revocations


def revocations_for(engine: Any) -> Revocations:
    """The access register of the deployment this engine's database belongs to."""
    try:
        return _REGISTERED[engine]
    except KeyError:
        raise RuntimeError("no access register is known for this engine: build it with "
                           "bootstrap") from None
