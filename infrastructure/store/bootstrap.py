"""The one place where real adapters are chosen: builds the application from settings."""

from __future__ import annotations

import functools
import hashlib
import hmac
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from uuid import UUID

from sqlalchemy.engine import Engine

from domain.errors import ProtocolError
from domain.protocol import Protocol, protocol_from_mapping
from domain.schedule import ended_everywhere
from domain.service import TrialService
from infrastructure.store import access_seals, migrations, revocations
from infrastructure.store.bus import CommandBus, utc_now
from infrastructure.store.corrections import CorrectionRules
from infrastructure.store.settings import Settings


def load_protocol(path: Path) -> Protocol:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ProtocolError(f"{path}: can't read the protocol file ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ProtocolError(f"{path}: not valid TOML ({e})") from None
    try:
        return protocol_from_mapping(data)
    except ProtocolError as e:
        raise ProtocolError(f"{path}: {e}") from None


def event_store_env(settings: Settings) -> dict[str, str]:
    env = {
        "PERSISTENCE_MODULE": "infrastructure.store.recording:Factory",
        "SQLALCHEMY_URL": settings.database_url,
        "CIPHER_TOPIC": "eventsourcing.cryptography:AESCipher",
        "CIPHER_KEY": settings.cipher_key,
        "CREATE_TABLE": "y",
    }
    # The library reads each setting under the application's name first, from the
    # process's environment too: TRIALOG_CIPHER_KEY, this service's own setting, won over
    # the key the settings chose (the demo's, beside its file). Given under both names,
    # the settings' own win.
    prefix = TrialService.name.upper()
    return {**env, **{f"{prefix}_{key}": value for key, value in env.items()}}


@dataclass
class Trialog:
    settings: Settings
    protocol: Protocol
    service: TrialService
    bus: CommandBus

    def ended_everywhere(self) -> date:
        """The earliest date anywhere: the day the clock's rules judge by (see
        ``domain.schedule.ended_everywhere``)."""
        return ended_everywhere(self.bus.clock())

    @property
    def engine(self) -> Engine:
        engine: Engine = self.service.recorder.datastore.engine  # type: ignore[attr-defined]
        return engine

    def derived_command_id(self, *parts: str) -> str:
        """The command id of a command the server issues (a flag, a missed visit, a sent
        reminder): the same each time it retries, and keyed by a secret, so that no
        client can compute one and learn from a reuse whether a participant exists."""
        message = ("trialog:command:" + ":".join(parts)).encode()
        digest = hmac.new(self.settings.cipher_key.encode(), message, hashlib.sha256)
        return str(UUID(bytes=digest.digest()[:16], version=4))

    def veil_digest(self, digest: str) -> str:
        """A chain digest as trialog shows it outside the store: keyed (HMAC-SHA256 under a
        key of its own derived from the cipher key, which every process must share anyway:
        with another, it could not read the store). A plain digest covers the contact
        details of the event and, through the chain, of those before it: a reader without
        contact rights could confirm a guess of them. Keyed, the digests still chain (each
        event names its predecessor's) but only the server can recompute them (verify).
        The chain's start (no predecessor: empty) stays empty."""
        if not digest:
            return digest
        return hmac.new(self._veil_key, digest.encode(), hashlib.sha256).hexdigest()

    def _derived_key(self, purpose: bytes) -> bytes:
        """A key of its own for one use, derived from the cipher key."""
        return hmac.new(self.settings.cipher_key.encode(), purpose, hashlib.sha256).digest()

    @functools.cached_property
    def _veil_key(self) -> bytes:
        return self._derived_key(b"trialog:digest")

    @functools.cached_property
    def access_seal_key(self) -> bytes:
        """The key of the access tables' seals (see ``access_seals``)."""
        return self._derived_key(b"trialog:access-seal")

    @functools.cached_property
    def feed_seal_key(self) -> bytes:
        """The key of rm_feed's seals (see ``infrastructure.audit.feed.FeedSeals``)."""
        return self._derived_key(b"trialog:feed-seal")

    def close(self) -> None:
        self.service.close()


def bootstrap(settings: Settings, *, migrate: bool | None = None,
              clock: Callable[[], datetime] = utc_now) -> Trialog:
    """Builds the application. ``migrate`` runs the migrations first (default: on SQLite,
    where the embedded default must work with no separate step)."""
    protocol = load_protocol(settings.protocol_path)
    service = TrialService(protocol, settings.allocation_seed, env=event_store_env(settings),
                           correction_rule=CorrectionRules(protocol))
    trialog = Trialog(settings, protocol, service, CommandBus(service, clock))
    access_seals.register(trialog.engine, trialog.access_seal_key)
    revocations.register(trialog)
    if migrate if migrate is not None else settings.is_sqlite:
        migrations.upgrade(trialog.engine)
        revocations.record_earlier(trialog)
        if settings.is_sqlite:
            # WAL now, before this process's threads begin transactions: the library
            # switches on its first one, and a thread beginning meanwhile found the
            # database locked by the switch.
            service.recorder.datastore.init_sqlite_wal_mode()
    return trialog
