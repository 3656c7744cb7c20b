"""`make bench`: writes benchmarks/results.json and prints it."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from eventsourcing.application import Application

from benchmarks import audit, baseline, http, projection
from benchmarks import reminders as reminder_bench
from benchmarks.baseline import Ping
from benchmarks.http import p95_ms
from domain import commands as c
from infrastructure.audit.verification import verify
from infrastructure.readside.projections import TrialProjection
from infrastructure.store.bootstrap import Trialog, bootstrap
from infrastructure.store.settings import Settings
from tests.databases import fresh_postgres_database
from tests.factories import screening

PG_SERVER = os.environ.get("TRIALOG_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
KEY = "YmVuY2htYXJrLWtleS1iZW5jaG1hcmsta2V5LTMyYiE="
# The three secrets PostgreSQL requires, each its own (benchmarks only).
SECRETS = {"TRIALOG_CIPHER_KEY": KEY, "TRIALOG_ALLOCATION_SEED": "benchmark-allocation-seed",
           "TRIALOG_PSEUDONYM_KEY": "benchmark-pseudonym-key"}
N_COMMANDS = int(os.environ.get("TRIALOG_BENCH_COMMANDS", "1500"))
N_HTTP = int(os.environ.get("TRIALOG_BENCH_HTTP_COMMANDS", "2400"))
REBUILD_PARTICIPANTS = int(os.environ.get("TRIALOG_BENCH_REBUILD_PARTICIPANTS", "2000"))
RUNNER_EVENTS = int(os.environ.get("TRIALOG_BENCH_RUNNER_EVENTS", "3000"))
N_REMINDERS = int(os.environ.get("TRIALOG_BENCH_REMINDERS", "500"))
HISTORY_PARTICIPANTS = int(os.environ.get("TRIALOG_BENCH_HISTORY_PARTICIPANTS", "31"))
SCAN_PARTICIPANTS = int(os.environ.get("TRIALOG_BENCH_SCAN_PARTICIPANTS", "100000"))
RESULTS = Path(__file__).resolve().parent / "results.json"


@contextmanager
def database(kind: str, workdir: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A fresh database: our URL, and the raw library's settings for the same database."""
    if kind == "sqlite":
        path = workdir / f"bench-{uuid.uuid4().hex[:8]}.db"
        raw = workdir / f"raw-{uuid.uuid4().hex[:8]}.db"
        yield f"sqlite:///{path}", {"PERSISTENCE_MODULE": "eventsourcing.sqlite",
                                    "SQLITE_DBNAME": str(raw)}
        return
    with fresh_postgres_database("trialog_bench", PG_SERVER) as name:
        yield f"{PG_SERVER}/{name}", {
            "PERSISTENCE_MODULE": "eventsourcing.postgres", "POSTGRES_DBNAME": name,
            "POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": "5432", "POSTGRES_USER": "postgres",
            "POSTGRES_PASSWORD": ""}


def rate(n: int, run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return n / (time.perf_counter() - start)


def raw_single_event_saves(env: dict[str, str], n: int) -> float:
    app: Application[Any] = Application(env=env)
    try:
        return rate(n, lambda: [app.save(Ping()) for _ in range(n)])
    finally:
        app.close()


def raw_log_read(env: dict[str, str]) -> tuple[int, float]:
    app: Application[Any] = Application(env=env)
    try:
        count, position = 0, 0
        start = time.perf_counter()
        while page := app.recorder.select_notifications(position + 1, 1000):
            for notification in page:
                app.mapper.to_domain_event(notification)
            count += len(page)
            position = page[-1].id
        return count, count / (time.perf_counter() - start)
    finally:
        app.close()


def screen_commands(t: Trialog, n: int) -> None:
    data = screening()
    for _ in range(n):
        pid = f"CASE-{uuid.uuid4().hex[:12]}"
        t.bus.dispatch(c.ScreenParticipant(pid, data), command_id=str(uuid.uuid4()),
                       actor="bench")


def long_participant(t: Trialog, events: int) -> str:
    pid = f"CASE-{uuid.uuid4().hex[:12]}"
    send = lambda cmd: t.bus.dispatch(cmd, command_id=str(uuid.uuid4()), actor="bench")
    send(c.ScreenParticipant(pid, projection.early_screening()))
    send(c.RecordConsent(pid, projection.early_consent()))
    registered = projection.REGISTERED
    send(c.RandomizeParticipant(pid, {"registered_on": registered}))
    for day in range(events - 3):
        send(c.RecordDose(pid, {"taken_on": registered + timedelta(days=day), "taken": True,
                                "dose_mcg": 1000}))
    return pid


def result(name: str, value: float, unit: str, baseline_name: str, baseline: float,
           db: str) -> dict[str, Any]:
    return {"name": name, "value": round(value, 2), "unit": unit,
            "baseline_name": baseline_name, "baseline_value": round(baseline, 2),
            "ratio": round(value / baseline, 3) if baseline else None, "database": db}


def bench(kind: str, workdir: Path) -> list[dict[str, Any]]:
    results = []
    with database(kind, workdir) as (url, raw_env):
        settings = Settings.from_env({"TRIALOG_DATABASE_URL": url, **SECRETS})
        t = bootstrap(settings, migrate=True)
        try:
            screen_commands(t, 50)  # warm up connections and caches
            raw_single_event_saves(raw_env, 50)
            ours = rate(N_COMMANDS, lambda: screen_commands(t, N_COMMANDS))
            raw = raw_single_event_saves(raw_env, N_COMMANDS)
            results.append(result("commands_app", ours, "ev/s", "library_single_event_save",
                                  raw, kind))

            pid = long_participant(t, 500)
            loads = []
            for _ in range(40):
                start = time.perf_counter()
                t.service.get_participant(pid)
                loads.append(time.perf_counter() - start)
            _, raw_read = raw_log_read(raw_env)
            results.append(result("replay_500_p95_ms", p95_ms(loads), "ms",
                                  "library_log_read_ev_per_s", raw_read, kind))

            if kind == "sqlite":  # on PostgreSQL: measured over the 200k-event store below
                start = time.perf_counter()
                report = verify(t.service)
                verify_rate = report.events_checked / (time.perf_counter() - start)
                if not report.ok:
                    raise SystemExit(f"verify found problems: {report.problems}")
                library_read = baseline.library_store_read(settings, report.events_checked, 1,
                                                           decode=False)
                results.append(result("verify", verify_rate, "ev/s",
                                      "library_store_read_decrypt", library_read, kind))
            if kind == "postgresql":
                results += http_results(t, url, raw_env, workdir)
        finally:
            t.close()
    if kind == "postgresql":
        results += rebuild_results(workdir, raw_read)
        results += history_results(workdir, raw_read)
        results += reminder_results(workdir)
    return results


def reminder_results(workdir: Path) -> list[dict[str, Any]]:
    """Emails/s to a local SMTP sink; the daily scan over 100k participants."""
    port = http.free_port()
    sink = reminder_bench.smtp_sink_process(port)
    try:
        with database("postgresql", workdir) as (url, raw_env):
            settings = Settings.from_env({"TRIALOG_DATABASE_URL": url, **SECRETS,
                                          "TRIALOG_SMTP_URL": f"smtp://127.0.0.1:{port}"})
            t = bootstrap(settings, migrate=True)
            try:
                sent = reminder_bench.sends_per_second(t, settings.smtp_url, N_REMINDERS)
                raw = raw_single_event_saves(raw_env, N_REMINDERS)
                scan, found = reminder_bench.scan_ms(t, SCAN_PARTICIPANTS)
            finally:
                t.close()
    finally:
        sink.terminate()
    scan_row = result("reminder_scan_ms", scan, "ms", "library_single_event_save", raw,
                      "postgresql")
    scan_row["ratio"] = None
    scan_row.update(participants=SCAN_PARTICIPANTS, reminders_found=found)
    return [result("reminders", sent, "emails/s", "library_single_event_save", raw,
                   "postgresql"), scan_row]


def http_results(t: Trialog, url: str, raw_env: dict[str, str],
                 workdir: Path) -> list[dict[str, Any]]:
    with http.serving(url, SECRETS, t.engine, workdir) as (base, token):
        ours = http.http_commands(base, token, N_HTTP)
        raw = http.raw_concurrent_saves(raw_env, N_HTTP)
        bulk = http.bulk_import(base, token, 1000)
    return [
        result("commands_http", ours, "commands/s", "library_single_event_save_8_threads",
               raw, "postgresql"),
        result("bulk_import", bulk, "ev/s", "library_single_event_save_8_threads", raw,
               "postgresql"),
    ]


def rebuild_results(workdir: Path, raw_read: float) -> list[dict[str, Any]]:
    """Over >= 200k events in a fresh database: the rebuild beside the library's runner,
    verification, and the exports' peak memory."""
    with database("postgresql", workdir) as (url, _):
        settings = Settings.from_env({"TRIALOG_DATABASE_URL": url, **SECRETS})
        t = bootstrap(settings, migrate=True)
        try:
            projection.seed_participants(t, REBUILD_PARTICIPANTS, 100)
            events = TrialProjection(t).head()
            ours = projection.ours(t)
            runner = projection.library_runner(t, min(events, RUNNER_EVENTS))
            (verify_rate, processes), (verify_deep, deep_processes) = audit.verify_rates(t)
            # The library reading the same store, in as many processes as each check used.
            library_read = baseline.library_store_read(settings, events, processes, False)
            library_decode = baseline.library_store_read(settings, events, deep_processes, True)
            exports = {kind: audit.export_peak(url, SECRETS, kind, workdir)
                       for kind in ("odm", "fhir")}
        finally:
            t.close()
    row = result("projection_rebuild", ours, "ev/s", "library_projection_runner", runner,
                 "postgresql")
    row["events"] = events
    rows = [row,
            {**result("verify", verify_rate, "ev/s", "library_store_read_decrypt",
                      library_read, "postgresql"),
             "events": events, "processes": processes},
            {**result("verify_deep", verify_deep, "ev/s", "library_store_read_decode",
                      library_decode, "postgresql"),
             "events": events, "processes": deep_processes}]
    for kind, (peak, seconds, size) in exports.items():
        rows.append({**result(f"export_{kind}_peak_rss_mib", peak, "MiB", "", 0,
                              "postgresql"), "events": events,
                     "events_per_second": round(events / seconds), "bytes": size})
    return rows


def history_results(workdir: Path, raw_read: float) -> list[dict[str, Any]]:
    """History of 500-event participants over HTTP: the same participant read again and
    again (the contract's figure), and the first read of each of 30 participants; then the
    exports of this smaller store, for their peak memory beside the 200k-event one."""
    with database("postgresql", workdir) as (url, _):
        settings = Settings.from_env({"TRIALOG_DATABASE_URL": url, **SECRETS})
        t = bootstrap(settings, migrate=True)
        try:
            pids = projection.seed_participants(t, HISTORY_PARTICIPANTS, 500)
            TrialProjection(t).catch_up()  # the steady state: the API's followers are idle
            with http.serving(url, SECRETS, t.engine, workdir) as (base, token):
                cold = http.history_p95_ms(base, token, pids[1:])  # each read first
                warm = http.history_p95_ms(base, token, [pids[0]] * 62, warm_up=2)
            events = HISTORY_PARTICIPANTS * 500
            small = {kind: audit.export_peak(url, SECRETS, kind, workdir)[0]
                     for kind in ("odm", "fhir")}
        finally:
            t.close()
    rows = [result("history_p95_ms", warm, "ms", "library_log_read_ev_per_s", raw_read,
                   "postgresql"),
            result("history_first_read_p95_ms", cold, "ms", "library_log_read_ev_per_s",
                   raw_read, "postgresql")]
    for row in rows:
        row["ratio"] = None  # a latency beside a rate: no ratio
    rows += [{**result(f"export_{kind}_peak_rss_mib_small_store", peak, "MiB", "", 0,
                       "postgresql"), "events": events} for kind, peak in small.items()]
    return rows


def main() -> int:
    workdir = Path(os.environ.get("TRIALOG_BENCH_DIR", "/tmp/trialog-bench"))
    workdir.mkdir(parents=True, exist_ok=True)
    kinds = sys.argv[1:] or ["postgresql", "sqlite"]
    results = [r for kind in kinds for r in bench(kind, workdir)]
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
