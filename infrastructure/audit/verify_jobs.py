"""Deep verification in the background of the API: on a big store it takes longer than a
request may wait. One runs at a time for the whole deployment (a second request is pointed
to the running one). Its state is a row, so whichever API process a poll reaches answers
it; a check whose process stopped is marked failed once it has given no sign of life for
a while. A finished check's row is sealed (store.access_seals): one changed or made up
in the database by someone without the key (a report that says ok, say) is answered as
a failed check that fails its seal, never with its report."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    LargeBinary,
    String,
    Table,
    Text,
    or_,
    select,
    update,
)
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from infrastructure.audit.verification import check_store
from infrastructure.store.access_seals import seals_for
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.tables import as_utc, metadata

log = logging.getLogger("trialog.verify")

HEARTBEAT = 5.0  # seconds between a running check's signs of life
STALE = timedelta(seconds=60)  # no sign of life for this long: its process stopped
ABANDONED = {"message": "the process running the check stopped before it finished"}
UNSEALED = {"message": "the record of this check fails its seal: it was changed outside "
                       "trialog, and its report can't be trusted; start the check again"}

verify_jobs = Table(
    "trialog_verify_jobs",
    metadata,
    Column("job_id", String(36), primary_key=True),
    # True while the check runs, then NULL: unique, so that at most one runs at a time.
    Column("running", Boolean, nullable=True, unique=True),
    Column("status", String(16), nullable=False),  # running | done | failed
    Column("started_by", String(128), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("events_checked", BigInteger, nullable=False),
    Column("report", Text, nullable=True),  # JSON: the finished report, or why it failed
    Column("seal", LargeBinary, nullable=True),  # once finished: a keyed MAC of the row
)


def job_url(job_id: str) -> str:
    return f"/v1/audit/verify/jobs/{job_id}"


class _Progress:
    def __init__(self) -> None:
        self.events = 0

    def __call__(self, events: int) -> None:
        self.events += events


class VerifyJobs:
    """Starts deep checks in threads of this process and answers for any of them."""

    def __init__(self, trialog: Trialog) -> None:
        self.trialog = trialog
        self.engine = trialog.engine
        self.seals = seals_for(trialog.engine)

    def start(self, actor: str) -> dict[str, Any]:
        """The running check, as ``get`` answers: one started now unless one runs already."""
        self._fail_abandoned()
        while True:
            running = self._first(verify_jobs.c.running.is_(True))
            if running is not None:
                return self._answer(running)
            job = self._claim(actor)
            if job is not None:
                threading.Thread(target=self._run, args=(job["job_id"],), daemon=True,
                                 name=f"verify-{job['job_id'][:8]}").start()
                return _answer(job)

    def get(self, job_id: str) -> dict[str, Any] | None:
        self._fail_abandoned()
        job = self._first(verify_jobs.c.job_id == job_id)
        return None if job is None else self._answer(job)

    def _answer(self, job: Mapping[Any, Any]) -> dict[str, Any]:
        """The check as polled; a finished one only if its row holds its seal."""
        if job["status"] == "running":  # no report yet (one there is not shown)
            return _answer(job, report=False)
        if self.seals.verify_job_holds(SimpleNamespace(**job)):
            return _answer(job)
        log.warning("the record of deep verification %s fails its seal", job["job_id"])
        return {**_answer(job, report=False), "status": "failed", **UNSEALED}

    def _first(self, where: Any) -> RowMapping | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(verify_jobs).where(where)).first()
        return None if row is None else row._mapping

    def _claim(self, actor: str) -> dict[str, Any] | None:
        now = datetime.now(UTC)
        job = {"job_id": str(uuid.uuid4()), "running": True, "status": "running",
               "started_by": actor, "started_at": now, "heartbeat_at": now,
               "finished_at": None, "events_checked": 0, "report": None}
        try:
            with self.engine.begin() as connection:
                connection.execute(verify_jobs.insert().values(**job))
        except IntegrityError:  # another process started one first
            return None
        return job

    def _run(self, job_id: str) -> None:
        progress = _Progress()
        finished = threading.Event()
        threading.Thread(target=self._beat, args=(job_id, progress, finished), daemon=True,
                         name=f"verify-{job_id[:8]}-heartbeat").start()
        try:
            status, body = "done", check_store(self.trialog, progress=progress,
                                               deep=True).as_dict()
        except Exception as e:  # whoever polls is told; the details go to the log only
            log.exception("deep verification %s failed", job_id)
            status, body = "failed", {"message": f"the check stopped on {type(e).__name__} "
                                                 "(the server's log has the details)"}
        finally:
            finished.set()
        job = self._first(verify_jobs.c.job_id == job_id)
        if job is None:  # deleted meanwhile: nothing to record it in
            log.error("deep verification %s: its row is gone", job_id)
            return
        self._update(job_id, **self._finished(job, status, datetime.now(UTC),
                                              body.get("events_checked", progress.events),
                                              json.dumps(body)))

    def _finished(self, job: Mapping[Any, Any], status: str, at: datetime, events: int,
                  report: str, seal: bool = True) -> dict[str, Any]:
        """The values that end a check, sealed unless ``seal`` is false."""
        return {"running": None, "status": status, "finished_at": at, "events_checked": events,
                "report": report, "seal": self.seals.verify_job(
                    job["job_id"], status, job["started_by"], job["started_at"], at, events,
                    report) if seal else None}

    def _beat(self, job_id: str, progress: _Progress, finished: threading.Event) -> None:
        while not finished.wait(HEARTBEAT):
            self._update(job_id, verify_jobs.c.running.is_(True),
                         heartbeat_at=datetime.now(UTC), events_checked=progress.events)

    def _update(self, job_id: str, *where: Any, **values: Any) -> None:
        try:
            with self.engine.begin() as connection:
                connection.execute(update(verify_jobs)
                                   .where(verify_jobs.c.job_id == job_id, *where)
                                   .values(**values))
        except SQLAlchemyError:  # the next beat retries; a stale one is marked failed
            log.exception("can't record the state of deep verification %s", job_id)

    def _fail_abandoned(self) -> None:
        """Marks failed a check that gave no sign of life for a while, or whose sign of
        life is in the future (a row made up to keep every check from starting)."""
        now = datetime.now(UTC)
        stale = (verify_jobs.c.running.is_(True),
                 or_(verify_jobs.c.heartbeat_at < now - STALE,
                     verify_jobs.c.heartbeat_at > now + STALE))
        with self.engine.begin() as connection:
            for job in connection.execute(select(verify_jobs).where(*stale)).mappings().all():
                # One whose sign of life is in the future was never this server's: not
                # sealed, it is answered as a check that fails its seal.
                ours = as_utc(job["heartbeat_at"]) <= now + STALE
                connection.execute(
                    update(verify_jobs).where(verify_jobs.c.job_id == job["job_id"], *stale)
                    .values(**self._finished(job, "failed", now, job["events_checked"],
                                             json.dumps(ABANDONED), seal=ours)))


def _moment(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def _answer(job: Mapping[Any, Any], report: bool = True) -> dict[str, Any]:
    answer: dict[str, Any] = (json.loads(job["report"]) if job["report"] and report
                              else {})
    answer.update({  # the row's own, after the report's: a report says none of them
        "status": job["status"], "url": job_url(job["job_id"]), "job_id": job["job_id"],
        "started_by": job["started_by"], "started_at": _moment(job["started_at"]),
        "finished_at": _moment(job["finished_at"]), "events_checked": job["events_checked"]})
    return answer
