"""The auditors' reads: history over HTTP, verification of a big store, and the exports'
peak memory (a child process per export, so each peak is its own)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from infrastructure.audit.verification import check_store
from infrastructure.store.bootstrap import Trialog

ROOT = Path(__file__).resolve().parents[1]
# The peak is VmHWM, this process image's own high-water mark: ru_maxrss would carry the
# forking parent's size across exec.
EXPORT_PEAK = """
import re, sys
from infrastructure.cli import main
code = main(["export", sys.argv[1], "--output", sys.argv[2]])
status = open("/proc/self/status").read()
print(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1), file=sys.stderr)
sys.exit(code)
"""


def verify_rates(t: Trialog) -> list[tuple[float, int]]:
    """(events/s, processes) of the whole check (decrypt, versions, links) and of the deep
    one (every digest recomputed too)."""
    rates = []
    for deep in (False, True):
        report = check_store(t, deep=deep)
        if not report.ok:
            raise SystemExit(f"verify found problems in a fresh database: {report.problems}")
        rates.append((report.events_checked / (report.seconds or 1), report.processes))
    return rates


def export_peak(url: str, secrets: dict[str, str], kind: str,
                workdir: Path) -> tuple[float, float, int]:
    """(peak RSS in MiB, seconds, bytes written) of ``trialog export KIND`` in a process
    of its own."""
    out = workdir / f"export.{kind}"
    env = {**os.environ, "TRIALOG_DATABASE_URL": url, **secrets,
           "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", EXPORT_PEAK, kind, str(out)], env=env,
                          capture_output=True, text=True, check=False, timeout=1800)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"export {kind} failed: {done.stderr}")
    peak_kib = int(done.stderr.strip().splitlines()[-1])
    size = out.stat().st_size
    out.unlink()
    return peak_kib / 1024, seconds, size
