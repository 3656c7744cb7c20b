"""Reminder sending to a local SMTP sink, and the reminder scan over 100k participants."""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import insert

from domain import commands as c
from infrastructure.jobs import reminders
from infrastructure.readside.projections import TrialProjection
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.tables import participants, reminder_schedule, visits
from tests.factories import consent, screening


class _PlainSink(asyncio.Protocol):
    """An SMTP server that takes every message and keeps none: each command answered in
    order (EHLO with its extensions, 354 to DATA, 221 to QUIT, 250 to the rest, blank
    lines, unknown verbs and a DATA with no recipient included), and a message's content
    read up to its terminating line (``CRLF.CRLF``) before it is answered."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buffer = b""
        self.in_data = False
        transport.write(b"220 sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.in_data:
                # The content began on a new line: the CRLF before it is in the buffer
                # (see DATA), so an empty message's lone "." is found as any other's end.
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    self.buffer = self.buffer[-4:]  # a terminator cut across reads
                    return
                self.buffer, self.in_data = self.buffer[end + 5:], False
                self.transport.write(b"250 Queued\r\n")
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            verb, self.buffer = self.buffer[:4].upper(), self.buffer[end + 2:]
            if verb == b"EHLO":
                self.transport.write(b"250-sink\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n")
            elif verb == b"DATA":
                self.transport.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.buffer, self.in_data = b"\r\n" + self.buffer, True
            elif verb == b"QUIT":
                self.transport.write(b"221 Bye\r\n")
                self.transport.close()
                return
            else:
                self.transport.write(b"250 OK\r\n")


def _sink(port: int, ready: Any, kind: str) -> None:
    if kind == "aiosmtpd":
        from aiosmtpd.controller import Controller

        class Discard:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                return "250 OK"

        controller = Controller(Discard(), hostname="127.0.0.1", port=port)
        controller.start()
        ready.set()
        asyncio.run(asyncio.sleep(3600))
        return

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(_PlainSink, "127.0.0.1", port)
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def smtp_sink_process(port: int, kind: str = "plain") -> multiprocessing.Process:
    """An SMTP server in its own process, so that it does not share the sender's GIL:
    ``plain`` (``_PlainSink``) or ``aiosmtpd`` (the test suite's SMTP server). On the 2-core
    machine of the README the sink shares the cores with the senders and PostgreSQL, where
    a deployment's relay has a machine of its own: aiosmtpd spends ~0.95 ms of CPU an
    email there, the plain sink ~0.2 ms."""
    ready = multiprocessing.Event()
    process = multiprocessing.Process(target=_sink, args=(port, ready, kind), daemon=True)
    process.start()
    if not ready.wait(30):  # e.g. the port taken meanwhile
        process.terminate()
        raise RuntimeError(f"the {kind} SMTP sink did not start on port {port}")
    return process


def due_reminders(t: Trialog, n: int) -> list[str]:
    """``n`` participants whose week6 window opened yesterday, their reminders scanned
    into the outbox: the ids."""
    today = datetime.now(UTC).date()
    registered = today - timedelta(days=36)
    for _ in range(n):
        pid = f"CASE-{uuid.uuid4().hex[:12]}"
        for command in (c.ScreenParticipant(pid, screening()), c.RecordConsent(pid, consent()),
                        c.RandomizeParticipant(pid, {"registered_on": registered})):
            t.bus.dispatch(command, command_id=str(uuid.uuid4()), actor="bench")
    TrialProjection(t, batch_size=5000).catch_up()
    return reminders.scan(t, today)


def sends_per_second(t: Trialog, smtp_url: str, n: int) -> float:
    """Sends ``n`` due reminders one after another, a task each, as one worker process
    does with send_reminder."""
    ids = due_reminders(t, n)
    today = datetime.now(UTC).date()
    mailer = reminders.Mailer(smtp_url, t.settings.mail_from)
    start = time.perf_counter()
    outcomes = [reminders.send(t, mailer, reminder_id, today) for reminder_id in ids]
    elapsed = time.perf_counter() - start
    if set(outcomes) != {"sent"}:
        raise SystemExit(f"reminders not sent: {set(outcomes)}")
    return len(ids) / elapsed


def _worker(env: dict[str, str], chunks: list[list[str]], ready: Any, go: Any,
            done: Any) -> None:
    """One worker process: started up (imports, bootstrap, an SMTP connection) as a Celery
    pool process is, then, once every worker is, sends its chunks as the send_reminders
    task does."""
    from infrastructure.heap import freeze_startup
    from infrastructure.store.bootstrap import bootstrap
    from infrastructure.store.settings import Settings

    t = bootstrap(Settings.from_env(env))
    freeze_startup()
    mailer = reminders.Mailer(t.settings.smtp_url, t.settings.mail_from)
    today = datetime.now(UTC).date()
    ready.put(True)
    go.wait(600)
    sent = 0
    for chunk in chunks:
        sent += list(reminders.send_chunk(t, mailer, chunk, today).values()).count("sent")
    mailer.close()
    t.close()
    done.put(sent)


def chunked_sends_per_second(t: Trialog, env: dict[str, str], n: int,
                             processes: int = 2) -> tuple[float, float]:
    """Sends ``n`` due reminders in chunks of reminders.CHUNK from ``processes`` worker
    processes, each chunk over one SMTP connection with its ReminderSent events in one
    transaction (the send_reminders task): emails/s once the workers are up (as a
    running Celery worker is), and with their start-up counted."""
    ids = due_reminders(t, n)
    chunks = [ids[i:i + reminders.CHUNK] for i in range(0, len(ids), reminders.CHUNK)]
    context = multiprocessing.get_context("spawn")
    ready, go, done = context.Queue(), context.Event(), context.Queue()
    workers = [context.Process(target=_worker, args=(env, chunks[k::processes], ready, go,
                                                     done))
               for k in range(processes)]
    spawned = time.perf_counter()
    for worker in workers:
        worker.start()
    for _ in workers:
        ready.get(timeout=600)
    start = time.perf_counter()
    go.set()
    sent = sum(done.get(timeout=600) for _ in workers)
    end = time.perf_counter()
    for worker in workers:
        worker.join()
    if sent != len(ids):
        raise SystemExit(f"{sent} of {len(ids)} reminders sent")
    return len(ids) / (end - start), len(ids) / (end - spawned)


def scan_ms(t: Trialog, population: int) -> tuple[float, int]:
    """The daily scan over ``population`` participants registered over a year: the first
    scan fills the outbox, the next days' scans are timed (the steady state beat sees)."""
    today = date(2026, 11, 26)
    rows: dict[Any, list[dict[str, Any]]] = {participants: [], visits: [],
                                             reminder_schedule: []}
    for i in range(population):
        pid = f"SCAN-{i:06d}"
        registered = today - timedelta(days=i % 365)
        participant_rows(t, pid, registered, rows)
        if len(rows[participants]) == 5000 or i == population - 1:
            with t.engine.begin() as connection:
                for table, batch in rows.items():
                    connection.execute(insert(table), batch)
                    batch.clear()
    reminders.scan(t, today - timedelta(days=1))
    with t.engine.begin() as connection:  # as autovacuum would after a bulk load
        connection.exec_driver_sql("ANALYZE")
    # Five days in a row, each finding that day's reminders: the median (one commit of a
    # few thousand rows is at the mercy of the disk).
    timings, found = [], []
    for day in range(5):
        start = time.perf_counter()
        new = reminders.scan(t, today + timedelta(days=day))
        timings.append((time.perf_counter() - start) * 1000)
        found.append(len(new))
    return statistics.median(timings), int(statistics.median(found))


def participant_rows(t: Trialog, pid: str, registered: date,
                     rows: dict[Any, list[dict[str, Any]]]) -> None:
    from domain.participant import participant_uuid
    from domain.schedule import reminder_due, reminder_id, schedule

    rows[participants].append({
        "participant_id": pid, "site_id": "CASE", "status": "randomized", "arm": "b12",
        "version": 3, "language": "en", "eligible": True, "failed_criteria": [],
        "screened_on": registered, "registered_on": registered, "scores": {}, "position": 0})
    for sequence, visit in enumerate(schedule(t.protocol, registered)):
        rows[visits].append({
            "participant_id": pid, "code": visit.code, "sequence": sequence,
            "target": visit.target, "window_start": visit.window_start,
            "window_end": visit.window_end, "completed_on": None, "missed": False})
        for offset in t.protocol.reminders:
            rows[reminder_schedule].append({
                "reminder_id": reminder_id(participant_uuid(pid), visit.code, offset.kind),
                "participant_id": pid, "visit": visit.code, "kind": offset.kind,
                "due_on": reminder_due(visit, offset), "until": visit.window_end,
                "position": 0})
