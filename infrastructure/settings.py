"""Settings, read from the environment (TRIALOG_*) once, at start."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from eventsourcing.cryptography import AESCipher

DEFAULT_PROTOCOL = Path(__file__).resolve().parents[1] / "protocols" / "nct04205786.toml"
DEFAULT_DATABASE_FILE = "trialog.db"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Settings:
    database_url: str
    redis_url: str
    smtp_url: str
    cipher_key: str
    protocol_path: Path
    allocation_seed: bytes
    mail_from: str = "Trialog <no-reply@trialog.localhost>"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def database_name(self) -> str:
        return "sqlite" if self.is_sqlite else "postgresql"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        url = normalise_database_url(
            env.get("TRIALOG_DATABASE_URL") or f"sqlite:///{Path.cwd() / DEFAULT_DATABASE_FILE}"
        )
        key = env.get("TRIALOG_CIPHER_KEY") or _embedded_key(url)
        _check_key(key)
        seed_text = env.get("TRIALOG_ALLOCATION_SEED")
        seed = seed_text.encode() if seed_text else _derived_seed(key)
        return cls(
            database_url=url,
            redis_url=redis_url(env),
            smtp_url=env.get("TRIALOG_SMTP_URL") or "smtp://127.0.0.1:1025",
            cipher_key=key,
            protocol_path=Path(env.get("TRIALOG_PROTOCOL") or DEFAULT_PROTOCOL),
            allocation_seed=seed,
            mail_from=env.get("TRIALOG_MAIL_FROM") or cls.mail_from,
        )


def redis_url(env: Mapping[str, str] | None = None) -> str:
    """The broker's URL alone: reading it writes nothing (unlike a full ``from_env`` on the
    SQLite default, which creates the key file)."""
    env = os.environ if env is None else env
    return env.get("TRIALOG_REDIS_URL") or DEFAULT_REDIS_URL


def normalise_database_url(url: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    if not url.startswith(("sqlite:///", "postgresql+psycopg://")):
        raise SettingsError(
            "TRIALOG_DATABASE_URL: must be sqlite:///PATH or postgresql+psycopg://..."
        )
    return url


def _embedded_key(url: str) -> str:
    """The embedded default keeps its key in a file beside the database (mode 0600);
    PostgreSQL deployments must pass TRIALOG_CIPHER_KEY."""
    if not url.startswith("sqlite:///") or ":memory:" in url:
        raise SettingsError("TRIALOG_CIPHER_KEY: required (base64 of 16, 24 or 32 bytes)")
    key_file = Path(url.removeprefix("sqlite:///") + ".key")
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(AESCipher.create_key(32))
    return key_file.read_text().strip()


def _check_key(key: str) -> None:
    try:
        size = len(base64.b64decode(key, validate=True))
    except ValueError:
        raise SettingsError("TRIALOG_CIPHER_KEY: not valid base64") from None
    if size not in AESCipher.KEY_SIZES:
        raise SettingsError("TRIALOG_CIPHER_KEY: must decode to 16, 24 or 32 bytes")


def _derived_seed(key: str) -> bytes:
    return hmac.new(base64.b64decode(key), b"trialog allocation seed", hashlib.sha256).digest()
