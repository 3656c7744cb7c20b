"""Processes starting together on a new SQLite file (the embedded default migrates at
start): each creates what it finds missing, one at a time, and every one starts."""

from __future__ import annotations

import time
import traceback
from pathlib import Path

from tests.cli_runner import forked
from tests.conftest import settings_for


def _starts(url: str, ready: Path, processes: int, n: int) -> None:
    """Says it is here (a file of its own in ``ready``) and waits for the others to have
    said so too, then builds the application on the file and writes what it read."""
    from infrastructure.store.bootstrap import bootstrap

    (ready / str(n)).touch()
    while len(list(ready.iterdir())) < processes:
        time.sleep(0.001)
    said = ready.parent / f"{ready.name}-read-{n}"
    try:
        trialog = bootstrap(settings_for(url))
    except Exception:
        said.write_text(traceback.format_exc())
        raise
    try:
        said.write_text(repr(trialog.service.recorder.max_notification_id()))
    finally:
        trialog.close()


PROCESSES = 3


def test_processes_starting_together_on_a_new_file_all_start(tmp_path):
    for attempt in range(5):  # each a new file; the race was lost about half the time
        url = f"sqlite:///{tmp_path / f'new-{attempt}.db'}"
        ready = tmp_path / f"ready-{attempt}"
        ready.mkdir()
        processes = [forked(_starts, url, ready, PROCESSES, n) for n in range(PROCESSES)]
        for n, process in enumerate(processes):
            process.join(120)
            said = tmp_path / f"ready-{attempt}-read-{n}"
            assert process.exitcode == 0, said.exists() and said.read_text()[-2000:]
            assert said.read_text() in ("None", "0"), said.read_text()  # no event yet


def test_a_process_starting_on_a_file_with_every_table_takes_no_write_lock(tmp_path):
    """A file whose tables are all there and migrated: a process starts while another
    holds the write lock (a long import, say), without waiting for it."""
    import sqlite3

    from infrastructure.store.bootstrap import bootstrap
    from tests.conftest import settings_for

    path = tmp_path / "ready.db"
    bootstrap(settings_for(f"sqlite:///{path}")).close()
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # held: a lock asked for fails after 5 s
        trialog = bootstrap(settings_for(f"sqlite:///{path}"))
        try:
            assert trialog.service.recorder.max_notification_id() in (None, 0)
        finally:
            trialog.close()
    finally:
        writer.rollback()
        writer.close()


def test_the_switch_to_wal_waits_for_a_turn_another_process_holds(tmp_path):
    """SQLite refuses the switch at once ("database is locked", its busy wait not used)
    while another connection holds the file's write lock: a process whose switch came as
    another's turn began failed to start (seen in a suite run)."""
    import sqlite3
    import threading

    from sqlalchemy import create_engine

    from infrastructure.store.migrations import sqlite_turn

    path = tmp_path / "held.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")  # another process's turn, the file not in WAL yet
    releases = threading.Timer(0.5, lambda: holder.execute("COMMIT"))
    releases.start()
    engine = create_engine(f"sqlite:///{path}")
    try:
        with sqlite_turn(engine) as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        releases.join()
        holder.close()
        engine.dispose()
