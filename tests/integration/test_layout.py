"""The tree shows the parts, and the parts depend inward: the command data schemas, the
read side, the audit, the jobs and `trialog import` never need the HTTP API; a process
that does not migrate never loads alembic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PARTS = {"store", "readside", "audit", "jobs", "api", "console", "cli"}


def test_infrastructure_is_split_into_its_parts():
    packages = {p.parent.name for p in (ROOT / "infrastructure").glob("*/__init__.py")}
    assert packages == PARTS
    loose = {p.name for p in (ROOT / "infrastructure").glob("*.py")}
    assert loose == {"__init__.py", "logs.py", "heap.py"}  # what every process sets up


def _loaded(imports: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules starting with ``prefixes`` that a fresh interpreter has loaded once it
    has run ``imports``."""
    probe = (f"import json, sys\n{imports}\n"
             f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, check=True, timeout=60)
    return list(json.loads(done.stdout))


def test_the_schemas_the_exports_and_the_jobs_import_without_the_api():
    assert _loaded(
        "import infrastructure.store.schemas, infrastructure.store.corrections\n"
        "import infrastructure.audit.exports, infrastructure.audit.odm\n"
        "import infrastructure.readside.projections, infrastructure.jobs.reminders\n"
        "import infrastructure.jobs.monitor, workers.tasks, infrastructure.cli.imports",
        ("infrastructure.api", "flask")) == []


def test_a_process_that_does_not_migrate_never_loads_alembic():
    assert _loaded(
        "import infrastructure.store.bootstrap, infrastructure.cli.imports\n"
        "import infrastructure.api, workers.tasks", ("alembic",)) == []
