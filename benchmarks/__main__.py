"""`make bench`: writes benchmarks/results.json and prints it."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from eventsourcing.application import Application

from benchmarks import audit, baseline, cpu, http, management, projection
from benchmarks import console as console_bench
from benchmarks import feed as feed_bench
from benchmarks import reminders as reminder_bench
from benchmarks.baseline import Ping, read_whole_log
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
HISTORY_WARM_UP = 15
# Loads of the 500-event participant: of 40, the p95 was the second or third slowest, so
# two pauses of the machine's set it.
N_REPLAYS = int(os.environ.get("TRIALOG_BENCH_REPLAYS", "200"))
HISTORY_PARTICIPANTS = 1 + HISTORY_WARM_UP + int(os.environ.get(
    "TRIALOG_BENCH_HISTORY_PARTICIPANTS", "30"))
N_SESSIONS = int(os.environ.get("TRIALOG_BENCH_SESSIONS", "50"))
SCAN_PARTICIPANTS = int(os.environ.get("TRIALOG_BENCH_SCAN_PARTICIPANTS", "100000"))
# Participants of `trialog import`'s file (two commands each).
IMPORT_PARTICIPANTS = int(os.environ.get("TRIALOG_BENCH_IMPORT_PARTICIPANTS", "20000"))
MANAGEMENT_ROUNDS = int(os.environ.get("TRIALOG_BENCH_MANAGEMENT_ROUNDS", "6"))
MANAGEMENT_EACH = int(os.environ.get("TRIALOG_BENCH_MANAGEMENT_EACH", "12"))
MANAGEMENT_RECORD = int(os.environ.get("TRIALOG_BENCH_MANAGEMENT_RECORD", "12"))
N_QUERIES = int(os.environ.get("TRIALOG_BENCH_QUERIES", "10000"))
QUERY_PARTICIPANTS = int(os.environ.get("TRIALOG_BENCH_QUERY_PARTICIPANTS", "320"))
N_QUERY_LISTS = int(os.environ.get("TRIALOG_BENCH_QUERY_LISTS", "50"))
CONSOLE_PARTICIPANTS = int(os.environ.get("TRIALOG_BENCH_CONSOLE_PARTICIPANTS", "30"))
CONSOLE_WARM_UP = 4  # pages viewed first, not counted: each server process compiles its templates
FEED_PARTICIPANTS = int(os.environ.get("TRIALOG_BENCH_FEED_PARTICIPANTS", "1000"))
FEED_EVENTS_EACH = int(os.environ.get("TRIALOG_BENCH_FEED_EVENTS_EACH", "50"))
N_WEBHOOK_DELIVERIES = int(os.environ.get("TRIALOG_BENCH_WEBHOOK_DELIVERIES", "5000"))
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
        return read_whole_log(app)
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
            for _ in range(N_REPLAYS):
                start = time.perf_counter()
                t.service.get_participant(pid)
                loads.append(time.perf_counter() - start)
            _, raw_read = raw_log_read(raw_env)
            results.append({**result("replay_500_p95_ms", p95_ms(loads), "ms",
                                     "library_log_read_ev_per_s", raw_read, kind),
                            "loads": N_REPLAYS,
                            "median_ms": round(statistics.median(loads) * 1000, 2)})

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
            else:
                results.append(sqlite_http_result(t, url, raw_env, workdir))
        finally:
            t.close()
    if kind == "postgresql":
        results += rebuild_results(workdir, raw_read)
        results += history_results(workdir, raw_read)
        results += reminder_results(workdir)
        results += management_results(workdir)
        results += feed_results(workdir)
        results += console_results(workdir)
        # Last: its 80k events leave PostgreSQL busy (autovacuum) for a while after it.
        results += import_results(workdir)
    return results


def import_results(workdir: Path) -> list[dict[str, Any]]:
    """`trialog import --jobs 2` (and, for comparison, one process), each into a fresh
    database with no server running (a trial migrated before it goes live), beside the
    library saving 100 events a transaction into the same database just before and just
    after it (their mean). The read models catch up afterwards (`projection_rebuild`)."""
    found = {jobs: _import_run(workdir, jobs) for jobs in (2, 1)}
    (two, library), (one, library_one) = found[2], found[1]
    return [{**result("bulk_import_cli", two, "ev/s", "library_100_events_per_save",
                      library, "postgresql"),
             "jobs": 2, "one_process_per_second": round(one, 1),
             "one_process_ratio": round(one / library_one, 3),
             "commands": 2 * IMPORT_PARTICIPANTS}]


def _import_run(workdir: Path, jobs: int) -> tuple[float, float]:
    """The import's rate and its baseline's (see import_results)."""
    with database("postgresql", workdir) as (url, raw_env):
        bootstrap(Settings.from_env({"TRIALOG_DATABASE_URL": url, **SECRETS}),
                  migrate=True).close()
        http.raw_batched_saves(raw_env, 1000)  # warm up
        before = http.raw_batched_saves(raw_env, IMPORT_PARTICIPANTS)
        imported = http.cli_import(url, SECRETS, workdir, IMPORT_PARTICIPANTS, jobs)
        after = http.raw_batched_saves(raw_env, IMPORT_PARTICIPANTS)
    print(f"bulk_import_cli --jobs {jobs}: {imported:.0f} ev/s; library {before:.0f} before, "
          f"{after:.0f} after", file=sys.stderr)
    return imported, (before + after) / 2


def console_results(workdir: Path) -> list[dict[str, Any]]:
    """The console's participant page of 500-event participants, each viewed once (a first
    view), by a monitor, then by a coordinator on participants of their own (see
    benchmarks/console.py); the read side caught up before the server starts, and a few
    other participants' pages viewed first by each, so that each server process has
    compiled its templates (no measured participant has been seen)."""
    events = 500
    with database("postgresql", workdir) as (url, _):
        t = bootstrap(Settings.from_env({"TRIALOG_DATABASE_URL": url, **SECRETS}),
                      migrate=True)
        try:
            pids = projection.seed_participants(
                t, 2 * CONSOLE_PARTICIPANTS + CONSOLE_WARM_UP, events)
            feed_bench.catch_up(t)  # the read models and the feed's pages: followers idle
            warm_up, pids = pids[:CONSOLE_WARM_UP], pids[CONSOLE_WARM_UP:]
            with http.serving(url, SECRETS, t.engine, workdir) as (base, _):
                sessions = {role: console_bench.signed_in(base, t.engine, role)
                            for role in ("monitor", "coordinator")}
                for session in sessions.values():
                    console_bench.first_views(base, session, warm_up, events)
                views = {role: console_bench.first_views(base, sessions[role], chunk, events)
                         for role, chunk in (("monitor", pids[:CONSOLE_PARTICIPANTS]),
                                             ("coordinator", pids[CONSOLE_PARTICIPANTS:]))}
        finally:
            t.close()
    return [
        {**result("console_page_p95_ms", views["monitor"]["p95_ms"], "ms", "", 0,
                  "postgresql"),
         "baseline_name": None, "baseline_value": None, "ratio": None,
         "record_events": events, "role": "monitor (no contact details)", **views["monitor"]},
        {**result("console_page_contact_p95_ms", views["coordinator"]["p95_ms"], "ms", "", 0,
                  "postgresql"),
         "baseline_name": None, "baseline_value": None, "ratio": None,
         "record_events": events, "role": "coordinator (contact details read and the "
                                           "disclosure recorded)", **views["coordinator"]},
    ]


def feed_results(workdir: Path) -> list[dict[str, Any]]:
    """On a fresh database of FEED_PARTICIPANTS x FEED_EVENTS_EACH events (half CASE, half
    METRO): GET /v1/feed paged from 0 to the end, 1,000 positions a request, by one
    client, each read the first of a fresh `trialog serve` (an every-site admin token,
    then a CASE service token); then N_WEBHOOK_DELIVERIES webhook deliveries to a local
    receiver. Beside them, the raw library's PostgreSQL recorder reading the same store's
    notification log (see benchmarks/feed.py), read three times between the figures."""
    with database("postgresql", workdir) as (url, raw_env):
        t = bootstrap(Settings.from_env({"TRIALOG_DATABASE_URL": url, **SECRETS}),
                      migrate=True)
        try:
            f = feed_bench.figures(t, url, raw_env, SECRETS, workdir, FEED_PARTICIPANTS,
                                   FEED_EVENTS_EACH, N_WEBHOOK_DELIVERIES)
        finally:
            t.close()
    print(f"feed store: {f['events']} events built and projected in "
          f"{f['built_seconds']:.1f} s", file=sys.stderr)
    library, rows = f["library"], []
    for name, read in f["reads"].items():
        value = read["events"] / read["seconds"]
        row = result(name, value, "ev/s", "library_log_read", library, "postgresql")
        if name == "feed_read_scoped":  # as commands_http_scoped: beside the every-site read
            every = f["reads"]["feed_read"]
            row.update(result(name, value, "ev/s", "feed_read",
                              every["events"] / every["seconds"], "postgresql"),
                       library_log_read=round(library, 2),
                       token="service role scoped to CASE (no contact details)")
        else:
            row["token"] = "admin, every site"
        rows.append({**row, "store_events": f["events"], "events_received": read["events"],
                     "positions_per_s": round(read["positions"] / read["seconds"], 2),
                     "requests": read["requests"], "limit": feed_bench.MAX_LIMIT,
                     "server_share": round(read["server_seconds"] / read["seconds"], 3),
                     "library_log_read_rounds": [round(r) for r in f["library_rates"]]})
    rows.append({**result("webhook_deliveries", f["deliveries"] / f["delivery_seconds"],
                          "deliveries/s", "library_log_read", library, "postgresql"),
                 "deliveries": f["deliveries"], "subscriptions": 1,
                 "level": "webhooks.deliver() in this process (what one deliver_webhook "
                          "task runs), a fresh Feed; receiver: a threaded HTTP server in "
                          "another process answering 204",
                 "library_log_read_rounds": [round(r) for r in f["library_rates"]]})
    return rows


def management_results(workdir: Path) -> list[dict[str, Any]]:
    """On a fresh database: GET /v1/queries over N_QUERIES queries (built with the
    aggregate's methods, the read side caught up before the server starts), then the
    data-management commands beside CompleteVisit through the bus (see
    benchmarks/management.py)."""
    with database("postgresql", workdir) as (url, _):
        t = bootstrap(Settings.from_env({"TRIALOG_DATABASE_URL": url, **SECRETS}),
                      migrate=True)
        try:
            start = time.perf_counter()
            management.seed_queries(t, N_QUERIES, QUERY_PARTICIPANTS)
            feed_bench.catch_up(t)  # the read side and the feed's pages: followers idle
            built = time.perf_counter() - start
            counts = management.query_counts(t)
            if sum(counts.values()) != N_QUERIES:
                raise SystemExit(f"the read side lists {counts} queries, not {N_QUERIES}")
            with http.serving(url, SECRETS, t.engine, workdir) as (base, _):
                lists = management.queries_list_p95_ms(base, management.reader_token(t),
                                                       N_QUERY_LISTS, N_QUERIES)
            screen_commands(t, 50)  # warm up, as bench() does first
            figures = management.management_commands(t, MANAGEMENT_ROUNDS, MANAGEMENT_EACH,
                                                     MANAGEMENT_RECORD)
        finally:
            t.close()
    print(f"queries store: {N_QUERIES} queries built and projected in {built:.1f} s",
          file=sys.stderr)
    return [
        {**result("management_commands", figures["management"], "commands/s",
                  "complete_visit", figures["complete_visit"], "postgresql"),
         "level": "command bus (as commands_app); SignVisit without the API's Argon2 "
                  "re-authentication",
         "mix": sorted(management.MIX), "record_events": MANAGEMENT_RECORD,
         "rounds": MANAGEMENT_ROUNDS, "round_ratios": figures["round_ratios"],
         "per_type": figures["per_type"]},
        {**result("queries_list_p95_ms", lists["default"]["p95_ms"], "ms", "", 0,
                  "postgresql"),
         "baseline_name": None, "baseline_value": None, "ratio": None,
         "queries": N_QUERIES, "participants": QUERY_PARTICIPANTS, "statuses": counts,
         "requests": N_QUERY_LISTS, "page": 100, "lists": lists},
    ]


def reminder_results(workdir: Path) -> list[dict[str, Any]]:
    """Emails/s to a local SMTP sink; the daily scan over 100k participants."""
    port = http.free_port()
    sink = reminder_bench.smtp_sink_process(port)
    # The same number of reminders again, just after, to the test suite's SMTP server, for
    # comparison (see smtp_sink_process: on this machine the sink's CPU is the senders').
    # Its port is asked for once the first sink holds its own: never the same.
    other_port = http.free_port()
    other_sink = reminder_bench.smtp_sink_process(other_port, "aiosmtpd")
    try:
        with database("postgresql", workdir) as (url, raw_env):
            settings = Settings.from_env({"TRIALOG_DATABASE_URL": url, **SECRETS,
                                          "TRIALOG_SMTP_URL": f"smtp://127.0.0.1:{port}"})
            t = bootstrap(settings, migrate=True)
            try:
                env = {"TRIALOG_DATABASE_URL": url, **SECRETS,
                       "TRIALOG_SMTP_URL": f"smtp://127.0.0.1:{port}"}
                chunked, with_start_up = reminder_bench.chunked_sends_per_second(
                    t, env, N_REMINDERS * 4)
                to_aiosmtpd, _ = reminder_bench.chunked_sends_per_second(
                    t, env | {"TRIALOG_SMTP_URL": f"smtp://127.0.0.1:{other_port}"},
                    N_REMINDERS * 4)
                sent = reminder_bench.sends_per_second(t, settings.smtp_url, N_REMINDERS)
                raw = raw_single_event_saves(raw_env, N_REMINDERS)
                scan, found = reminder_bench.scan_ms(t, SCAN_PARTICIPANTS)
            finally:
                t.close()
    finally:
        for process in (sink, other_sink):
            process.terminate()
            process.join(10)
    scan_row = result("reminder_scan_ms", scan, "ms", "library_single_event_save", raw,
                      "postgresql")
    scan_row["ratio"] = None
    scan_row.update(participants=SCAN_PARTICIPANTS, reminders_found=found)
    # The chunked figure is timed once both worker processes are up (as running Celery
    # workers are); with their start-up (imports, a bootstrap each) beside it.
    return [result("reminders", chunked, "emails/s", "library_single_event_save", raw,
                   "postgresql") | {"processes": 2, "chunk": 50,
                                    "with_start_up": round(with_start_up, 2),
                                    "to_aiosmtpd": round(to_aiosmtpd, 2)},
            result("reminders_one_by_one", sent, "emails/s", "library_single_event_save",
                   raw, "postgresql"), scan_row]


def http_results(t: Trialog, url: str, raw_env: dict[str, str],
                 workdir: Path) -> list[dict[str, Any]]:
    with http.serving(url, SECRETS, t.engine, workdir) as (base, token):
        # commands_http and commands_http_scoped alternate, round by round, on this server
        # (see http.ROUNDS): the ratio is not left to the noise between two runs.
        ours, scoped, round_ratios = http.http_commands_alternating(
            base, token, http.scoped_tokens(t.engine), N_HTTP)
        raw = http.raw_concurrent_saves(raw_env, N_HTTP)
        floor = http.turned_away(http.warmed_clients(base, token),
                                  N_HTTP // http.CLIENTS)
        bulk = http.bulk_import(base, token, 1000)
        raw_batched = http.raw_batched_saves(raw_env, 2000)
        sessions, argon2_parameters = http.sessions_p95_ms(base, t.engine, N_SESSIONS)
    print(f"sessions_p95_ms: Argon2 parameters {argon2_parameters}", file=sys.stderr)
    return [
        {**result("commands_http", ours, "commands/s", "library_single_event_save_8_threads",
                  raw, "postgresql"), "rounds": http.ROUNDS,
         "turned_away_per_second": round(floor, 1)},
        {**result("commands_http_scoped", scoped, "commands/s", "commands_http", ours,
                  "postgresql"),
         "rounds": http.ROUNDS, "round_ratios": round_ratios,
         "tokens": "service role, 4 clients scoped to CASE and 4 to METRO"},
        {**result("bulk_import", bulk, "ev/s", "library_100_events_per_save", raw_batched,
                  "postgresql"), "library_single_event_save_8_threads": raw},
        {**result("sessions_p95_ms", sessions, "ms", "", 0, "postgresql"),
         "baseline_name": None, "baseline_value": None, "ratio": None,
         "requests": N_SESSIONS, "argon2": argon2_parameters},
    ]


def sqlite_http_result(t: Trialog, url: str, raw_env: dict[str, str],
                       workdir: Path) -> dict[str, Any]:
    """`commands_http` on SQLite: the same server and 8 clients, beside the library's SQLite
    recorder saving single-event aggregates from 8 threads."""
    with http.serving(url, SECRETS, t.engine, workdir) as (base, token):
        ours = http.http_commands(base, token, N_HTTP)
        floor = http.turned_away(http.warmed_clients(base, token),
                                  N_HTTP // http.CLIENTS)
    raw = http.raw_concurrent_saves(raw_env, N_HTTP)
    return {**result("commands_http", ours, "commands/s",
                     "library_single_event_save_8_threads", raw, "sqlite"),
            "turned_away_per_second": round(floor, 1)}


def http_only(workdir: Path) -> list[dict[str, Any]]:
    """The HTTP figures alone, on a fresh PostgreSQL database: `python -m benchmarks http`
    (printed, benchmarks/results.json left as it is)."""
    with database("postgresql", workdir) as (url, raw_env):
        t = bootstrap(Settings.from_env({"TRIALOG_DATABASE_URL": url, **SECRETS}),
                      migrate=True)
        try:
            screen_commands(t, 50)  # warm up, as bench() does first (a smaller store)
            return http_results(t, url, raw_env, workdir)
        finally:
            t.close()


def cpu_results(workdir: Path) -> dict[str, Any]:
    """`python -m benchmarks cpu`: CPU per command by kind of process (see benchmarks/cpu.py),
    on a fresh PostgreSQL database."""
    with database("postgresql", workdir) as (url, raw_env):
        t = bootstrap(Settings.from_env({"TRIALOG_DATABASE_URL": url, **SECRETS}),
                      migrate=True)
        try:
            return cpu.results(url, raw_env, SECRETS, t.engine, workdir, 1600)
        finally:
            t.close()


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
            # The runner wrote rm_participants' rows as of its events: the deep check
            # would rightly find them older than the record our follower has passed.
            TrialProjection(t, batch_size=5000).rebuild()
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
            feed_bench.catch_up(t)  # the steady state: the API's followers are idle
            with http.serving(url, SECRETS, t.engine, workdir) as (base, token):
                # Each measured read is the first of its participant. The first reads of
                # HISTORY_WARM_UP other participants come before them, not counted: each
                # worker's one-time start-up (imports, compiled statements, and the
                # driver's prepared ones, prepared at their fifth use on each pooled
                # connection; the server's log showed the first ten or so reads after
                # five of them still 2-3x slower) is no participant's data, and with 30
                # samples the p95 is mostly the two slowest.
                cold, cold_median = http.history_p95_ms(base, token, pids[1:],
                                                        warm_up=HISTORY_WARM_UP)
                warm, warm_median = http.history_p95_ms(base, token, [pids[0]] * 62,
                                                        warm_up=2)
            events = HISTORY_PARTICIPANTS * 500
            small = {kind: audit.export_peak(url, SECRETS, kind, workdir)[0]
                     for kind in ("odm", "fhir")}
        finally:
            t.close()
    rows = [result("history_p95_ms", warm, "ms", "library_log_read_ev_per_s", raw_read,
                   "postgresql"),
            result("history_first_read_p95_ms", cold, "ms", "library_log_read_ev_per_s",
                   raw_read, "postgresql")]
    for row, median in zip(rows, (warm_median, cold_median), strict=True):
        row["ratio"] = None  # a latency beside a rate: no ratio
        row["median_ms"] = median
    rows += [{**result(f"export_{kind}_peak_rss_mib_small_store", peak, "MiB", "", 0,
                       "postgresql"), "events": events} for kind, peak in small.items()]
    return rows


def main() -> int:
    workdir = Path(os.environ.get("TRIALOG_BENCH_DIR", "/tmp/trialog-bench"))
    workdir.mkdir(parents=True, exist_ok=True)
    if sys.argv[1:] == ["http"]:
        print(json.dumps(http_only(workdir), indent=2))
        return 0
    if sys.argv[1:] == ["console"]:
        print(json.dumps(console_results(workdir), indent=2))
        return 0
    if sys.argv[1:] == ["feed"]:
        print(json.dumps(feed_results(workdir), indent=2))
        return 0
    if sys.argv[1:] == ["reminders"]:
        print(json.dumps(reminder_results(workdir), indent=2))
        return 0
    if sys.argv[1:] == ["cpu"]:
        print(json.dumps(cpu_results(workdir), indent=2))
        return 0
    if sys.argv[1:] == ["management"]:
        print(json.dumps(management_results(workdir), indent=2))
        return 0
    if sys.argv[1:] == ["import"]:
        print(json.dumps(import_results(workdir), indent=2))
        return 0
    kinds = sys.argv[1:] or ["postgresql", "sqlite"]
    results = [r for kind in kinds for r in bench(kind, workdir)]
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
