"""The read-model projection: exactly once under concurrent writers, the same tables after
a rebuild, and after a crash mid-batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, insert, select

from domain import commands as c
from infrastructure.readside.projections import LogFollower, TrialProjection
from infrastructure.store.tables import READ_MODELS, participants
from tests.conftest import TEST_SECRETS
from tests.factories import consent
from tests.integration.helpers import dose, enrol, send

TRIALOG = str(Path(sys.executable).with_name("trialog"))
applied_table = Table("test_applied", MetaData(), Column("id", Integer, primary_key=True))


class Recorder(LogFollower):
    """Writes every notification id it is given, in the batch's transaction: a second
    application of one id breaks the primary key."""

    name = "test_recorder"
    topic_prefix = ""

    def apply(self, session, batch) -> None:
        if batch:
            session.execute(insert(applied_table), [{"id": position} for position, _ in batch])


def snapshot(t) -> dict[str, list[tuple]]:
    with t.engine.connect() as connection:
        return {table.name: sorted(tuple(row) for row in connection.execute(select(table)))
                for table in READ_MODELS}


def workload(t, participants_: int = 6) -> None:
    for _ in range(participants_):
        pid = enrol(t)
        for day in range(4):
            send(t, c.RecordDose(pid, dose(day)))
        send(t, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": dose(0)["taken_on"],
                                      "bpi_sf": {"worst": 6, "least": 2, "average": 4,
                                                 "now": 4}}))
    send(t, c.WithdrawParticipant(pid, {"withdrawn_on": dose(5)["taken_on"],
                                        "scope": "treatment", "reason_code": "toxicity"}))


def stored_versions(t) -> dict[str, int]:
    with t.engine.connect() as connection:
        return dict(connection.execute(select(participants.c.participant_id,
                                              participants.c.version)).all())


@pytest.mark.parametrize("isolated_url", ["postgresql"], indirect=True)
def test_a_live_follower_applies_every_event_once_under_8_concurrent_writers(isolated):
    applied_table.create(isolated.engine)
    recorder, projection = Recorder(isolated, batch_size=50), TrialProjection(isolated, 50)
    stop = threading.Event()
    followers = [threading.Thread(target=f.follow, args=(stop,)) for f in (recorder, projection)]
    for thread in followers:
        thread.start()
    with ThreadPoolExecutor(8) as writers:
        pids = list(writers.map(lambda _: _write_one(isolated), range(80)))
    deadline = time.monotonic() + 60
    while min(recorder.position(), projection.position()) < recorder.head():
        assert time.monotonic() < deadline, "the followers did not catch up"
        time.sleep(0.05)
    stop.set()
    for thread in followers:
        thread.join()

    with isolated.engine.connect() as connection:
        every_id = set(connection.execute(select(recorder.events_table.c.id)).scalars())
        applied = list(connection.execute(select(applied_table.c.id)).scalars())
    assert len(every_id) > 80 * 8
    assert sorted(applied) == sorted(every_id)  # none skipped, none twice (primary key)
    versions = stored_versions(isolated)
    assert {pid: versions[pid] for pid in pids} == {
        pid: isolated.service.get_participant(pid).version for pid in pids}


def _write_one(t) -> str:
    pid = enrol(t)
    for day in range(5):
        send(t, c.RecordDose(pid, dose(day)))
    return pid


def test_a_rebuild_gives_row_for_row_the_live_built_tables(isolated):
    projection = TrialProjection(isolated, batch_size=7)
    workload(isolated)
    projection.catch_up()
    live = snapshot(isolated)
    assert len(live["rm_participants"]) == 6 and len(live["rm_visits"]) == 6 * 4
    assert projection.rebuild() == projection.head()
    assert snapshot(isolated) == live


def test_a_participant_changed_elsewhere_is_read_back_not_taken_from_the_cache(isolated):
    first, second = TrialProjection(isolated), TrialProjection(isolated)
    pid = enrol(isolated)
    first.catch_up()  # caches the participant at version 3
    send(isolated, c.RecordConsent(pid, consent()))
    second.catch_up()  # another process applies version 4
    send(isolated, c.RecordDose(pid, dose(0)))
    first.catch_up()  # version 5: the cached version 3 is stale
    assert stored_versions(isolated)[pid] == 5
    live = snapshot(isolated)
    TrialProjection(isolated).rebuild()
    assert snapshot(isolated) == live


@pytest.mark.parametrize("isolated_url", ["postgresql", "sqlite"], indirect=True)
def test_a_follower_killed_mid_batch_resumes_to_the_same_tables(isolated, isolated_url):
    for _ in range(4):
        workload(isolated, participants_=10)
    projection = TrialProjection(isolated)
    head = projection.head()
    env = {**os.environ, "TRIALOG_DATABASE_URL": isolated_url, **TEST_SECRETS}
    command = [TRIALOG, "projections", "follow", "--batch-size", "20"]
    follower = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 60
    while projection.position() == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    follower.send_signal(signal.SIGKILL)
    follower.wait()
    assert 0 < projection.position() < head  # it was killed part-way

    restarted = subprocess.Popen(command, env=env)
    try:
        while projection.position() < head:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        restarted.terminate()
        restarted.wait(timeout=10)
    resumed = snapshot(isolated)
    projection.rebuild()
    assert snapshot(isolated) == resumed


def test_followers_starting_together_create_their_position_row_once(trialog):
    """Several API processes start their followers at once on a fresh database: the one
    that loses the race to create the position row carries on (no error)."""
    import threading
    import uuid

    from infrastructure.readside.projections import TrialProjection

    name = f"race-{uuid.uuid4().hex[:8]}"
    start, errors = threading.Barrier(6), []

    def begin() -> None:
        follower = TrialProjection(trialog)
        follower.name = name
        start.wait()
        try:
            follower.ensure_position()
        except Exception as e:  # noqa: BLE001 - the test reports any
            errors.append(e)

    threads = [threading.Thread(target=begin) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    follower = TrialProjection(trialog)
    follower.name = name
    assert follower.position() == 0
