"""The tree shows the parts, and the parts depend inward: the command data schemas, the
read side, the audit, the jobs and `trialog import` never need the HTTP API; a process
that does not migrate never loads alembic (nor the command line its progress bars until
it draws one)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from infrastructure.store import migrations
from infrastructure.store.bootstrap import bootstrap
from tests.conftest import TEST_SECRETS, settings_for

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


def test_a_process_starting_on_a_sqlite_file_at_the_newest_migration_never_loads_alembic(
        tmp_path):
    url = f"sqlite:///{tmp_path / 'trialog.db'}"
    bootstrap(settings_for(url)).close()  # migrated to the newest
    environment = ", ".join(f"{k!r}: {v!r}" for k, v in TEST_SECRETS.items())
    started = (
        "from infrastructure.store.bootstrap import bootstrap\n"
        "from infrastructure.store.settings import Settings\n"
        f"bootstrap(Settings.from_env({{'TRIALOG_DATABASE_URL': {url!r}, {environment}}}))"
        ".close()\n"
        "import infrastructure.cli")
    assert _loaded(started, ("alembic", "tqdm")) == []


def test_the_migrations_are_one_line_each_named_after_its_revision():
    """What lets a process read the newest revision off the file names (``head``)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    files = sorted((migrations.HERE / "versions").glob("[0-9]*_*.py"))
    declared = []
    for path in files:
        assignments = {node.targets[0].id: node.value.value
                       for node in ast.parse(path.read_text()).body
                       if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                       and node.targets[0].id in ("revision", "down_revision")}
        declared.append((path.name.partition("_")[0], assignments["revision"],
                         assignments["down_revision"]))
    assert [(prefix, revision) for prefix, revision, _ in declared] == [
        (prefix, prefix) for prefix, _, _ in declared]
    config = Config()
    config.set_main_option("script_location", str(migrations.HERE))
    scripts = ScriptDirectory.from_config(config)
    assert scripts.get_heads() == [migrations.head()] == [declared[-1][0]]  # the highest
    line = [script.revision for script in scripts.walk_revisions()]  # from the head down
    assert sorted(line) == [revision for _, revision, _ in declared]  # every one, in one line
