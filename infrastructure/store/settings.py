"""Settings, read from the environment (TRIALOG_*) once, at start.

Three secrets, none derived from another: the cipher key (the events at rest), the
allocation seed (the concealed allocation sequences) and the pseudonym key (de-identified
exports), so that holding one reveals nothing of what the others protect. With the SQLite
default each is generated once into a file beside the database (mode 0600) and read from
it at every start; with PostgreSQL each must be given."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

from eventsourcing.cryptography import AESCipher
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_PROTOCOL = Path(__file__).resolve().parents[2] / "protocols" / "nct04205786.toml"
DEFAULT_DATABASE_FILE = "trialog.db"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

CIPHER_KEY = "TRIALOG_CIPHER_KEY"
ALLOCATION_SEED = "TRIALOG_ALLOCATION_SEED"
PSEUDONYM_KEY = "TRIALOG_PSEUDONYM_KEY"
# Where the SQLite default keeps each secret the environment does not give: DATABASE + suffix.
SECRET_FILES = {CIPHER_KEY: ".key", ALLOCATION_SEED: ".seed", PSEUDONYM_KEY: ".pseudonym-key"}
# The seed and the pseudonym key are text, used as its UTF-8 bytes, or any bytes written
# as "base64:" and their base64.
BASE64_PREFIX = "base64:"


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
    pseudonym_key: bytes
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
        url = database_url(env)
        texts = _secrets(url, env)
        return cls(
            database_url=url,
            redis_url=redis_url(env),
            smtp_url=smtp_url(env),
            cipher_key=texts[CIPHER_KEY],
            protocol_path=Path(env.get("TRIALOG_PROTOCOL") or DEFAULT_PROTOCOL),
            allocation_seed=_secret_bytes(ALLOCATION_SEED, texts[ALLOCATION_SEED]),
            pseudonym_key=_secret_bytes(PSEUDONYM_KEY, texts[PSEUDONYM_KEY]),
            mail_from=env.get("TRIALOG_MAIL_FROM") or cls.mail_from,
        )


def redis_url(env: Mapping[str, str] | None = None, *, checked: bool = True) -> str:
    """The broker's URL alone: reading it writes nothing (unlike a full ``from_env`` on the
    SQLite default, which creates the secret files). Checked as the broker's transport
    reads it, unless ``checked`` is false (the worker's module, at import: a worker checks
    it as it starts, in one line)."""
    env = os.environ if env is None else env
    url = env.get("TRIALOG_REDIS_URL") or DEFAULT_REDIS_URL
    if checked:
        _check_redis_url(url)
    return url


def _check_redis_url(url: str) -> None:
    """redis:// or rediss:// with a host, a port from 1 to 65535 and a database number;
    redis+socket:// or unix:// with a path. Anything else made a worker
    retry for ever (``localhost:6379``) or stop with a traceback."""
    why = "must be redis://HOST[:PORT][/DB] (or rediss://), or redis+socket:///PATH"
    parts, port = _url_parts("TRIALOG_REDIS_URL", url, why)
    if parts.scheme in ("redis+socket", "unix"):
        if not parts.path.strip("/"):
            raise SettingsError(f"TRIALOG_REDIS_URL: {why}")
        return
    # (Not sentinel://: its transport needs a master's name this app does not pass, and
    # a worker given one stopped with a traceback.)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname \
            or port == 0 or not re.fullmatch(r"(/[0-9]{0,5})?", parts.path):
        raise SettingsError(f"TRIALOG_REDIS_URL: {why}")


def _url_parts(name: str, url: str, why: str) -> tuple[SplitResult, int | None]:
    """A setting's URL split, and its port: refused, naming the setting and ``why``, when
    the port is no number up to 65535 or the URL holds whitespace or control
    characters."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise SettingsError(f"{name}: {why}") from None
    if any(c.isspace() or not c.isprintable() for c in url):
        raise SettingsError(f"{name}: {why}")
    return parts, port


def database_url(env: Mapping[str, str]) -> str:
    return normalise_database_url(
        env.get("TRIALOG_DATABASE_URL") or f"sqlite:///{Path.cwd() / DEFAULT_DATABASE_FILE}"
    )


def normalise_database_url(url: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg://" + url[len(prefix):]
    if not url.startswith(("sqlite:///", "postgresql+psycopg://")):
        raise SettingsError(
            "TRIALOG_DATABASE_URL: must be sqlite:///PATH or postgresql+psycopg://..."
        )
    if url == "sqlite:///":
        raise SettingsError("TRIALOG_DATABASE_URL: sqlite:/// needs the file's path after it")
    try:
        make_url(url)
    except (ValueError, ArgumentError) as e:
        raise SettingsError(f"TRIALOG_DATABASE_URL: not a database URL ({e})") from None
    return url


def smtp_url(env: Mapping[str, str]) -> str:
    """TRIALOG_SMTP_URL, checked as the mailer reads it: smtp://HOST[:PORT], the port from
    1 to 65535 (25 when left out)."""
    url = env.get("TRIALOG_SMTP_URL") or "smtp://127.0.0.1:1025"
    why = "must be smtp://HOST[:PORT], the port from 1 to 65535"
    parts, port = _url_parts("TRIALOG_SMTP_URL", url, why)
    if parts.scheme != "smtp" or not parts.hostname or port == 0:
        raise SettingsError(f"TRIALOG_SMTP_URL: {why}")
    return url


def check_secrets(env: Mapping[str, str] | None = None) -> None:
    """Fails naming every secret that must be given and is not; writes nothing (a process
    can check this as it starts, before it builds the application)."""
    env = os.environ if env is None else env
    url = database_url(env)
    if _database_file(url) is None:
        _require(url, _given(env))


def _secret_bytes(name: str, text: str) -> bytes:
    if not text.startswith(BASE64_PREFIX):
        return text.encode()
    try:
        value = base64.b64decode(text.removeprefix(BASE64_PREFIX), validate=True)
    except ValueError:
        raise SettingsError(f"{name}: not valid base64 after {BASE64_PREFIX!r}") from None
    if not value:
        raise SettingsError(f"{name}: empty")
    return value


def _given(env: Mapping[str, str]) -> dict[str, str]:
    return {name: (env.get(name) or "").strip() for name in SECRET_FILES}


def sqlite_file(env: Mapping[str, str]) -> Path | None:
    """The SQLite file the settings name (none for PostgreSQL or a memory database),
    read without making the secrets kept beside it."""
    return _database_file(database_url(env))


def _database_file(url: str) -> Path | None:
    """The SQLite file beside which the secrets are kept; None when there is none."""
    if not url.startswith("sqlite:///") or ":memory:" in url:
        return None
    return Path(url.removeprefix("sqlite:///"))


def _secrets(url: str, env: Mapping[str, str]) -> dict[str, str]:
    given = _given(env)
    database = _database_file(url)
    texts = _require(url, given) if database is None else _from_files(database, given)
    _check_key(texts[CIPHER_KEY])
    _check_apart(texts)
    return texts


def _require(url: str, given: dict[str, str]) -> dict[str, str]:
    missing = [name for name, text in given.items() if not text]
    if missing:
        where = "PostgreSQL" if url.startswith("postgresql") else "an in-memory database"
        raise SettingsError(
            f"{', '.join(missing)}: required with {where}; each a separate secret "
            f"(e.g. the output of `openssl rand -base64 32`, a new one for each)")
    return given


def _from_files(database: Path, given: dict[str, str]) -> dict[str, str]:
    """Each secret the environment does not give, from its file beside the database,
    made on first use."""
    key = given[CIPHER_KEY] or _file_secret(database, CIPHER_KEY,
                                            lambda: AESCipher.create_key(32))
    _check_key(key)
    new_seed: Callable[[], str] = _random_secret
    if database.exists():
        # A migration of the files: before the secrets were separated, the seed of a
        # database's allocation sequences was derived from its cipher key. A database made
        # then gets that same value written into its new seed file, once, so its trial's
        # sequences go on unchanged: a new seed would change no recorded draw, but the rest
        # of each block already begun would come from another shuffle and lose its balance.
        new_seed = lambda: _legacy_seed(key)
    return {
        CIPHER_KEY: key,
        ALLOCATION_SEED: given[ALLOCATION_SEED] or _file_secret(database, ALLOCATION_SEED,
                                                                new_seed),
        PSEUDONYM_KEY: given[PSEUDONYM_KEY] or _file_secret(database, PSEUDONYM_KEY,
                                                            _random_secret),
    }


def _file_secret(database: Path, name: str, new: Callable[[], str]) -> str:
    path = Path(f"{database}{SECRET_FILES[name]}")
    if not path.exists():
        _create(path, new())
    text = path.read_text().strip()
    if not text:
        raise SettingsError(f"{name}: the file {path} is empty")
    return text


def _create(path: Path, text: str) -> None:
    """Writes a new file of mode 0600, whole or not at all; a file another process made
    first is kept (several processes may start on one database at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(temporary)


def _random_secret() -> str:
    return BASE64_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _legacy_seed(key: str) -> str:
    derived = hmac.new(base64.b64decode(key), b"trialog allocation seed", hashlib.sha256)
    return BASE64_PREFIX + base64.b64encode(derived.digest()).decode()


def _check_key(key: str) -> None:
    try:
        size = len(base64.b64decode(key, validate=True))
    except ValueError:
        raise SettingsError(f"{CIPHER_KEY}: not valid base64") from None
    if size not in AESCipher.KEY_SIZES:
        raise SettingsError(f"{CIPHER_KEY}: must decode to 16, 24 or 32 bytes")


def _check_apart(texts: dict[str, str]) -> None:
    names = list(texts)
    for i, name in enumerate(names):
        for other in names[i + 1:]:
            if texts[name] == texts[other]:
                raise SettingsError(f"{other}: must differ from {name} (three separate "
                                    f"secrets, none derived from another)")
