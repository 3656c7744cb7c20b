"""Seals on the rows that say who may call: machine tokens, people, their sign-in sessions
and console sessions; on the bus's record of each command (the idempotency key, the
body's fingerprint and the first answer, which a retry gets back); and on a finished
deep check's report. Keyed BLAKE2b MACs under a key derived from the cipher key bind each
row's fields that grant access (a token's name, role, hash, sites and whether it is
revoked; a person's login, name, role, sites, password hash and whether they are
disabled; a session's token hash, person and expiry; a console session's cookie, the
session it stands on and the person). Someone with write access to the database but not
the key could otherwise add a token of any role, give a person another's password hash,
or tie their own cookie to another's session: a row whose seal fails is no one's. A
command's record whose seal fails is answered to no retry, a check's report that fails
is not shown.

The key is the deployment's (every process derives it from ``TRIALOG_CIPHER_KEY``); the
functions that write or read these rows are given an engine, so each engine's seals are
registered as it is built (``register``)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import weakref
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from eventsourcing.cryptography import AESCipher
from eventsourcing.utils import Environment

from infrastructure.store.macs import KeyedMacs, same_seal
from infrastructure.store.tables import as_utc


class AccessSeals:
    def __init__(self, key: bytes) -> None:
        self._macs = KeyedMacs(key, b"trialog:", (b"token", b"user", b"session", b"console",
                                                   b"command", b"verify", b"pepper",
                                                   b"access"))
        wrapping = hashlib.blake2b(key=key, digest_size=32, person=b"trialog:wrap").digest()
        self._wrapping = AESCipher(Environment(env={
            AESCipher.CIPHER_KEY: base64.b64encode(wrapping).decode()}))

    def _mac(self, kind: bytes, *fields: Any) -> bytes:
        return self._macs.mac(kind, "\0".join(_text(f) for f in fields).encode())

    def token(self, name: str, role: str, token_hash: str, sites: str | None,
              revoked: bool) -> bytes:
        return self._mac(b"token", name, role, token_hash, sites, revoked)

    def user(self, login: str, full_name: str, role: str, sites: str | None,
             password_hash: str, disabled: bool, password_set: int = 0) -> bytes:
        """``password_set``: how many times the password was changed; covered once it was
        (a row sealed before it existed holds as it was sealed)."""
        return self._mac(b"user", login, full_name, role, sites, password_hash, disabled,
                         *_changes(password_set))

    def session(self, token_hash: str, login: str, expires_at: datetime,
                password_set: int = 0) -> bytes:
        return self._mac(b"session", token_hash, login, expires_at, *_changes(password_set))

    def console(self, cookie_hash: str, session_hash: str, login: str,
                last_seen_at: datetime) -> bytes:
        return self._mac(b"console", cookie_hash, session_hash, login, last_seen_at)

    def command(self, command_id: str, fingerprint: str, participant_id: str, response: str,
                recorded_at: datetime) -> bytes:
        return self._mac(b"command", command_id, fingerprint, participant_id, response,
                         recorded_at)

    def verify_job(self, job_id: str, status: str, started_by: str, started_at: datetime,
                   finished_at: datetime | None, events_checked: int,
                   report: str | None) -> bytes:
        return self._mac(b"verify", job_id, status, started_by, started_at, finished_at,
                         events_checked, report)

    def disclosure(self, at: datetime, actor: str, participant_id: str, endpoint: str,
                   request_id: str | None) -> bytes:
        """A row of the access log (audit/access.py): who was shown whose contact details,
        when, by which endpoint."""
        return self._mac(b"access", at, actor, participant_id, endpoint, request_id)

    def pepper(self, password: str) -> str:
        """What a password's Argon2 hash is made of (people.py): a keyed MAC of it, so
        that a hash read from the database can't be cracked without the key too."""
        return self._macs.mac(b"pepper", password.encode()).hex()

    def wrap(self, login: str, password_hash: str) -> str:
        """A password hash made before the pepper, encrypted under a key of its own derived
        from the cipher key (people.py, migration 0027), so that it can't be cracked
        without the key either; it names its person inside."""
        text = f"{login}\0{password_hash}".encode()
        return base64.urlsafe_b64encode(self._wrapping.encrypt(text)).decode()

    def unwrap(self, login: str, wrapped: str) -> str | None:
        """The hash ``wrap`` encrypted for this person; None for any other text."""
        try:
            text = self._wrapping.decrypt(base64.urlsafe_b64decode(wrapped)).decode()
        except (ValueError, binascii.Error, InvalidTag):  # UnicodeDecodeError is a ValueError
            return None
        named, _, password_hash = text.partition("\0")
        return password_hash if named == login else None

    # The rows as read: each with the columns its seal covers, and ``seal``.
    def token_holds(self, row: Any) -> bool:
        return same_seal(row.seal, self.token(row.name, row.role, row.token_hash, row.sites,
                                          row.revoked_at is not None))

    def command_holds(self, row: Any) -> bool:
        return same_seal(row.seal, self.command(row.command_id, row.fingerprint,
                                                row.participant_id, row.response,
                                                row.recorded_at))

    def disclosure_holds(self, row: Any) -> bool:
        return same_seal(row.seal, self.disclosure(row.at, row.actor, row.participant_id,
                                                   row.endpoint, row.request_id))

    def verify_job_holds(self, row: Any) -> bool:
        return same_seal(row.seal, self.verify_job(
            row.job_id, row.status, row.started_by, row.started_at, row.finished_at,
            row.events_checked, row.report))

    def user_holds(self, row: Any) -> bool:
        return same_seal(row.user_seal, self.user(
            row.login, row.full_name, row.role, row.sites, row.password_hash,
            row.disabled_at is not None, row.password_set))

    def session_and_person_hold(self, row: Any) -> bool:
        """A sign-in session's row and its person's, read together (tokens.SEALED_SESSION)."""
        return same_seal(row.session_seal, self.session(
            row.token_hash, row.login, row.expires_at, row.session_password_set)
        ) and self.user_holds(row)


def _changes(password_set: int) -> tuple[int, ...]:
    """A person's or a session's count of password changes, as its seal covers it: not at
    all while 0, so that rows sealed before the count existed hold as they were sealed."""
    return (password_set,) if password_set else ()


def _text(value: Any) -> str:
    """A field as the seal reads it: no value is not an empty one, a moment is its UTC
    time whichever database kept it (SQLite gives it back without its zone)."""
    if value is None:
        return "\1"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return as_utc(value).astimezone(UTC).isoformat()
    return f"={value}"


_REGISTERED: weakref.WeakKeyDictionary[Any, AccessSeals] = weakref.WeakKeyDictionary()


def register(engine: Any, key: bytes) -> AccessSeals:
    seals = _REGISTERED[engine] = AccessSeals(key)
    return seals


def seals_for(engine: Any) -> AccessSeals:
    """The seals of the deployment this engine's database belongs to."""
    try:
        return _REGISTERED[engine]
    except KeyError:
        raise RuntimeError("no access seals are registered for this engine: build it "
                           "with bootstrap") from None
