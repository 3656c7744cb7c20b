"""The processes that serve commands keep their start-up out of the garbage collector's
scans (infrastructure.heap). Each case runs in a process of its own, where nothing was
frozen before."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import TEST_SECRETS

ROOT = Path(__file__).resolve().parents[2]


def _in_a_process(code: str, tmp_path: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALOG_")}
    env.update(TEST_SECRETS, PYTHONPATH=str(ROOT),
               TRIALOG_DATABASE_URL=f"sqlite:///{tmp_path / 'trialog.db'}")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_what_is_frozen_stays_and_what_comes_after_is_still_collected(tmp_path):
    said = _in_a_process("""
        import gc, weakref
        from infrastructure.heap import freeze_startup

        class Node:
            pass

        before = gc.get_freeze_count()
        freeze_startup()
        frozen = gc.get_freeze_count()
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle made after the freeze
        gone = []
        weakref.finalize(a, gone.append, True)
        del a, b
        gc.collect()
        print(before, frozen > 0, gone)
    """, tmp_path)
    assert said == "0 True [True]"


def test_an_import_process_freezes_its_application(tmp_path):
    said = _in_a_process("""
        import gc
        from infrastructure.cli.imports import run_file
        from infrastructure.store import bootstrap as module
        from infrastructure.store.settings import Settings

        built = []
        original = module.bootstrap
        module.bootstrap = lambda *a, **k: built.append(original(*a, **k)) or built[-1]
        open("empty.ndjson", "w").close()
        report = run_file(Settings.from_env(), "empty.ndjson", "importer")
        [t] = built
        tracked = {id(o) for o in gc.get_objects()}
        print(report.failed, id(t) in tracked, id(t.protocol) in tracked)
    """, tmp_path)
    assert said == "None False False"  # frozen once built: no longer among those tracked


def test_an_api_process_freezes_after_building_its_application(tmp_path):
    said = _in_a_process("""
        import gc
        from infrastructure.api.server import application

        app = application()  # as each of `trialog serve --workers N`'s processes
        t = app.extensions["trialog"].trialog
        tracked = {id(o) for o in gc.get_objects()}
        print(app.name, id(app) in tracked, id(t) in tracked)
    """, tmp_path)
    assert said == "trialog False False"


def test_a_celery_worker_freezes_once_it_has_built_its_application(tmp_path):
    said = _in_a_process("""
        import gc
        from workers.app import make_app, trialog

        t = trialog(make_app())
        tracked = {id(o) for o in gc.get_objects()}
        print(id(t) in tracked, id(t.protocol) in tracked)
    """, tmp_path)
    assert said == "False False"
