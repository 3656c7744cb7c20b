"""What the API process runs beside its views: the projection follower, the bounded wait
that lets a client read its own write (``?after=POSITION``), the cache of decoded
histories, and the deep verifications running in the background."""

from __future__ import annotations

import logging
import threading
import time

from infrastructure.audit.history import HistoryCache
from infrastructure.audit.verify_jobs import VerifyJobs
from infrastructure.readside.projections import TrialProjection
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.tokens import Authenticator

log = logging.getLogger("trialog.projections")


class Runtime:
    def __init__(self, trialog: Trialog, follow: bool = True) -> None:
        self.trialog = trialog
        self.projection = TrialProjection(trialog)
        self.authenticate = Authenticator(trialog.engine)
        self.histories = HistoryCache(trialog.service)
        self.verify_jobs = VerifyJobs(trialog)
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        if follow:
            self.thread = threading.Thread(target=self._follow, name="trial-projection",
                                           daemon=True)
            self.thread.start()

    def _follow(self) -> None:
        while not self.stop.is_set():
            try:
                self.projection.follow(self.stop, self.wake)
            except Exception:  # keep following: a failed batch is rolled back and retried
                log.exception("projection batch failed; retrying")
                self.stop.wait(1.0)

    def nudge(self) -> None:
        """A command committed here: the follower need not wait for its next poll."""
        self.wake.set()

    def wait_for(self, position: int, timeout: float) -> bool:
        """Waits until the read models include ``position``; False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.projection.position() < position:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        self.stop.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
