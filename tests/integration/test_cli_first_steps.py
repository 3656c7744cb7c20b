"""What a newcomer sees on a first run of the command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import pytest

from tests.databases import SHARED_URL
from tests.integration.test_cli import ROOT, TEST_KEY, run
from workers.app import beat_schedule_file


def test_db_upgrade_says_what_it_created_and_then_that_nothing_was_needed(tmp_path):
    url = f"sqlite:///{tmp_path / 'first.db'}"
    first = run(["db", "upgrade"], tmp_path, TRIALOG_DATABASE_URL=url,
                TRIALOG_CIPHER_KEY=TEST_KEY)
    assert first.returncode == 0, first.stderr
    created = re.search(r"created (\d+) tables: (.*)", first.stdout)
    assert created is not None, first.stdout
    assert {"trialog_commands", "trialog_quarantine", "rm_participants"} <= set(
        created.group(2).split(", "))
    assert "migrated from revision none to" in first.stdout
    assert "Traceback" not in first.stderr
    again = run(["db", "upgrade"], tmp_path, TRIALOG_DATABASE_URL=url,
                TRIALOG_CIPHER_KEY=TEST_KEY)
    assert again.returncode == 0, again.stderr
    assert "created" not in again.stdout and "migrated" not in again.stdout
    assert "tables are up to date (revision" in again.stdout
    assert "up to date" not in first.stdout


def test_db_upgrade_says_how_many_earlier_grants_it_recorded(tmp_path):
    """A token a release before 0036 made (its row alone, sealed) is recorded in the
    access register by the next upgrade, once."""
    from datetime import UTC, datetime

    from infrastructure.store.bootstrap import bootstrap
    from infrastructure.store.tables import tokens
    from tests.conftest import settings_for
    from tests.integration.test_access_seals import made_as_before_grants

    url = f"sqlite:///{tmp_path / 'earlier.db'}"
    env = {"TRIALOG_DATABASE_URL": url, "TRIALOG_CIPHER_KEY": TEST_KEY}
    assert run(["db", "upgrade"], tmp_path, **env).returncode == 0
    trialog = bootstrap(settings_for(url), migrate=False)
    try:
        made_as_before_grants(trialog.engine, tokens, name="lab-earlier", role="service",
                              sites='["CASE"]', token_hash="0" * 64,
                              created_at=datetime(2026, 3, 1, tzinfo=UTC))
    finally:
        trialog.close()
    upgraded = run(["db", "upgrade"], tmp_path, **env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.splitlines()[0] == ("recorded 1 earlier grants of access in the "
                                               "access register")
    again = run(["db", "upgrade"], tmp_path, **env)
    assert "recorded" not in again.stdout and "up to date" in again.stdout


def test_rebuild_prints_the_rate_of_the_whole_run(tmp_path):
    demo = run(["demo", "--participants", "6", "--seed", "2"], tmp_path)
    assert demo.returncode == 0, demo.stderr
    url = f"sqlite:///{tmp_path / 'trialog-demo.db'}"
    rebuilt = run(["projections", "rebuild", "--quiet"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert rebuilt.returncode == 0, rebuilt.stderr
    found = re.search(r"trial: (\d+) events applied \(([\d,]+) events/s\)", rebuilt.stderr)
    assert found is not None and int(found.group(1)) > 0
    assert int(found.group(2).replace(",", "")) > 0


CELERY = [sys.executable, "-m", "celery", "-A", "workers.app"]


def celery(args, cwd, timeout, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("TRIALOG_")}
    full.update(env, PYTHONPATH=str(ROOT))
    try:
        return subprocess.run(CELERY + args, cwd=cwd, env=full, capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        return e


def test_a_worker_without_its_secrets_stops_at_start_naming_them(tmp_path):
    done = celery(["worker", "--pool", "solo"], tmp_path, 60,
                  TRIALOG_DATABASE_URL=SHARED_URL)
    assert isinstance(done, subprocess.CompletedProcess) and done.returncode == 1
    assert "TRIALOG_ALLOCATION_SEED" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("program", ["worker", "beat"])
@pytest.mark.parametrize("url", ["localhost:6379", "redis://127.0.0.1:99999/0",
                                 "redis://127.0.0.1:6379/zero", "http://127.0.0.1:6379/0"])
def test_a_worker_or_beat_with_a_broker_url_it_cant_read_stops_at_start_naming_it(
        tmp_path, program, url):
    """``localhost:6379`` made a worker retry for ever; the others stopped with a
    traceback."""
    done = celery([program], tmp_path, 60, TRIALOG_DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}",
                  TRIALOG_REDIS_URL=url, TRIALOG_BEAT_SCHEDULE=str(tmp_path / "schedule"))
    assert isinstance(done, subprocess.CompletedProcess) and done.returncode == 1
    assert "TRIALOG_REDIS_URL: must be redis://" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("program", ["worker", "beat"])
def test_a_worker_or_beat_with_a_mail_url_it_cant_read_stops_at_start_naming_it(tmp_path,
                                                                                program):
    """A worker started, then failed every task (reminders and deviation flags alike)."""
    done = celery([program], tmp_path, 60, TRIALOG_DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}",
                  TRIALOG_SMTP_URL="smtp//bad", TRIALOG_BEAT_SCHEDULE=str(tmp_path / "schedule"))
    assert isinstance(done, subprocess.CompletedProcess) and done.returncode == 1
    assert "TRIALOG_SMTP_URL: must be smtp://" in done.stderr
    assert "Traceback" not in done.stderr


def test_beat_keeps_its_schedule_outside_the_working_folder(tmp_path):
    schedule = tmp_path / "state" / "beat-schedule"
    schedule.parent.mkdir()
    celery(["beat"], tmp_path, 4, TRIALOG_DATABASE_URL=f"sqlite:///{tmp_path / 'b.db'}",
           TRIALOG_BEAT_SCHEDULE=str(schedule))
    assert not [f for f in tmp_path.iterdir() if f.name.startswith("celerybeat")]
    assert [f for f in schedule.parent.iterdir() if f.name.startswith("beat-schedule")]
    assert beat_schedule_file().startswith(tempfile.gettempdir())  # the default


def test_the_demo_keeps_its_seed_in_the_seed_file_and_its_hint_runs_as_printed(tmp_path):
    """The hint runs as a shell reads it, in a folder whose name has a space."""
    import shlex

    folder = tmp_path / "a folder"
    folder.mkdir()
    demo = run(["demo", "--participants", "4", "--seed", "5"], folder)
    assert demo.returncode == 0, demo.stderr
    seed_file = folder / "trialog-demo.db.seed"
    assert seed_file.read_text().strip() == "demo-5"
    assert oct(seed_file.stat().st_mode & 0o777) == "0o600"
    hint = next(line for line in demo.stdout.splitlines() if line.startswith("Try: "))
    assignment, command, *args = shlex.split(hint.removeprefix("Try: "))
    name, _, value = assignment.partition("=")
    done = subprocess.run([command, *args], cwd=folder, capture_output=True, text=True,
                          timeout=120, env={**os.environ, name: value}, check=False)
    assert done.returncode == 0, done.stderr
    assert seed_file.read_text().strip() == "demo-5"  # read, not replaced


def test_a_revoked_token_is_refused_on_the_next_request(tmp_path):
    """trialog token revoke, with a server running: its very next request is a 401."""
    from tests.e2e.conftest import TRIALOG, Client, free_port, wait_until_up

    url = f"sqlite:///{tmp_path / 'revoke.db'}"
    env = {"TRIALOG_DATABASE_URL": url, "TRIALOG_CIPHER_KEY": TEST_KEY}
    created = run(["token", "create", "--name", "lab-system", "--role", "service",
                   "--all-sites"], tmp_path, **env)
    assert created.returncode == 0, created.stderr
    port = free_port()
    client = Client(f"http://127.0.0.1:{port}", created.stdout.strip())
    full = {k: v for k, v in os.environ.items() if not k.startswith("TRIALOG_")} | env
    with open(tmp_path / "server.log", "w") as out:
        server = subprocess.Popen([TRIALOG, "serve", "--port", str(port)], env=full,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_up(client.url, server, tmp_path / "server.log")
        assert client.get("/v1/participants").status_code == 200
        revoked = run(["token", "revoke", "lab-system"], tmp_path, **env)
        assert revoked.returncode == 0, revoked.stderr
        assert client.get("/v1/participants").status_code == 401
    finally:
        server.terminate()
        server.wait(timeout=10)
    again = run(["token", "revoke", "lab-system"], tmp_path, **env)
    assert again.returncode == 1 and "was revoked on" in again.stderr
    unknown = run(["token", "revoke", "nobody"], tmp_path, **env)
    assert unknown.returncode == 1 and "no token is named 'nobody'" in unknown.stderr
