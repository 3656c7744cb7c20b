"""The command line, run as a user runs it (a subprocess, real files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine, text

from tests.conftest import TEST_KEY

TRIALOG = [sys.executable, "-m", "infrastructure.cli"]
ROOT = Path(__file__).resolve().parents[2]


def run(args, cwd, **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALOG_")}
    full_env.update(env)
    full_env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(TRIALOG + args, cwd=cwd, env=full_env, capture_output=True, check=False,
                          text=True, timeout=240)


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
    missing = run(["audit", "history", "CASE-9999"], tmp_path,
                  TRIALOG_DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}", TRIALOG_CIPHER_KEY=TEST_KEY)
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0
    assert "CASE-9999" in missing.stderr
    bad_url = run(["audit", "verify"], tmp_path, TRIALOG_DATABASE_URL="mysql://nope")
    assert bad_url.returncode == 1
    assert bad_url.stderr.startswith("trialog: TRIALOG_DATABASE_URL")
    no_key = run(["audit", "verify"], tmp_path,
                 TRIALOG_DATABASE_URL="postgresql://postgres@127.0.0.1/test")
    assert no_key.returncode == 1 and "TRIALOG_CIPHER_KEY" in no_key.stderr


def test_token_create_prints_the_token_alone_and_keeps_only_its_hash(tmp_path):
    url = f"sqlite:///{tmp_path / 't.db'}"
    created = run(["token", "create", "--name", "lab-system", "--role", "service"], tmp_path,
                  TRIALOG_DATABASE_URL=url)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert created.stdout == token + "\n" and len(token) > 30
    with create_engine(url).connect() as conn:
        stored = conn.execute(text("SELECT name, role, token_hash FROM trialog_tokens")).all()
    assert [(name, role) for name, role, _ in stored] == [("lab-system", "service")]
    assert token not in stored[0][2]
    again = run(["token", "create", "--name", "lab-system", "--role", "admin"], tmp_path,
                TRIALOG_DATABASE_URL=url)
    assert again.returncode == 1 and "already exists" in again.stderr
    bad_role = run(["token", "create", "--name", "x", "--role", "root"], tmp_path,
                   TRIALOG_DATABASE_URL=url)
    assert bad_role.returncode != 0 and "--role" in bad_role.stderr


def test_projections_rebuild_and_status_report_positions(tmp_path):
    assert run(["demo", "--participants", "6", "--seed", "2"], tmp_path).returncode == 0
    url = f"sqlite:///{tmp_path / 'trialog-demo.db'}"
    status = run(["projections", "status"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert status.returncode == 0, status.stderr
    lines = {line.split()[0]: line.split() for line in status.stdout.splitlines()}
    # Every follower of the log, and the clock-driven scan.
    assert set(lines) == {"trial", "deviation_monitor", "deviation_scan"}
    _, _, position, _, lag, _, quarantined = lines["trial"]
    assert (lag, quarantined) == ("0", "0") and int(position) > 0
    rebuilt = run(["projections", "rebuild"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert f"trial: {position} events applied" in rebuilt.stderr
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
    for original, masked_row in zip(rows, hidden, strict=True):
        assert original["bpi_severity"] == masked_row["bpi_severity"]
        if original["completed_on"]:
            shift = (date.fromisoformat(original["completed_on"])
                     - date.fromisoformat(masked_row["completed_on"])).days
            assert 1 <= shift <= 365


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
