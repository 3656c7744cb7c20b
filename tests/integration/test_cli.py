"""The command line, run as a user runs it: a process of its own (forked from one that has
imported Trialog, `tests.cli_runner`; started from the shell where signals, pipes or the
import's processes are what is tested), real files; in-process where only its answers are
looked at."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from infrastructure.cli import NO_TABLES
from tests.cli_runner import run_cli
from tests.conftest import TEST_KEY
from tests.databases import PG_SERVER, SHARED_URL, fresh_postgres_database

TRIALOG = [sys.executable, "-m", "infrastructure.cli"]
ROOT = Path(__file__).resolve().parents[2]


def run(args, cwd, **env):
    return run_with_input(args, cwd, None, **env)


def run_with_input(args, cwd, stdin, **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALOG_")}
    full_env.update(env)
    return run_cli(args, cwd, full_env, stdin=stdin)


def test_demo_prints_the_summary_then_history_and_verify_work_on_its_file(tmp_path):
    demo = run(["demo", "--participants", "14", "--seed", "3"], tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert "Trial summary: 14 participants" in demo.stdout
    assert "Mean BPI average pain by arm and visit" in demo.stdout
    database = tmp_path / "trialog-demo.db"
    assert f"SQLite file: {database}" in demo.stdout
    url = f"sqlite:///{database}"

    verified = run(["audit", "verify", "--quiet"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["ok"] is True

    timeline = run(["audit", "history", "CASE-0002", "--format", "json"], tmp_path,
                   TRIALOG_DATABASE_URL=url)
    assert timeline.returncode == 0, timeline.stderr
    events = json.loads(timeline.stdout)["events"]
    assert events[0]["type"] == "ParticipantScreened"
    early = run(["audit", "history", "CASE-0002", "--as-of", events[0]["recorded_at"],
                 "--format", "json"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert [e["version"] for e in json.loads(early.stdout)["events"]] == [1]
    beyond = run(["audit", "history", "CASE-0002", "--version", "999"], tmp_path,
                 TRIALOG_DATABASE_URL=url)  # as the API: not the whole record
    assert beyond.returncode == 1 and "has no version 999" in beyond.stderr, beyond.stderr
    upto = run(["audit", "history", "CASE-0002", "--version", "2"], tmp_path,
               TRIALOG_DATABASE_URL=url)
    assert upto.returncode == 0, upto.stderr
    versions = [line.split()[0] for line in upto.stdout.splitlines() if line.startswith("v")]
    assert versions == ["v1", "v2"]
    assert "State at v2 (" in upto.stdout and "): consented, arm -, site CASE" in upto.stdout
    randomized = json.loads(run(["audit", "history", "CASE-0002", "--version", "3",
                                 "--format", "json"], tmp_path,
                                TRIALOG_DATABASE_URL=url).stdout)["state"]
    assert (randomized["version"], randomized["status"]) == (3, "randomized")
    assert randomized["arm"] in ("b12", "control")
    both = run(["audit", "history", "CASE-0002", "--version", "2", "--as-of",
                events[0]["recorded_at"]], tmp_path, TRIALOG_DATABASE_URL=url)
    assert both.returncode == 1 and "not both" in both.stderr

    with create_engine(url).begin() as conn:
        conn.execute(text("DELETE FROM trialog_events WHERE id = 5"))
    broken = run(["audit", "verify", "--quiet"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert broken.returncode == 1
    assert json.loads(broken.stdout)["problems"][0]["kind"] == "deleted"


def test_the_same_seed_gives_the_same_summary(tmp_path):
    first = run(["demo", "--participants", "8", "--seed", "5"], tmp_path)
    second = run(["demo", "--participants", "8", "--seed", "5"], tmp_path)
    assert first.returncode == second.returncode == 0
    assert first.stdout == second.stdout


def test_failures_are_one_line_on_standard_error(tmp_path):
    assert run(["db", "upgrade"], tmp_path, TRIALOG_DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}",
               TRIALOG_CIPHER_KEY=TEST_KEY).returncode == 0
    missing = run(["audit", "history", "CASE-9999"], tmp_path,
                  TRIALOG_DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}", TRIALOG_CIPHER_KEY=TEST_KEY)
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0
    assert "CASE-9999" in missing.stderr
    bad_url = run(["audit", "verify"], tmp_path, TRIALOG_DATABASE_URL="mysql://nope")
    assert bad_url.returncode == 1
    assert bad_url.stderr.startswith("trialog: TRIALOG_DATABASE_URL")
    no_key = run(["audit", "verify"], tmp_path,
                 TRIALOG_DATABASE_URL=SHARED_URL)
    assert no_key.returncode == 1 and "TRIALOG_CIPHER_KEY" in no_key.stderr


def test_token_create_prints_the_token_alone_and_keeps_only_its_hash(tmp_path):
    url = f"sqlite:///{tmp_path / 't.db'}"
    created = run(["token", "create", "--name", "lab-system", "--role", "service",
                   "--site", "METRO"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert created.stdout == token + "\n" and len(token) > 30
    with create_engine(url).connect() as conn:
        stored = conn.execute(text("SELECT name, role, token_hash, sites "
                                   "FROM trialog_tokens")).all()
    assert [(name, role, sites) for name, role, _, sites in stored] == [
        ("lab-system", "service", '["METRO"]')]
    assert token not in stored[0][2]
    again = run(["token", "create", "--name", "lab-system", "--role", "admin"], tmp_path,
                TRIALOG_DATABASE_URL=url)
    assert again.returncode == 1 and "already exists" in again.stderr
    bad_role = run(["token", "create", "--name", "x", "--role", "root"], tmp_path,
                   TRIALOG_DATABASE_URL=url)
    assert bad_role.returncode != 0 and "--role" in bad_role.stderr


def test_webhook_add_prints_the_id_and_secret_once_and_list_shows_the_subscription(
        tmp_path):
    url = f"sqlite:///{tmp_path / 't.db'}"
    added = run(["webhook", "add", "--url", "https://example.org/hook", "--site", "CASE"],
                tmp_path, TRIALOG_DATABASE_URL=url)
    assert added.returncode == 0, added.stderr
    webhook_id, secret = added.stdout.split()
    assert secret.startswith("whsec_")
    listed = run(["webhook", "list"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert listed.returncode == 0, listed.stderr
    assert webhook_id in listed.stdout and "https://example.org/hook" in listed.stdout
    assert "CASE" in listed.stdout and secret not in listed.stdout
    for bad in ("ftp://example.org/hook", "http://", "http://exa mple.org/x",
                "http://host:99999/x", "http://[::1", "https://example.org/a\nb"):
        refused = run(["webhook", "add", "--url", bad], tmp_path, TRIALOG_DATABASE_URL=url)
        assert refused.returncode == 1 and refused.stdout == "", bad
        assert refused.stderr.startswith("trialog: --url: must be an http:// or https://")
    no_type = run(["webhook", "add", "--url", "https://example.org/h", "--type", "Nope"],
                  tmp_path, TRIALOG_DATABASE_URL=url)
    assert no_type.returncode == 1 and "--type: no event is of type 'Nope'" in no_type.stderr
    assert "VisitCompleted" in no_type.stderr
    typed = run(["webhook", "add", "--url", "HTTPS://example.org/h", "--type",
                 "org.trialog.VisitCompleted"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert typed.returncode == 0, typed.stderr
    unknown = run(["webhook", "rotate", "nope"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert unknown.returncode == 1 and "no webhook nope" in unknown.stderr


def test_projections_rebuild_and_status_report_positions(tmp_path):
    assert run(["demo", "--participants", "6", "--seed", "2"], tmp_path).returncode == 0
    url = f"sqlite:///{tmp_path / 'trialog-demo.db'}"
    status = run(["projections", "status"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert status.returncode == 0, status.stderr
    lines = {line.split()[0]: line.split() for line in status.stdout.splitlines()}
    # Every follower of the log, and the clock-driven scan.
    assert set(lines) == {"trial", "feed", "deviation_monitor", "deviation_scan"}
    _, _, position, _, lag, _, quarantined = lines["trial"]
    assert (lag, quarantined) == ("0", "0") and int(position) > 0
    _, _, rendered, _, lag, _, _ = lines["feed"]  # the feed's pages, rendered by the demo
    assert lag == "0" and int(rendered) >= int(position)
    rebuilt = run(["projections", "rebuild"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert f"trial: {position} events applied" in rebuilt.stderr
    assert f"feed: {rendered} events applied" in rebuilt.stderr
    assert "events/s" in rebuilt.stderr


def test_export_csv_has_a_row_per_participant_visit_and_deidentifies(tmp_path):
    import csv
    from datetime import date

    assert run(["demo", "--participants", "6", "--seed", "4"], tmp_path).returncode == 0
    url = f"sqlite:///{tmp_path / 'trialog-demo.db'}"
    plain = run(["export", "csv"], tmp_path, TRIALOG_DATABASE_URL=url)
    masked = run(["export", "csv", "--deidentify", "--output", "out.csv"], tmp_path,
                 TRIALOG_DATABASE_URL=url)
    assert plain.returncode == masked.returncode == 0
    rows = list(csv.DictReader(plain.stdout.splitlines()))
    hidden = list(csv.DictReader((tmp_path / "out.csv").read_text().splitlines()))
    assert rows and len(rows) % 4 == 0 and len(hidden) == len(rows)
    assert [r["visit"] for r in rows[:4]] == ["baseline", "week6", "end_of_treatment",
                                              "follow_up"]
    assert {r["participant_id"] for r in rows}.isdisjoint(r["participant_id"] for r in hidden)

    def by_participant(listed):
        found: dict[str, list[dict[str, str]]] = {}
        for row in listed:
            found.setdefault(row["participant_id"], []).append(row)
        return found

    def shifts(original, masked_rows):
        """The days each completed visit moved back, if the scores are the same."""
        if [(r["visit"], r["bpi_severity"]) for r in original] != [
                (r["visit"], r["bpi_severity"]) for r in masked_rows]:
            return None
        return {(date.fromisoformat(a["completed_on"])
                 - date.fromisoformat(b["completed_on"])).days
                for a, b in zip(original, masked_rows, strict=True) if a["completed_on"]}

    # listed by pseudonym, not in the ids' order; each participant's scores kept and all
    # its dates moved back by the same 1-365 days
    unmatched = by_participant(hidden)
    assert list(unmatched) == sorted(unmatched)
    for original in by_participant(rows).values():
        pseudonym = next(key for key, masked_rows in unmatched.items()
                         if (moved := shifts(original, masked_rows)) is not None
                         and len(moved) <= 1 and all(1 <= d <= 365 for d in moved))
        del unmatched[pseudonym]
    assert not unmatched


def test_export_odm_and_fhir_write_documents_to_a_file_or_standard_output(tmp_path):
    from lxml import etree

    assert run(["demo", "--participants", "5", "--seed", "4"], tmp_path).returncode == 0
    url = f"sqlite:///{tmp_path / 'trialog-demo.db'}"
    odm = run(["export", "odm", "--output", "out.xml"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert odm.returncode == 0, odm.stderr
    root = etree.parse(str(tmp_path / "out.xml")).getroot()
    assert root.get("ODMVersion") == "1.3.2"
    assert len(root.findall(".//{*}SubjectData")) == 5
    fhir = run(["export", "fhir", "--deidentify"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert fhir.returncode == 0, fhir.stderr
    lines = [json.loads(line) for line in fhir.stdout.splitlines()]
    assert len(lines) == 5 and {r["resourceType"] for r in lines} == {"ResearchSubject"}
    assert all(r["id"].startswith("P-") for r in lines)


def test_the_summary_lists_mean_pain_in_the_protocols_visit_order(tmp_path):
    demo = run(["demo", "--participants", "8", "--seed", "5"], tmp_path)
    lines = [line.split() for line in demo.stdout.splitlines()
             if line.startswith("  b12 ") and "(n=" in line]
    assert [line[1] for line in lines] == ["baseline", "week6", "end_of_treatment",
                                           "follow_up"]


def test_importing_the_worker_app_writes_nothing(tmp_path):
    # `celery -A workers.app` imports it in whatever folder it is started from.
    imported = subprocess.run([sys.executable, "-c", "import workers.app, workers.tasks"],
                              cwd=tmp_path, env={"PATH": os.environ["PATH"],
                                                 "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True, check=False, timeout=60)
    assert imported.returncode == 0, imported.stderr
    assert list(tmp_path.iterdir()) == []


def test_access_granted_revoked_and_disabled_keeps_the_reason_given(tmp_path, monkeypatch,
                                                                    capsys):
    """`--reason` on `token create|revoke` and `user create|disable` is kept with the
    access register's event; a blank or control-character reason is refused, naming it,
    and nothing is done."""
    from domain.revocations import holders
    from infrastructure.cli import main
    from infrastructure.store.bootstrap import bootstrap
    from tests.conftest import TEST_SECRETS, settings_for

    url = f"sqlite:///{tmp_path / 't.db'}"
    for name, value in {**TEST_SECRETS, "TRIALOG_DATABASE_URL": url}.items():
        monkeypatch.setenv(name, value)
    assert main(["db", "upgrade"]) == 0
    assert main(["token", "create", "--name", "lims", "--role", "service", "--site", "CASE",
                 "--reason", "the lab's system, ticket 42"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("a long enough password\n"))
    assert main(["user", "create", "--login", "ada", "--name", "Ada Lee", "--role",
                 "monitor", "--site", "CASE", "--password-stdin",
                 "--reason", "monitor for CASE"]) == 0
    assert main(["token", "revoke", "lims", "--reason", "replaced"]) == 0
    assert main(["user", "disable", "ada", "--reason", "left the study"]) == 0
    capsys.readouterr()
    for args, rule in (
            (["token", "create", "--name", "x", "--role", "admin", "--reason", "  "],
             "must not be blank"),
            (["token", "revoke", "lims", "--reason", "a\u0007b"],
             "must not contain control characters"),
            (["user", "disable", "ada", "--reason", ""], "must not be blank")):
        with pytest.raises(SystemExit) as refused:
            main(args)
        assert refused.value.code == 2
        err = capsys.readouterr().err
        assert "argument --reason: " in err and rule in err, err
    t = bootstrap(settings_for(url), migrate=False)
    try:
        register = t.service.access_register()
        listed = holders(t.service.repository.event_store.get(register.id))
    finally:
        t.close()
    assert [(h["name"], h["grant_reason"], h["end_reason"]) for h in listed] == [
        ("lims", "the lab's system, ticket 42", "replaced"),
        ("ada", "monitor for CASE", "left the study")]


def test_the_system_s_own_actors_and_invisible_names_are_taken_by_no_one(
        tmp_path, monkeypatch, capsys):
    """A token named deviation-monitor wrote admin commands under the monitor's name, and
    a person could log in and sign as reminder-worker (or as `trialog token revoke`, the
    command line's own name in the access register); a printed name of a zero-width space
    signed with no visible name."""
    from infrastructure.cli import demo, main
    from infrastructure.jobs import monitor, reminders
    from infrastructure.store.revocations import UPGRADE_ACTOR
    from infrastructure.store.tokens import (
        SYSTEM_ACTORS,
        TOKEN_CREATE_ACTOR,
        TOKEN_REVOKE_ACTOR,
        USER_CREATE_ACTOR,
        USER_DISABLE_ACTOR,
        USER_PASSWORD_ACTOR,
    )
    from tests.conftest import TEST_SECRETS

    def create_user(login: str, printed: str) -> int:
        monkeypatch.setattr("sys.stdin", io.StringIO("a long enough password\n"))
        return main(["user", "create", "--login", login, "--name", printed, "--role",
                     "admin", "--password-stdin"])

    assert SYSTEM_ACTORS == {monitor.ACTOR, reminders.ACTOR, "import", demo.SERVICE,
                             TOKEN_CREATE_ACTOR, TOKEN_REVOKE_ACTOR, USER_CREATE_ACTOR,
                             USER_DISABLE_ACTOR, USER_PASSWORD_ACTOR, UPGRADE_ACTOR}
    listed = ", ".join(sorted(SYSTEM_ACTORS))
    for name, value in {**TEST_SECRETS,
                        "TRIALOG_DATABASE_URL": f"sqlite:///{tmp_path / 't.db'}"}.items():
        monkeypatch.setenv(name, value)
    assert main(["db", "upgrade"]) == 0
    capsys.readouterr()
    for name in sorted(SYSTEM_ACTORS):
        assert main(["token", "create", "--name", name, "--role", "admin"]) == 1
        assert capsys.readouterr().err == (
            f"trialog: --name: {name!r} is a name Trialog writes its own events under "
            f"({listed}): choose another\n")
        assert create_user(name, "Ann Lee") == 1
        assert f"--login: {name!r} is a name Trialog writes" in capsys.readouterr().err
    for alike, name in (("Import", "import"), ("deviation\u2010monitor", "deviation-monitor"),
                        ("deviation\u2212monitor", "deviation-monitor"),
                        ("\uff49mport", "import"), ("Trialog  DB upgrade", UPGRADE_ACTOR)):
        assert main(["token", "create", "--name", alike, "--role", "admin"]) == 1
        assert f"{alike!r} (as {name!r}) is a name" in capsys.readouterr().err
    for printed in ("\u200b", "\u2060\u00ad", " \u3164", "Ann\nLee", "\u202eeeL nnA",
                    "\u2065", "Ann \uffff", "Dan \udcff", "\u200eAnn Lee", "Ann\u2028Lee"):
        assert create_user("ann", printed) == 1
        assert capsys.readouterr().err == (
            "trialog: --name: must be 1-200 characters with a visible one, without control "
            "or format characters (but the joiners), line breaks or noncharacters (the "
            "printed name of a signature)\n")
    assert main(["token", "create", "--name", "\u3164", "--role", "admin"]) == 1
    assert capsys.readouterr().err == (
        "trialog: --name: must hold a visible character (white space and invisible "
        "characters alone name no one)\n")
    with pytest.raises(SystemExit) as refused:
        main(["import", "x.ndjson", "--actor", "deviation-monitor"])
    assert refused.value.code == 2
    assert "'deviation-monitor' is a name Trialog writes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reminders", "resolve", "r", "--sent", "--actor", "import", "--reason", "x"])
    assert "'import' is a name Trialog writes" in capsys.readouterr().err
    assert main(["reminders", "resolve", "r", "--sent", "--actor", "dm-ana",
                 "--reason", "\u200b"]) == 1
    assert capsys.readouterr().err == "trialog: --reason: must not be blank\n"
    # Names that say something, in any script: joiners and no-break spaces are parts of
    # names (a Persian surname, Sinhala "Sri").
    persian = "\u0645\u062d\u0645\u062f\u06cc\u200c\u0646\u0698\u0627\u062f"
    for login, printed in (("ann", "Ann Lee"), ("m-nejad", persian),
                           ("sri", "\u0dc1\u0dca\u200d\u0dbb\u0dd3"),
                           ("jean", "Jean\u00a0Dupont")):
        assert create_user(login, printed) == 0, capsys.readouterr().err
    assert main(["token", "create", "--name", "monitor-1", "--role", "admin"]) == 0


def test_token_and_user_creation_need_sites_for_every_role_but_admin_and_auditor(tmp_path):
    url = f"sqlite:///{tmp_path / 't.db'}"
    no_scope = run(["token", "create", "--name", "lab", "--role", "coordinator"], tmp_path,
                   TRIALOG_DATABASE_URL=url)
    assert no_scope.returncode == 1
    assert no_scope.stderr == ("trialog: --site or --all-sites is required for role "
                               "coordinator (the protocol's sites: CASE, METRO)\n")
    unknown = run(["token", "create", "--name", "lab", "--role", "service", "--site", "CASE",
                   "--site", "MAYO"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert unknown.returncode == 1
    assert unknown.stderr == ("trialog: --site: unknown site 'MAYO'; the protocol's sites "
                              "are CASE, METRO\n")
    both = run(["token", "create", "--name", "lab", "--role", "service", "--site", "CASE",
                "--all-sites"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert both.returncode == 1 and "not both" in both.stderr
    for role in ("admin", "auditor"):
        made = run(["token", "create", "--name", f"{role}-1", "--role", role], tmp_path,
                   TRIALOG_DATABASE_URL=url)
        assert made.returncode == 0, made.stderr
    with create_engine(url).connect() as conn:
        assert conn.execute(text("SELECT name, sites FROM trialog_tokens ORDER BY name")
                            ).all() == [("admin-1", None), ("auditor-1", None)]


def test_user_create_keeps_only_an_argon2_hash_and_disable_refuses_the_person(tmp_path):
    url = f"sqlite:///{tmp_path / 't.db'}"
    password = "a long enough password\n"
    created = run_with_input(["user", "create", "--login", "ada", "--name", "Ada Lovelace",
                              "--role", "investigator", "--site", "CASE",
                              "--password-stdin"], tmp_path, password,
                             TRIALOG_DATABASE_URL=url)
    assert created.returncode == 0, created.stderr
    assert created.stdout == "created ada (investigator; CASE)\n"
    with create_engine(url).connect() as conn:
        row = conn.execute(text("SELECT login, full_name, role, sites, password_hash, "
                                "disabled_at FROM trialog_users")).one()
    assert row[:4] == ("ada", "Ada Lovelace", "investigator", '["CASE"]')
    assert row.password_hash.startswith("peppered$argon2id$") and "long enough" not in row[4]
    assert row.disabled_at is None
    again = run_with_input(["user", "create", "--login", "ada", "--name", "A", "--role",
                            "admin", "--password-stdin"], tmp_path, password,
                           TRIALOG_DATABASE_URL=url)
    assert again.returncode == 1 and "already exists" in again.stderr
    # Logins and token names are both actors of events: one namespace.
    clash = run(["token", "create", "--name", "ada", "--role", "admin"], tmp_path,
                TRIALOG_DATABASE_URL=url)
    assert clash.returncode == 1 and "already exists" in clash.stderr
    short = run_with_input(["user", "create", "--login", "bob", "--name", "Bob", "--role",
                            "admin", "--password-stdin"], tmp_path, "short\n",
                           TRIALOG_DATABASE_URL=url)
    assert short.returncode == 1
    assert short.stderr == "trialog: the password must be 12-1024 characters\n"
    no_terminal = run_with_input(["user", "create", "--login", "bob", "--name", "Bob",
                                  "--role", "admin"], tmp_path, "",
                                 TRIALOG_DATABASE_URL=url)
    assert no_terminal.returncode == 1 and "--password-stdin" in no_terminal.stderr
    disabled = run(["user", "disable", "ada"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert disabled.returncode == 0, disabled.stderr
    twice = run(["user", "disable", "ada"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert twice.returncode == 1 and "was disabled on" in twice.stderr
    nobody = run(["user", "disable", "nobody"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert nobody.stderr == "trialog: no person has the login 'nobody'\n"


def test_user_password_resets_a_forgotten_password_ends_sessions_and_lifts_the_lock(tmp_path):
    from infrastructure.store.bootstrap import bootstrap
    from infrastructure.store.people import AccountLocked, LoginFailed, sign_in
    from infrastructure.store.settings import Settings
    from infrastructure.store.tokens import Authenticator

    url = f"sqlite:///{tmp_path / 't.db'}"
    first, new = "the first long password", "a brand new password"
    created = run_with_input(["user", "create", "--login", "ada", "--name", "Ada Lovelace",
                              "--role", "investigator", "--site", "CASE",
                              "--password-stdin"], tmp_path, first + "\n",
                             TRIALOG_DATABASE_URL=url)
    assert created.returncode == 0, created.stderr
    t = bootstrap(Settings.from_env({"TRIALOG_DATABASE_URL": url}))
    try:
        session = sign_in(t.engine, "ada", first)
        for n in range(5):  # forgotten: the fifth wrong password locks the login
            with pytest.raises(AccountLocked if n == 4 else LoginFailed):
                sign_in(t.engine, "ada", "what was it again")
        reset = run_with_input(["user", "password", "ada", "--password-stdin"], tmp_path,
                               new + "\n", TRIALOG_DATABASE_URL=url)
        assert reset.returncode == 0, reset.stderr
        assert reset.stdout == ("reset the password of ada: their sessions are ended and a "
                                "lock on their sign-in lifted\n")
        assert Authenticator(t.engine)(session.token) is None
        assert sign_in(t.engine, "ada", new).login == "ada"
        with pytest.raises(LoginFailed):
            sign_in(t.engine, "ada", first)
    finally:
        t.close()
    for args, stdin, said in (
            (["nobody"], new, ("trialog: no person has the login 'nobody' (or the row fails "
                              "its seal)\n")),
            (["ada"], "short", "trialog: the password must be 12-1024 characters\n")):
        refused = run_with_input(["user", "password", *args, "--password-stdin"], tmp_path,
                                 stdin + "\n", TRIALOG_DATABASE_URL=url)
        assert (refused.returncode, refused.stderr) == (1, said)
    disabled = run(["user", "disable", "ada"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert disabled.returncode == 0, disabled.stderr
    again = run_with_input(["user", "password", "ada", "--password-stdin"], tmp_path,
                           new + "!\n", TRIALOG_DATABASE_URL=url)
    assert again.returncode == 1 and "was disabled on" in again.stderr


def test_tokens_made_before_sites_existed_keep_every_site(tmp_path):
    """The migration that adds sites leaves older tokens with NULL: every site."""
    from infrastructure.store import migrations
    from infrastructure.store.bootstrap import bootstrap
    from infrastructure.store.tokens import Authenticator, token_hash
    from tests.conftest import settings_for

    t = bootstrap(settings_for(f"sqlite:///{tmp_path / 'old.db'}"), migrate=False)
    engine = t.engine
    migrations.upgrade(engine, "0009")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO trialog_tokens (name, role, token_hash, created_at) "
                          "VALUES ('old-coordinator', 'coordinator', :h, '2026-01-01')"),
                     {"h": token_hash("tlg_old")})
    migrations.upgrade(engine)  # 0024 seals the tokens, with the key bootstrap gave it
    principal = Authenticator(engine)("tlg_old")
    assert principal is not None and principal.name == "old-coordinator"
    assert principal.scope.every_site and principal.scope.admits("METRO")


def test_audit_history_shows_who_signed_when_and_what_it_means(tmp_path):
    import uuid
    from datetime import date

    from domain import commands as c
    from infrastructure.store.bootstrap import bootstrap
    from tests.conftest import settings_for
    from tests.factories import consent, screening

    url = f"sqlite:///{tmp_path / 'signed.db'}"
    t = bootstrap(settings_for(url), migrate=True)
    pid = "CASE-SIGNED1"
    for command in (c.ScreenParticipant(pid, screening()), c.RecordConsent(pid, consent()),
                    c.RandomizeParticipant(pid, {"registered_on": date(2026, 3, 4)}),
                    c.CompleteVisit(pid, {"visit": "baseline",
                                          "completed_on": date(2026, 3, 4)}),
                    c.SignVisit(pid, {"visit": "baseline", "meaning": "I approve this visit",
                                      "signer": "dr.ada", "printed_name": "Ada Lovelace"})):
        t.bus.dispatch(command, command_id=str(uuid.uuid4()), actor="dr.ada")
    t.close()
    shown = run(["audit", "history", pid], tmp_path, TRIALOG_DATABASE_URL=url,
                TRIALOG_CIPHER_KEY=TEST_KEY)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    signed = next(line for line in lines if "RecordSigned" in line)
    manifest = lines[lines.index(signed) + 2]
    assert manifest.startswith("      signed by Ada Lovelace (dr.ada) at 20")
    assert manifest.endswith("meaning: I approve this visit")
    baseline = next(i for i, line in enumerate(lines) if line.startswith("  baseline "))
    assert "signed by Ada Lovelace (dr.ada)" in lines[baseline + 1]
    assert "no longer valid" not in lines[baseline + 1]

    # Unlocked, the signature no longer holds: said so, not "the data changed since".
    t = bootstrap(settings_for(url), migrate=False)
    t.bus.dispatch(c.LockVisit(pid, {"visit": "baseline"}), command_id=str(uuid.uuid4()),
                   actor="dm")
    t.bus.dispatch(c.UnlockVisit(pid, {"visit": "baseline"}), command_id=str(uuid.uuid4()),
                   actor="dm", reason="re-review requested")
    t.close()
    shown = run(["audit", "history", pid], tmp_path, TRIALOG_DATABASE_URL=url,
                TRIALOG_CIPHER_KEY=TEST_KEY)
    lines = shown.stdout.splitlines()
    baseline = next(i for i, line in enumerate(lines) if line.startswith("  baseline "))
    assert lines[baseline + 1].endswith(
        "meaning: I approve this visit (no longer valid: it was unlocked since)"), lines


def test_import_applies_ndjson_commands_reports_refusals_by_line_and_is_idempotent(
        tmp_path):
    import uuid

    from tests.e2e import payloads as p

    url = f"sqlite:///{tmp_path / 'import.db'}"
    first, second = p.participant_id(), p.participant_id()

    def body(type_, pid, data, **extra):
        return json.dumps({"command_id": str(uuid.uuid4()), "type": type_,
                           "participant_id": pid, "data": data, **extra})

    lines = [body("ScreenParticipant", first, p.screening()),
             body("RecordConsent", first, p.CONSENT),
             "",
             body("RandomizeParticipant", second, p.RANDOMIZE),  # never screened: refused
             "{not json",
             '{"command_id": "unterminated",',
             "caf\xe9".encode("latin-1").decode("utf-8", "surrogateescape"),
             body("RecordConsent", first, {**p.CONSENT, "signed_by": "someone"}),
             body("SignCasebook", first, {"meaning": "ok", "password": "x"}),
             body("ScreenParticipant", second, p.screening()),
             body("RandomizeParticipant", first, p.RANDOMIZE)]
    path = tmp_path / "commands.ndjson"
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    env = {"TRIALOG_DATABASE_URL": url, "TRIALOG_CIPHER_KEY": TEST_KEY}
    imported = run(["import", str(path), "--actor", "legacy-edc"], tmp_path, **env)
    assert imported.returncode == 1
    assert imported.stdout == "4 accepted, 0 repeated, 6 refused\n"
    refusals = imported.stderr.splitlines()
    assert refusals[0] == f"line 4: not_found: participant {second} not found"
    # Where in the line, not the decoder's own "line 1", which would contradict "line 5".
    assert refusals[1] == ("line 5: malformed_json: unexpected character, expected a "
                           "string key at character 2 of the line")
    assert refusals[2] == ("line 6: malformed_json: the line ends before its JSON value "
                           "does (each command is one JSON object on one line)")
    assert refusals[3] == "line 7: malformed_json: the line is not valid UTF-8"
    assert refusals[4] == ("line 8: validation_failed: data.signed_by: Must be one of: "
                           "participant, legal_representative.")
    assert refusals[5].startswith("line 9: forbidden: SignCasebook needs a person's own")
    again = run(["import", str(path)], tmp_path, **env)
    assert again.stdout == "0 accepted, 4 repeated, 6 refused\n"
    history = run(["audit", "history", first, "--format", "json"], tmp_path, **env)
    events = json.loads(history.stdout)["events"]
    assert [e["type"] for e in events] == ["ParticipantScreened", "ConsentRecorded",
                                           "ParticipantRandomized"]
    assert {e["actor"] for e in events} == {"legacy-edc"}


def test_make_demo_s_run_records_a_baseline_sample_for_every_randomized_participant(
        tmp_path):
    """What `make demo` runs (40 participants, seed 7): no command of it breaks a field's
    rule (the demo raises on one), and every randomized participant has its baseline
    blood sample (one was dated after the moment it was recorded, and silently refused)."""
    from infrastructure.cli.demo import run_demo
    from infrastructure.store.bootstrap import bootstrap
    from infrastructure.store.settings import Settings

    path = tmp_path / "trialog-demo.db"
    run_demo(path, 40, 7, show_progress=False)
    t = bootstrap(Settings.from_env({"TRIALOG_DATABASE_URL": f"sqlite:///{path}"}))
    try:
        with t.engine.connect() as connection:
            randomized = list(connection.execute(text(
                "select participant_id from rm_participants where arm is not null"))
                .scalars())
        assert len(randomized) > 20
        for pid in randomized:
            samples = t.service.get_participant(pid).records_of("BloodSampleCollected")
            assert any(d["timepoint"] == "baseline" for _, d in samples), pid
        # A visit flagged missed is marked missed, as the clock's scan does it: the demo's
        # completed participants showed a flagged week 6 `overdue` for good.
        with t.engine.connect() as connection:
            unmarked = connection.execute(text(
                "select v.participant_id, v.code from rm_visits v join rm_participants p "
                "on p.participant_id = v.participant_id where p.status = 'completed' "
                "and v.completed_on is null and not v.missed")).all()
            flagged = connection.execute(text(
                "select count(*) from rm_deviations where code = 'visit_missed'")).scalar()
        assert unmarked == [] and flagged > 0
    finally:
        t.close()


def test_settings_and_arguments_that_cant_work_are_one_line_naming_them(tmp_path):
    """Each refused before anything is done, with one line naming the setting or the
    argument (a batch size of 0 emptied the read models and reported success)."""
    sqlite = {"TRIALOG_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    for args, env, named in (
            (["audit", "verify"], {"TRIALOG_DATABASE_URL": "sqlite:///"},
             "TRIALOG_DATABASE_URL"),
            (["audit", "verify"], {"TRIALOG_DATABASE_URL":
                                   "postgresql://postgres@127.0.0.1:notaport/x"},
             "TRIALOG_DATABASE_URL"),
            (["reminders", "scan"], {**sqlite, "TRIALOG_SMTP_URL": "smtp://host:notaport"},
             "TRIALOG_SMTP_URL"),
            (["reminders", "scan"], {**sqlite, "TRIALOG_SMTP_URL": "http://x"},
             "TRIALOG_SMTP_URL"),
            (["reminders", "scan"], {**sqlite, "TRIALOG_REDIS_URL": "localhost:6379"},
             "TRIALOG_REDIS_URL"),
            (["projections", "rebuild", "--batch-size", "0"], sqlite, "--batch-size"),
            (["serve", "--port", "99999"], sqlite, "--port"),
            (["serve", "--workers", "-2"], sqlite, "--workers"),
            (["import", "x.ndjson", "--actor", ""], sqlite, "--actor"),
            (["import", "x.ndjson", "--actor", "evil\nactor"], sqlite, "--actor")):
        done = run(args, tmp_path, **env)
        assert done.returncode != 0, (args, done.stdout)
        assert named in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    wrong = run(["export", "xml"], tmp_path, **sqlite)  # argparse's own: once a usage too
    assert (wrong.returncode, wrong.stderr.count("\n")) == (2, 1), wrong.stderr
    assert wrong.stderr.startswith("trialog export: argument format: invalid choice: 'xml'")


def test_a_byte_order_mark_on_an_overlong_first_line_leaves_it_refused_whole(monkeypatch):
    """The mark was taken off before the line's length was looked at: a first line longer
    than the cap, read to the cap, was given as a whole line less the mark, and the rest
    of it as the next (imported if it held a command), every later number one too high."""
    from infrastructure.cli import imports

    monkeypatch.setattr(imports, "MAX_LINE", 20)
    lines = list(imports.capped_lines(io.BytesIO(
        b"\xef\xbb\xbf" + b"x" * 18 + b'{"type": "x"}\n{bad\n')))
    assert [type(line).__name__ for line in lines] == ["_TooLong", "bytes"]
    assert lines[1] == b"{bad\n"
    marked = list(imports.capped_lines(io.BytesIO(b"\xef\xbb\xbf" + b"y" * 10 + b"\nz\n")))
    assert marked == [b"y" * 10 + b"\n", b"z\n"]


@pytest.fixture
def empty_database() -> Iterator[str]:
    """The URL of a new database without tables (of its own: runs side by side don't
    share it), dropped after the test."""
    with fresh_postgres_database("trialog_no_tables") as name:
        yield f"{PG_SERVER}/{name}"


def test_a_database_without_tables_says_to_migrate_in_one_line(tmp_path, empty_database):
    url = empty_database
    done = run(["projections", "status"], tmp_path, TRIALOG_DATABASE_URL=url,
               TRIALOG_CIPHER_KEY=TEST_KEY, TRIALOG_ALLOCATION_SEED="s",
               TRIALOG_PSEUDONYM_KEY="p")
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "run `trialog db upgrade`" in done.stderr
    # An import said the database failed and to run it again; an export emptied its file.
    (tmp_path / "one.ndjson").write_text("{}\n")
    (tmp_path / "kept.csv").write_text("a previous export\n")
    for args in (["import", "one.ndjson"], ["import", "one.ndjson", "--jobs", "2"],
                 ["export", "csv", "--output", "kept.csv"]):
        done = run(args, tmp_path, TRIALOG_DATABASE_URL=url, TRIALOG_CIPHER_KEY=TEST_KEY,
                   TRIALOG_ALLOCATION_SEED="s", TRIALOG_PSEUDONYM_KEY="p")
        assert (done.returncode, done.stderr) == (1, f"trialog: {NO_TABLES}\n"), args
    assert (tmp_path / "kept.csv").read_text() == "a previous export\n"
    for args in (["audit", "verify"], ["token", "create", "--name", "t", "--role", "admin"],
                 ["reminders", "scan"]):
        done = run(args, tmp_path, TRIALOG_DATABASE_URL=url, TRIALOG_CIPHER_KEY=TEST_KEY,
                   TRIALOG_ALLOCATION_SEED="s", TRIALOG_PSEUDONYM_KEY="p")
        assert (done.returncode, done.stderr) == (1, f"trialog: {NO_TABLES}\n"), args
    inspected = create_engine(url)
    try:  # nothing made there (the library made its two event tables as a command started)
        assert inspect(inspected).get_table_names() == []
    finally:
        inspected.dispose()
    # A server started on it answered every request 500 and its followers logged a
    # traceback a second: it does not start, nor at an older migration.
    from infrastructure.store import migrations
    from infrastructure.store.bootstrap import bootstrap
    from infrastructure.store.settings import Settings

    secrets = {"TRIALOG_CIPHER_KEY": TEST_KEY, "TRIALOG_ALLOCATION_SEED": "s",
               "TRIALOG_PSEUDONYM_KEY": "p"}
    t = bootstrap(Settings.from_env({"TRIALOG_DATABASE_URL": url, **secrets}), migrate=False)
    database = t.engine
    for older in (None, "0028"):
        if older:
            migrations.upgrade(database, older)
        for workers in ("1", "2"):
            served = run(["serve", "--port", "0", "--workers", workers], tmp_path,
                         TRIALOG_DATABASE_URL=url, **secrets)
            assert (served.returncode, served.stdout) == (1, ""), served.stderr
            assert served.stderr == ("trialog: the database has no Trialog tables (or older "
                                     "ones): run `trialog db upgrade`\n")
    try:
        migrations.upgrade(database)
        assert not migrations.behind(database) and migrations.later(url) is None
        with database.begin() as connection:  # migrated by a later release than this one
            connection.execute(text(f"UPDATE {migrations.VERSION_TABLE} SET version_num = "
                                    "'9999'"))
        # A server of this release started there, and refused every caller once a
        # password had changed (an access register it can't read); nor does any other
        # command on the database, nor the workers, start there.
        ndjson = tmp_path / "none.ndjson"
        ndjson.write_text("")
        for args in (["serve", "--port", "0"], ["serve", "--port", "0", "--workers", "2"],
                     ["projections", "follow"], ["import", str(ndjson)],
                     ["projections", "rebuild"], ["reminders", "scan"],
                     ["token", "create", "--name", "late", "--role", "admin"]):
            refused = run(args, tmp_path, TRIALOG_DATABASE_URL=url, **secrets)
            assert (refused.returncode, refused.stdout) == (1, ""), refused.stderr
            assert refused.stderr == ("trialog: the database was migrated by a later release "
                                      "(revision 9999, which this one doesn't know): run "
                                      "that release\n")
        from tests.integration.test_cli_first_steps import celery

        worker = celery(["worker", "--pool", "solo"], tmp_path, 60, TRIALOG_DATABASE_URL=url,
                        **secrets)
        assert worker.returncode == 1 and "(revision 9999" in worker.stderr
        assert "Traceback" not in worker.stderr
    finally:
        with database.begin() as connection:
            connection.execute(text(f"UPDATE {migrations.VERSION_TABLE} SET version_num = "
                                    f"'{migrations.head()}'"))
        t.close()


def test_the_demo_never_replaces_a_file_that_is_not_its_own(tmp_path):
    notes = tmp_path / "trialog.db"
    notes.write_text("a real trial's file")
    refused = run(["demo", "--participants", "2", "--database", str(notes)], tmp_path)
    assert refused.returncode == 1 and "is not a demo's database" in refused.stderr
    assert notes.read_text() == "a real trial's file"
    own = tmp_path / "trialog-demo.db"
    for _ in range(2):  # its own file it makes again
        assert run(["demo", "--participants", "2", "--database", str(own)],
                   tmp_path).returncode == 0


def test_an_import_file_may_start_with_a_byte_order_mark(tmp_path):
    from tests.e2e import payloads as p

    url = f"sqlite:///{tmp_path / 'x.db'}"
    body = {"command_id": "6f1c1d8e-4b7a-4d52-9a3e-0f6a3c2b9d11", "type": "ScreenParticipant",
            "participant_id": p.participant_id(), "data": p.screening()}
    path = tmp_path / "with-bom.ndjson"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(body).encode() + b"\n")
    done = run(["import", str(path)], tmp_path, TRIALOG_DATABASE_URL=url)
    assert done.stdout == "1 accepted, 0 repeated, 0 refused\n", done.stderr


def test_output_to_a_closed_pipe_or_a_full_disk_ends_cleanly(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALOG_")}
    env.update(PYTHONPATH=str(ROOT), TRIALOG_DATABASE_URL=url)
    assert run(["db", "upgrade"], tmp_path, TRIALOG_DATABASE_URL=url).returncode == 0
    with open("/dev/full", "w") as full:
        done = subprocess.run(TRIALOG + ["export", "odm"], cwd=tmp_path, env=env,
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=120,
                              check=False)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "No space left on device" in done.stderr or "can't write" in done.stderr



def test_an_import_line_longer_than_the_api_takes_is_refused_without_being_held(tmp_path):
    """A line over 8 MiB (the API's largest body) is refused with its number, read a
    piece at a time; the lines around it are applied."""
    from tests.e2e import payloads as p

    url = f"sqlite:///{tmp_path / 'x.db'}"
    bodies = [{"command_id": str(uuid.uuid4()), "type": "ScreenParticipant",
               "participant_id": p.participant_id(), "data": p.screening()}
              for _ in range(2)]
    huge = b'{"pad": "' + b"x" * (8 * 2**20) + b'"}'
    path = tmp_path / "huge.ndjson"
    path.write_bytes(b"\n".join([huge, json.dumps(bodies[0]).encode(), huge + huge,
                                 json.dumps(bodies[1]).encode()]) + b"\n")
    done = run(["import", str(path)], tmp_path, TRIALOG_DATABASE_URL=url)
    assert done.stdout == "2 accepted, 0 repeated, 2 refused\n", done.stderr
    assert done.stderr.splitlines() == [
        f"line {n}: body_too_large: the line is longer than 8 MiB (the API takes no larger "
        "body)" for n in (1, 3)]


def test_a_reminders_scan_that_cannot_hand_its_reminders_over_fails_saying_so(tmp_path):
    """The scan is asked to hand the reminders due to the workers now; with the broker
    unreachable it printed `0 handed to the workers` and exited 0."""
    import socket
    from datetime import UTC, datetime, timedelta

    from domain import commands as c
    from infrastructure.store.bootstrap import bootstrap
    from tests.conftest import TEST_SECRETS, settings_for
    from tests.factories import consent, new_participant_id, screening
    from tests.integration.helpers import send

    url = f"sqlite:///{tmp_path / 'r.db'}"
    t = bootstrap(settings_for(url), migrate=True)
    try:
        # Week 6 opened yesterday by UTC's day: today or yesterday at the site.
        registered = datetime.now(UTC).date() - timedelta(days=36)
        pid = new_participant_id()
        send(t, c.ScreenParticipant(pid, screening()))
        send(t, c.RecordConsent(pid, consent()))
        send(t, c.RandomizeParticipant(pid, {"registered_on": registered}))
    finally:
        t.close()
    with socket.socket() as closed:  # a port no broker listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    done = run(["reminders", "scan"], tmp_path, TRIALOG_DATABASE_URL=url, **TEST_SECRETS,
               TRIALOG_REDIS_URL=f"redis://127.0.0.1:{port}/0")
    assert done.returncode == 1, done.stdout
    assert "handed to the workers" in done.stdout and " 0 handed" in done.stdout
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(
        "trialog: the workers' broker (TRIALOG_REDIS_URL) could not be reached")


def _screenings(path: Path, count: int) -> list[str]:
    """A file of ``count`` screenings of new participants; their ids."""
    from tests.e2e import payloads as p

    ids = [p.participant_id() for _ in range(count)]
    path.write_text("".join(json.dumps({
        "command_id": str(uuid.uuid4()), "type": "ScreenParticipant", "participant_id": pid,
        "data": p.screening()}) + "\n" for pid in ids))
    return ids


def test_an_import_or_export_with_another_cipher_key_is_refused_before_anything_is_done(
        tmp_path):
    """With another key, an import refused every line of a known participant as tampered
    with, and wrote the new ones' events where the store's own key can never read them
    (verify reported them for good, and their commands could not be sent again); the ODM
    export gave an empty document and exited 0."""
    import base64

    from tests.conftest import TEST_SECRETS
    from tests.databases import PG_SERVER, fresh_postgres_database

    with fresh_postgres_database("trialog_key") as name:
        right = {**TEST_SECRETS, "TRIALOG_DATABASE_URL": f"{PG_SERVER}/{name}"}
        assert run(["db", "upgrade"], tmp_path, **right).returncode == 0
        _screenings(tmp_path / "first.ndjson", 2)
        assert run(["import", "first.ndjson"], tmp_path, **right).returncode == 0
        newcomers = _screenings(tmp_path / "second.ndjson", 2)
        other = {**right, "TRIALOG_CIPHER_KEY": base64.b64encode(os.urandom(32)).decode()}
        refusal = ("trialog: TRIALOG_CIPHER_KEY: none of the store's oldest events decrypts "
                   "with it: it is not the key this store was written with (or they were "
                   "damaged: `trialog audit verify` tells); {}\n")
        for args, nothing in (
                (["import", "second.ndjson"], "nothing was imported"),
                (["import", "second.ndjson", "--jobs", "2"], "nothing was imported"),
                (["export", "odm"], "nothing was exported"),
                (["export", "fhir"], "nothing was exported"),
                # A revocation is an event of the store; the rest is sealed.
                (["token", "revoke", "someone"], "nothing was done"),
                (["token", "create", "--name", "x", "--role", "admin"], "nothing was done"),
                (["webhook", "add", "--url", "https://example.org/h"], "nothing was done"),
                (["reminders", "scan"], "nothing was done"),
                (["deviations", "scan"], "nothing was done"),
                (["serve", "--port", "0"], "the server does not start"),
                (["serve", "--port", "0", "--workers", "2"], "the server does not start")):
            done = run(args, tmp_path, **other)
            assert (done.returncode, done.stdout, done.stderr) == (
                1, "", refusal.format(nothing)), args
        verified = run(["audit", "verify", "--quiet"], tmp_path, **right)
        assert json.loads(verified.stdout)["events_checked"] == 2, verified.stdout
        assert run(["import", "second.ndjson", "--jobs", "2"], tmp_path, **right).stdout == (
            "2 accepted, 0 repeated, 0 refused\n")
        assert newcomers[0] in run(["export", "fhir"], tmp_path, **right).stdout


def test_an_import_in_processes_from_a_pipe_is_refused(tmp_path):
    """Each process read the pipe through: each got some of its lines, and the others'
    were lost (the counts said so only when a cut fell inside a line)."""
    from tests.conftest import TEST_SECRETS
    from tests.databases import PG_SERVER, fresh_postgres_database

    _screenings(tmp_path / "s.ndjson", 3)
    lines = (tmp_path / "s.ndjson").read_text()
    with fresh_postgres_database("trialog_pipe") as name:
        env = {**TEST_SECRETS, "TRIALOG_DATABASE_URL": f"{PG_SERVER}/{name}"}
        assert run(["db", "upgrade"], tmp_path, **env).returncode == 0
        piped = run_with_input(["import", "/dev/stdin", "--jobs", "2"], tmp_path, lines, **env)
        assert (piped.returncode, piped.stdout) == (1, "")
        assert piped.stderr == (
            "trialog: --jobs: 2 processes each read the whole file, and /dev/stdin is not a "
            "regular file (a pipe gives each line to one of them only): use --jobs 1, or a "
            "file\n")
        alone = run_with_input(["import", "/dev/stdin"], tmp_path, lines, **env)
        assert alone.stdout == "3 accepted, 0 repeated, 0 refused\n", alone.stderr


def test_an_export_after_an_import_holds_what_was_imported_and_replaces_its_file_whole(
        tmp_path):
    """The CSV and FHIR exports read the read models, which no server was following:
    after an import FHIR held nothing, exit 0. A file named by --output was emptied
    before the export could fail."""
    url = f"sqlite:///{tmp_path / 't.db'}"
    ids = _screenings(tmp_path / "s.ndjson", 3)
    assert run(["import", "s.ndjson"], tmp_path, TRIALOG_DATABASE_URL=url).returncode == 0
    subjects = run(["export", "fhir"], tmp_path, TRIALOG_DATABASE_URL=url).stdout
    assert sorted(json.loads(line)["identifier"][0]["value"]
                  for line in subjects.splitlines()) == sorted(ids)
    kept = tmp_path / "kept.ndjson"
    kept.write_text("a previous export\n")
    kept.chmod(0o640)
    later = {"TRIALOG_DATABASE_URL": url, "TRIALOG_CIPHER_KEY": TEST_KEY}  # another key
    assert run(["export", "fhir", "--output", "kept.ndjson"], tmp_path,
               **later).returncode == 1
    assert kept.read_text() == "a previous export\n"
    assert run(["export", "fhir", "--output", "kept.ndjson"], tmp_path,
               TRIALOG_DATABASE_URL=url).returncode == 0
    assert kept.read_text() == subjects and kept.stat().st_mode & 0o777 == 0o640
    assert run(["export", "fhir", "--output", "new.ndjson"], tmp_path,
               TRIALOG_DATABASE_URL=url).returncode == 0
    assert (tmp_path / "new.ndjson").stat().st_mode & 0o777 == 0o600  # made new: the owner's
    # A link: the file it names is replaced, the link kept; a pipe (or a device) is
    # written to, not replaced by a file.
    (tmp_path / "link.ndjson").symlink_to("kept.ndjson")
    kept.write_text("older\n")
    assert run(["export", "fhir", "--output", "link.ndjson"], tmp_path,
               TRIALOG_DATABASE_URL=url).returncode == 0
    assert (tmp_path / "link.ndjson").is_symlink() and kept.read_text() == subjects
    os.mkfifo(tmp_path / "pipe")
    with ThreadPoolExecutor(1) as pool:
        read = pool.submit((tmp_path / "pipe").read_text)
        assert run(["export", "fhir", "--output", "pipe"], tmp_path,
                   TRIALOG_DATABASE_URL=url).returncode == 0
        assert read.result(timeout=60) == subjects
    assert stat.S_ISFIFO((tmp_path / "pipe").stat().st_mode)
    # Standard output by its name (as /dev/stdout is), appended by the shell to a file:
    # written to, not put in the file's place.
    (tmp_path / "out").symlink_to("/proc/self/fd/1")
    log = tmp_path / "append.log"
    log.write_text("kept\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALOG_")}
    with open(log, "a") as appended:
        done = subprocess.run(TRIALOG + ["export", "fhir", "--output", "out"], cwd=tmp_path,
                              env={**env, "PYTHONPATH": str(ROOT), "TRIALOG_DATABASE_URL": url},
                              stdout=appended, check=False, timeout=120)
    assert done.returncode == 0 and log.read_text() == "kept\n" + subjects
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
    for wrong, why in (("nowhere/x.csv", "No such file or directory"),
                       (".", "Is a directory")):
        done = run(["export", "csv", "--output", wrong], tmp_path, TRIALOG_DATABASE_URL=url)
        assert (done.returncode, done.stderr) == (1, f"trialog: --output: {wrong}: {why}\n")


def test_an_export_whose_read_models_cant_be_brought_up_to_date_says_so_and_goes_on(
        tmp_path):
    """Bringing the read models up to date first made an export fail where it had given
    them as they stood (a role that may only read, a tail of the store that can't be
    read)."""
    url = f"sqlite:///{tmp_path / 't.db'}"
    [first] = _screenings(tmp_path / "s.ndjson", 1)
    assert run(["import", "s.ndjson"], tmp_path, TRIALOG_DATABASE_URL=url).returncode == 0
    before = run(["export", "fhir"], tmp_path, TRIALOG_DATABASE_URL=url).stdout
    assert first in before
    _screenings(tmp_path / "more.ndjson", 2)
    assert run(["import", "more.ndjson"], tmp_path, TRIALOG_DATABASE_URL=url).returncode == 0
    with create_engine(url).begin() as conn:  # the two new events, unreadable
        conn.execute(text("UPDATE trialog_events SET state = x'00' WHERE id > 1"))
    done = run(["export", "fhir"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert (done.returncode, done.stdout) == (0, before)
    assert done.stderr.startswith("trialog: warning: the read models could not be brought "
                                  "up to date (UnreadableStore: no event of this batch")
    assert done.stderr.endswith("; the CSV and FHIR exports give them as they stand\n")


def test_an_export_with_participants_the_read_models_set_aside_says_so(tmp_path):
    """The CSV and FHIR exports read the read models, which hold a participant set aside
    as it stood before the event that can't be applied (or not at all): they gave that
    as the record, exit 0, with nothing said (the ODM export reads the store)."""
    url = f"sqlite:///{tmp_path / 't.db'}"
    first, second = _screenings(tmp_path / "s.ndjson", 2)
    assert run(["import", "s.ndjson"], tmp_path, TRIALOG_DATABASE_URL=url).returncode == 0
    with create_engine(url).begin() as conn:  # the second's screening, unreadable
        conn.execute(text("UPDATE trialog_events SET state = x'00' WHERE id = 2"))
    setting_aside = run(["export", "fhir"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert "participant quarantined" in setting_aside.stderr  # said as it happens only
    for kind in ("fhir", "csv"):  # (the CSV's rows are visits: none here)
        done = run(["export", kind], tmp_path, TRIALOG_DATABASE_URL=url)
        assert done.returncode == 0
        assert kind == "csv" or (first in done.stdout and second not in done.stdout)
        assert done.stderr == (
            "trialog: warning: 1 participant set aside by the read models (an event of "
            "theirs can't be applied: `trialog projections status` names them) is given "
            "as they stood before it, or left out; the ODM export reads the store\n"), kind
    odm = run(["export", "odm"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert odm.returncode == 0 and "set aside" not in odm.stderr  # (it names the row)


def test_a_refusal_is_one_line_whatever_the_file_s_field_names_hold(tmp_path):
    """A field named with a line break printed as a refusal of another line, and a
    terminal's escape reached the terminal."""
    url = f"sqlite:///{tmp_path / 't.db'}"
    path = tmp_path / "f.ndjson"
    path.write_text(json.dumps({"command_id": str(uuid.uuid4()), "type": "LockCasebook",
                                "participant_id": "CASE-0004",
                                "data": {"a\nline 99: fake\u001b[31m\u0000": 1}}) + "\n")
    done = run(["import", "f.ndjson"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert done.stderr == ("line 1: validation_failed: data.a\\nline 99: fake\\x1b[31m\\x00: "
                           "Unknown field.\n")


def test_arguments_and_files_that_cant_work_are_named_in_one_line(tmp_path):
    """A version past any, a host that is no address, a SQLite store mistyped for a read
    (which made a new, empty file that verified `ok`), and a SQLite file a later release
    migrated each gave a library's words naming none of them."""
    url = f"sqlite:///{tmp_path / 't.db'}"
    assert run(["db", "upgrade"], tmp_path, TRIALOG_DATABASE_URL=url).returncode == 0
    huge = run(["audit", "history", "CASE-0001", "--version", "99999999999999999999"],
               tmp_path, TRIALOG_DATABASE_URL=url)
    assert (huge.returncode, huge.stderr) == (1, (
        "trialog: --version: 99999999999999999999 is not a version (they start at 1; at most "
        "2147483648)\n"))
    host = run(["serve", "--host", "nosuchhost.invalid", "--port", "0"], tmp_path,
               TRIALOG_DATABASE_URL=url)
    assert host.returncode == 1
    assert host.stderr.startswith("trialog: --host: 'nosuchhost.invalid' is no address")
    typo = f"sqlite:///{tmp_path / 'typo' / 'x.db'}"
    for args in (["audit", "verify"], ["audit", "history", "CASE-0001"], ["export", "csv"],
                 ["projections", "status"], ["reminders", "uncertain"]):
        done = run(args, tmp_path, TRIALOG_DATABASE_URL=typo)
        assert (done.returncode, done.stdout, done.stderr) == (1, "", (
            f"trialog: TRIALOG_DATABASE_URL: there is no SQLite file "
            f"{tmp_path / 'typo' / 'x.db'}: this command reads a store and makes none\n")), args
    assert not (tmp_path / "typo").exists()
    with create_engine(url).begin() as conn:
        conn.execute(text("UPDATE trialog_alembic_version SET version_num = '9999'"))
    for args in (["audit", "verify"], ["db", "upgrade"], ["import", "x.ndjson"],
                 ["serve", "--port", "0"], ["serve", "--port", "0", "--workers", "2"]):
        done = run(args, tmp_path, TRIALOG_DATABASE_URL=url)
        assert (done.returncode, done.stderr) == (1, (
            "trialog: the database was migrated by a later release (revision 9999, which "
            "this one doesn't know): run that release\n")), args


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_an_import_interrupted_says_so_in_one_line(tmp_path, jobs):
    """Ctrl-C printed a traceback (with --jobs, one from each process of the import: the
    terminal's signal reaches them all)."""
    import signal
    import time

    from tests.conftest import TEST_SECRETS
    from tests.databases import PG_SERVER, fresh_postgres_database

    _screenings(tmp_path / "s.ndjson", 20_000)
    with fresh_postgres_database("trialog_ctrl_c") as name:
        url = f"{PG_SERVER}/{name}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALOG_")}
        env.update(PYTHONPATH=str(ROOT), TRIALOG_DATABASE_URL=url, **TEST_SECRETS)
        assert run(["db", "upgrade"], tmp_path, **env).returncode == 0
        process = subprocess.Popen(TRIALOG + ["import", "s.ndjson", "--jobs", jobs],
                                   cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 60
        while not _written(url) and time.monotonic() < deadline:  # some written, then ^C
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)  # as a terminal does: the whole group
        out, err = process.communicate(timeout=60)
        assert (process.returncode, out) == (1, ""), err
        assert err == ("trialog: interrupted: the commands of the transaction it was writing "
                       "are not written: run the import again (what was written is recognised "
                       "by its command ids)\n")
        again = run(["import", "s.ndjson", "--jobs", jobs], tmp_path, **env)
        accepted, repeated = (int(n) for n in again.stdout.split()[0:3:2])
        assert (accepted + repeated, again.returncode) == (20_000, 0), again.stderr


def _written(url: str) -> bool:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return bool(conn.execute(text("SELECT count(*) FROM trialog_commands")).scalar())
    except Exception:  # noqa: BLE001 - locked by the writer: not yet known
        return False
    finally:
        engine.dispose()


def test_the_demo_s_store_opens_with_its_own_key_whatever_the_environment_holds(tmp_path):
    """With TRIALOG_CIPHER_KEY in the environment, the library encrypted the demo's events
    with it (it reads a setting under the application's name first) while the demo kept
    its own key beside its file: the printed `audit verify` then found no event it could
    decrypt."""
    import base64

    other = base64.b64encode(os.urandom(32)).decode()
    demo = run(["demo", "--participants", "2", "--seed", "1"], tmp_path,
               TRIALOG_CIPHER_KEY=other)
    assert demo.returncode == 0, demo.stderr
    verified = run(["audit", "verify", "--quiet"], tmp_path,
                   TRIALOG_DATABASE_URL=f"sqlite:///{tmp_path / 'trialog-demo.db'}")
    assert json.loads(verified.stdout)["ok"] is True, verified.stdout + verified.stderr


def test_a_run_forked_from_the_server_ends_as_one_started_from_the_shell(tmp_path):
    """The runner's runs (`tests.cli_runner`) read their input as the interpreter does (a
    carriage return kept) and end as it ends: a SQLite file's connections closed, so its
    write-ahead log folded in and removed (left behind, a test of the files left would
    have seen what the command never leaves)."""
    from infrastructure.store.bootstrap import bootstrap
    from infrastructure.store.people import reauthenticate
    from infrastructure.store.settings import Settings

    password = "a long enough pass\rword x"
    left = {}
    for how in ("forked", "shell"):
        folder = tmp_path / how
        folder.mkdir()
        args = ["user", "create", "--login", f"ann.{how}", "--name", "Ann", "--role",
                "admin", "--password-stdin"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALOG_")}
        env.update(TRIALOG_DATABASE_URL=f"sqlite:///{folder / 't.db'}")
        done = run_with_input(args, folder, password + "\n", **env) if how == "forked" else \
            subprocess.run(TRIALOG + args, cwd=folder, input=password + "\n", text=True,
                           capture_output=True, check=False, timeout=120,
                           env={**env, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, done.stderr
        left[how] = sorted(p.name for p in folder.iterdir())
        t = bootstrap(Settings.from_env(env))
        try:
            assert reauthenticate(t.engine, f"ann.{how}", password) == "Ann"
        finally:
            t.close()
    assert left["forked"] == left["shell"] == [
        "t.db", "t.db.key", "t.db.pseudonym-key", "t.db.seed"]
