"""Several API processes behind gunicorn: a Python process runs one command at a time
(the GIL), so throughput grows with processes, not threads. Each process builds its own
application after the fork. Each follows the event log too; they take turns batch by batch
(the position row is locked per batch), so no event is applied twice."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication

from infrastructure.store.settings import Settings


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, options: dict[str, Any], follow: bool) -> None:
        self.options = options
        self.follow = follow
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from infrastructure.api import create_app
        from infrastructure.store.bootstrap import bootstrap

        return create_app(bootstrap(Settings.from_env()), follow=self.follow)


def serve_processes(host: str, port: int, workers: int, threads: int, follow: bool) -> None:
    options = {"bind": f"{host}:{port}", "workers": workers, "threads": threads,
               "worker_class": "gthread", "accesslog": None, "timeout": 60}
    _Gunicorn(options, follow).run()
