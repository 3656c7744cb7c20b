"""Processes starting together on a new SQLite file (the embedded default migrates at
start): each creates what it finds missing, one at a time, and every one starts."""

from __future__ import annotations

import subprocess
import sys

# Once imported, says so (a file of its own) and waits for the others to have said so too,
# then builds the application on the file and reads.
STARTS = r"""
import sys, time
from pathlib import Path
from infrastructure.store.bootstrap import bootstrap
from tests.conftest import settings_for
url, ready, processes = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
(ready / sys.argv[4]).touch()
while len(list(ready.iterdir())) < processes:
    time.sleep(0.001)
trialog = bootstrap(settings_for(url))
try:
    print(trialog.service.recorder.max_notification_id())
finally:
    trialog.close()
"""
PROCESSES = 3


def test_processes_starting_together_on_a_new_file_all_start(tmp_path):
    for attempt in range(5):  # each a new file; the race was lost about half the time
        url = f"sqlite:///{tmp_path / f'new-{attempt}.db'}"
        ready = tmp_path / f"ready-{attempt}"
        ready.mkdir()
        processes = [subprocess.Popen([sys.executable, "-c", STARTS, url, str(ready),
                                       str(PROCESSES), str(n)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
                     for n in range(PROCESSES)]
        for process in processes:
            out, err = process.communicate(timeout=120)
            assert process.returncode == 0, err[-2000:]
            assert out.strip() in ("None", "0"), out  # no event yet


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
