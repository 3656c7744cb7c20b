"""The deep verify over HTTP runs in the background: a 202 pointing to the check, which the
client polls; one check at a time for the whole deployment."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
import sqlalchemy

from infrastructure.audit.verify_jobs import verify_jobs
from tests.e2e.conftest import Client
from tests.e2e.test_lifecycle import enrol


def finished(client: Client, started: requests.Response, timeout: float = 120) -> dict[str, Any]:
    """The body of a background check once it no longer runs, polled at its url."""
    deadline = time.monotonic() + timeout
    while True:
        answer = client.get(started.json()["url"])
        assert answer.status_code == 200, answer.text
        if answer.json()["status"] != "running":
            return answer.json()
        assert time.monotonic() < deadline, "the deep check did not finish"
        time.sleep(0.05)


@contextmanager
def job_of_another_process(database: str, heartbeat_at: datetime,
                           report: str | None = None) -> Iterator[str]:
    """A deep check recorded as running, as another API process would record it (or as
    someone could make one up in the database, with a ``report``)."""
    engine = sqlalchemy.create_engine(database)
    job_id = str(uuid.uuid4())
    deadline = time.monotonic() + 60
    while True:  # once a check that runs now (another test's) is over
        try:
            with engine.begin() as connection:
                connection.execute(verify_jobs.insert().values(
                    job_id=job_id, running=True, status="running",
                    started_by="another-process", started_at=heartbeat_at,
                    heartbeat_at=heartbeat_at, events_checked=0, report=report))
            break
        except sqlalchemy.exc.IntegrityError:
            assert time.monotonic() < deadline, "a deep check has been running for a minute"
            time.sleep(0.05)
    try:
        yield job_id
    finally:
        with engine.begin() as connection:
            connection.execute(verify_jobs.update().where(verify_jobs.c.job_id == job_id)
                               .values(running=None, status="failed"))
        engine.dispose()


def test_a_deep_verify_answers_202_and_its_job_ends_with_the_report(server):
    enrol(server.client("service"))  # the store has a participant to check
    auditor = server.client("auditor")
    started = auditor.get("/v1/audit/verify", deep="true")
    assert started.status_code == 202, started.text
    body = started.json()
    assert body["status"] in ("running", "done")
    assert body["url"] == f"/v1/audit/verify/jobs/{body['job_id']}"
    assert started.headers["Location"] == body["url"]
    report = finished(auditor, started)
    assert report["status"] == "done"
    assert report["ok"] is True and report["problems"] == [] and report["deep"] is True
    assert report["events_checked"] >= 3 and report["events_per_second"] > 0
    assert report["snapshots_passed_over"] >= 0  # counted on a deep check
    assert report["finished_at"] >= report["started_at"]


def test_the_plain_verify_still_answers_at_once(server):
    answer = server.client("auditor").get("/v1/audit/verify")
    assert answer.status_code == 200
    assert answer.json()["ok"] is True and answer.json()["deep"] is False


def test_a_deep_request_while_one_runs_is_pointed_to_it(server):
    with job_of_another_process(server.database, datetime.now(UTC)) as running:
        started = server.client("monitor").get("/v1/audit/verify", deep="true")
        assert started.status_code == 202
        assert started.json()["job_id"] == running
        assert started.headers["Location"] == f"/v1/audit/verify/jobs/{running}"
        polled = server.client("admin").get(started.json()["url"])
        assert polled.status_code == 200
        assert polled.json()["status"] == "running"
        assert polled.json()["started_by"] == "another-process"


def test_a_check_whose_process_stopped_is_failed_and_a_new_one_starts(server):
    long_ago = datetime.now(UTC) - timedelta(minutes=10)
    auditor = server.client("auditor")
    with job_of_another_process(server.database, long_ago) as abandoned:
        started = auditor.get("/v1/audit/verify", deep="true")
        assert started.status_code == 202
        assert started.json()["job_id"] != abandoned
        stopped = auditor.get(f"/v1/audit/verify/jobs/{abandoned}").json()
        assert stopped["status"] == "failed" and "stopped" in stopped["message"]
    assert finished(auditor, started)["status"] == "done"


def test_a_check_s_record_changed_or_made_up_in_the_database_shows_no_report(server):
    """A finished check is sealed: a report edited to say ok, or a check made up whole,
    is answered as failed, with why, never with its report."""
    auditor = server.client("auditor")
    done = finished(auditor, auditor.get("/v1/audit/verify", deep="true"))
    assert done["status"] == "done" and "ok" in done
    made_up = str(uuid.uuid4())
    engine = sqlalchemy.create_engine(server.database)
    now = datetime.now(UTC)
    with engine.begin() as connection:
        connection.execute(verify_jobs.update()
                           .where(verify_jobs.c.job_id == done["job_id"])
                           .values(report=verify_jobs.c.report + " "))
        connection.execute(verify_jobs.insert().values(
            job_id=made_up, running=None, status="done", started_by="auditor",
            started_at=now, heartbeat_at=now, finished_at=now, events_checked=10**6,
            report='{"ok": true, "problems": [], "deep": true}'))
    engine.dispose()
    for job_id in (done["job_id"], made_up):
        answer = auditor.get(f"/v1/audit/verify/jobs/{job_id}")
        assert answer.status_code == 200
        body = answer.json()
        assert (body["status"], body["job_id"], body["url"]) == (
            "failed", job_id, f"/v1/audit/verify/jobs/{job_id}")
        assert body["message"] == (
            "the record of this check fails its seal: it was changed outside trialog, and "
            "its report can't be trusted; start the check again")
        assert not {"ok", "problems", "deep"} & set(body)  # nothing of the report
        assert any(f"deep verification {job_id} fails its seal" in line
                   for line in server.log_lines())


def test_a_running_check_made_up_with_a_report_shows_none_and_blocks_no_check(server):
    """A made-up running row: its report is not shown (nor can it say the row's status),
    and a sign of life in the future does not keep it running."""
    forged = '{"status": "done", "ok": true, "problems": [], "deep": true}'
    auditor = server.client("auditor")
    with job_of_another_process(server.database, datetime.now(UTC), forged) as made_up:
        polled = auditor.get(f"/v1/audit/verify/jobs/{made_up}").json()
        assert polled["status"] == "running" and not {"ok", "problems"} & set(polled)
    future = datetime.now(UTC) + timedelta(days=3650)
    with job_of_another_process(server.database, future, forged) as made_up:
        started = auditor.get("/v1/audit/verify", deep="true")
        assert started.status_code == 202 and started.json()["job_id"] != made_up
        failed = auditor.get(f"/v1/audit/verify/jobs/{made_up}").json()
        assert failed["status"] == "failed"  # and not vouched for as abandoned
        assert failed["message"].startswith("the record of this check fails its seal")
    assert finished(auditor, started)["status"] == "done"


def test_an_unknown_check_is_a_404_and_the_service_role_may_not_verify(server):
    auditor, service = server.client("auditor"), server.client("service")
    assert auditor.get(f"/v1/audit/verify/jobs/{uuid.uuid4()}").status_code == 404
    assert auditor.get("/v1/audit/verify/jobs/not-a-uuid").status_code == 404
    assert service.get("/v1/audit/verify", deep="true").status_code == 403
    assert service.get(f"/v1/audit/verify/jobs/{uuid.uuid4()}").status_code == 403


def test_the_document_describes_the_background_check(server):
    document = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    verify = document["paths"]["/v1/audit/verify"]["get"]["responses"]
    started = verify["202"]
    assert started["content"]["application/json"]["schema"]["$ref"].endswith("/VerifyJob")
    assert "Location" in started["headers"]
    job = document["paths"]["/v1/audit/verify/jobs/{job_id}"]["get"]["responses"]
    assert set(job) >= {"200", "404"}
    assert job["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/VerifyJob")
