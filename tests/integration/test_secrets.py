"""The three secrets: the cipher key, the allocation seed and the pseudonym key, none derived
from another; generated beside a SQLite database, required with PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest

from infrastructure.audit import exports
from infrastructure.readside.projections import TrialProjection
from infrastructure.store.settings import Settings, SettingsError, check_secrets
from tests.cli_runner import run_cli
from tests.conftest import TEST_KEY, TEST_PSEUDONYM_KEY, TEST_SECRETS
from tests.databases import SHARED_URL
from tests.integration.helpers import enrol

FILES = {"TRIALOG_CIPHER_KEY": ".key", "TRIALOG_ALLOCATION_SEED": ".seed",
         "TRIALOG_PSEUDONYM_KEY": ".pseudonym-key"}


def sqlite_settings(database: Path) -> Settings:
    return Settings.from_env({"TRIALOG_DATABASE_URL": f"sqlite:///{database}"})


def trialog(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TRIALOG_")}
    return run_cli(args, cwd, {**clean, **env}, timeout=60)


def test_the_sqlite_default_makes_three_separate_secret_files_once(tmp_path):
    database = tmp_path / "trial.db"
    first = sqlite_settings(database)
    for suffix in FILES.values():
        path = Path(f"{database}{suffix}")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    texts = {Path(f"{database}{suffix}").read_text().strip() for suffix in FILES.values()}
    assert len(texts) == 3
    key = base64.b64decode(first.cipher_key)
    assert first.allocation_seed != legacy_seed(key)
    assert first.pseudonym_key not in (first.allocation_seed, key)
    again = sqlite_settings(database)
    assert (again.cipher_key, again.allocation_seed, again.pseudonym_key) == (
        first.cipher_key, first.allocation_seed, first.pseudonym_key)


def legacy_seed(key: bytes) -> bytes:
    """The seed as it was derived from the cipher key before the secrets were separated."""
    return hmac.new(key, b"trialog allocation seed", hashlib.sha256).digest()


def test_a_database_made_with_the_derived_seed_keeps_it_in_its_new_seed_file(tmp_path):
    database = tmp_path / "existing.db"
    sqlite3.connect(database).close()
    Path(f"{database}.key").write_text(TEST_KEY)
    settings = sqlite_settings(database)
    assert settings.allocation_seed == legacy_seed(base64.b64decode(TEST_KEY))
    seed_file = Path(f"{database}.seed")
    assert stat.S_IMODE(seed_file.stat().st_mode) == 0o600
    Path(f"{database}.key").unlink()  # from now on the seed no longer depends on the key
    assert sqlite_settings(database).allocation_seed == settings.allocation_seed
    assert settings.pseudonym_key != settings.allocation_seed


@pytest.mark.parametrize("command", [["db", "upgrade"], ["serve", "--port", "0"],
                                     ["audit", "verify", "--quiet"]])
def test_postgresql_start_fails_naming_each_missing_secret(tmp_path, command):
    answer = trialog(command, tmp_path, TRIALOG_DATABASE_URL=SHARED_URL,
                     TRIALOG_CIPHER_KEY=TEST_KEY)
    assert answer.returncode == 1
    assert answer.stderr.count("\n") == 1, answer.stderr
    assert "TRIALOG_ALLOCATION_SEED" in answer.stderr
    assert "TRIALOG_PSEUDONYM_KEY" in answer.stderr
    assert "TRIALOG_CIPHER_KEY" not in answer.stderr


def test_a_process_may_check_the_secrets_as_it_starts_without_writing_any(tmp_path):
    database = tmp_path / "not-yet.db"
    check_secrets({"TRIALOG_DATABASE_URL": f"sqlite:///{database}"})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SettingsError, match="^TRIALOG_PSEUDONYM_KEY: required with PostgreSQL"):
        check_secrets({"TRIALOG_DATABASE_URL": SHARED_URL,
                       "TRIALOG_CIPHER_KEY": TEST_KEY, "TRIALOG_ALLOCATION_SEED": "a seed"})


def test_postgresql_starts_with_the_three_secrets(tmp_path):
    answer = trialog(["db", "upgrade"], tmp_path, TRIALOG_DATABASE_URL=SHARED_URL,
                     **TEST_SECRETS)
    assert answer.returncode == 0, answer.stderr


def test_one_value_given_for_two_secrets_is_refused():
    with pytest.raises(SettingsError, match="TRIALOG_PSEUDONYM_KEY: must differ from "
                                            "TRIALOG_ALLOCATION_SEED"):
        Settings.from_env({"TRIALOG_DATABASE_URL": SHARED_URL, **TEST_SECRETS,
                           "TRIALOG_PSEUDONYM_KEY": TEST_SECRETS["TRIALOG_ALLOCATION_SEED"]})


def test_a_base64_secret_is_its_decoded_bytes_and_anything_else_its_text():
    settings = Settings.from_env({"TRIALOG_DATABASE_URL": SHARED_URL, **TEST_SECRETS,
                                  "TRIALOG_ALLOCATION_SEED": "base64:AAEC/w=="})
    assert settings.allocation_seed == b"\x00\x01\x02\xff"
    assert settings.pseudonym_key == TEST_PSEUDONYM_KEY.encode()
    with pytest.raises(SettingsError, match="TRIALOG_ALLOCATION_SEED: not valid base64"):
        Settings.from_env({"TRIALOG_DATABASE_URL": SHARED_URL, **TEST_SECRETS,
                           "TRIALOG_ALLOCATION_SEED": "base64:not base64!"})


@pytest.mark.parametrize("isolated_url", ["sqlite"], indirect=True)
def test_deidentified_exports_are_keyed_by_the_pseudonym_key_not_the_seed(isolated):
    pid = enrol(isolated)
    TrialProjection(isolated).catch_up()
    rows = list(exports.csv_rows(isolated, deidentify=True))
    expected = exports.Deidentifier(TEST_PSEUDONYM_KEY.encode()).pseudonym(pid)
    assert rows and {row["participant_id"] for row in rows} == {expected}


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0", "redis://:secret@cache:6380", "rediss://cache:6380/2",
    "redis+socket:///run/redis.sock"])
def test_a_broker_url_the_transport_reads_is_taken(url):
    from infrastructure.store.settings import redis_url

    assert redis_url({"TRIALOG_REDIS_URL": url}) == url


@pytest.mark.parametrize("url", [
    "localhost:6379", "redis://127.0.0.1:99999/0", "redis://h:6379/zero", "http://h/0",
    "redis:// h", "sentinel://s1:26379", "sentinel://s1:26379;sentinel://s2:26379"])
def test_a_broker_url_the_transport_cant_read_is_refused_naming_it(url):
    """Sentinels among them: their transport needs a master's name the workers don't pass
    (a worker given one passed the check, then stopped with a traceback)."""
    from infrastructure.store.settings import redis_url

    with pytest.raises(SettingsError, match="TRIALOG_REDIS_URL"):
        redis_url({"TRIALOG_REDIS_URL": url})
