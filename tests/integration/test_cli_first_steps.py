"""What a newcomer sees on a first run of the command line."""

from __future__ import annotations

import re

from tests.integration.test_cli import TEST_KEY, run


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


def test_rebuild_prints_the_rate_of_the_whole_run(tmp_path):
    demo = run(["demo", "--participants", "6", "--seed", "2"], tmp_path)
    assert demo.returncode == 0, demo.stderr
    url = f"sqlite:///{tmp_path / 'trialog-demo.db'}"
    rebuilt = run(["projections", "rebuild", "--quiet"], tmp_path, TRIALOG_DATABASE_URL=url)
    assert rebuilt.returncode == 0, rebuilt.stderr
    found = re.search(r"trial: (\d+) events applied \(([\d,]+) events/s\)", rebuilt.stderr)
    assert found is not None and int(found.group(1)) > 0
    assert int(found.group(2).replace(",", "")) > 0
