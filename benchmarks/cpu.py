"""Where the CPU of a command goes (`python -m benchmarks cpu`): the commands of
`commands_http` and `bulk_import`, the same clients' requests turned away at the door
(`http.turned_away`: no token, answered 401), and the library's saves they are measured
against, with the CPU time each kind of process used (Linux's /proc), per command. On a
machine whose cores are all busy, a rate is bounded by the cores over this sum, whatever
the database's lock allows."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import http

TICKS = os.sysconf("SC_CLK_TCK")


def _group(pid: int, command: str, name: str) -> str:
    if pid == os.getpid():
        return "client"
    if name == "postgres" or command.startswith("postgres"):
        return "postgresql"
    if "projections follow" in command:
        return "follower"
    if "trialog" in command:
        return "server"
    return "other"


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user and system) used so far by each group of live processes and the
    children they have reaped."""
    used: dict[str, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:  # gone meanwhile
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        group = _group(int(entry), command.decode(errors="replace"), name)
        # Its own time and its reaped children's: a database connection that closed
        # meanwhile is counted in the postmaster's.
        ticks = sum(int(f) for f in fields[11:15])
        used[group] = used.get(group, 0.0) + ticks / TICKS
    return used


def per_command(n: int, run: Callable[[], Any]) -> dict[str, Any]:
    """Runs ``run`` (``n`` commands or saves): its rate, and the CPU milliseconds per
    command of each group of processes (the client's own from its process time)."""
    before, client = cpu_seconds(), time.process_time()
    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    client = time.process_time() - client
    after = cpu_seconds()
    used = {g: max(0.0, after.get(g, 0.0) - before.get(g, 0.0)) for g in after}
    used["client"] = client
    ms = {g: round(seconds / n * 1000, 3) for g, seconds in sorted(used.items())}
    return {"per_second": round(n / elapsed, 1), "cpu_ms_per_command": ms,
            "cpu_ms_total": round(sum(ms.values()), 3), "cores": os.cpu_count()}


def results(url: str, raw_env: dict[str, str], secrets: dict[str, str], engine: Any,
            workdir: Path, total: int) -> dict[str, Any]:
    with http.serving(url, secrets, engine, workdir) as (base, token):
        clients = http.warmed_clients(base, token)
        time.sleep(5)  # the followers' process has started too
        each = total // http.CLIENTS
        found = {"commands_http": per_command(
                     each * http.CLIENTS, lambda: http.from_each(clients, each)),
                 "bulk_import": per_command(2000, lambda: http.bulk_import(base, token, 1000)),
                 "turned_away": per_command(
                     each * http.CLIENTS, lambda: http.turned_away(clients, each))}
    found["library_single_event_save_8_threads"] = per_command(
        total, lambda: http.raw_concurrent_saves(raw_env, total))
    found["library_100_events_per_save"] = per_command(
        2000, lambda: http.raw_batched_saves(raw_env, 2000))
    return found
