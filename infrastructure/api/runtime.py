"""What the API process runs beside its views: the followers of the log (the read models'
and the feed's), the bounded wait that lets a client read its own write
(``?after=POSITION``), the cache of decoded histories, and the deep verifications running
in the background."""

from __future__ import annotations

import threading
import time

from infrastructure.audit.feed import Feed
from infrastructure.audit.history import HistoryCache
from infrastructure.audit.verify_jobs import VerifyJobs
from infrastructure.readside.projections import TrialProjection, follow_all
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.tokens import Authenticator


class Runtime:
    def __init__(self, trialog: Trialog, follow: bool = True) -> None:
        self.trialog = trialog
        self.projection = TrialProjection(trialog)
        self.authenticate = Authenticator(trialog.engine)
        self.feed = Feed(trialog)
        self.histories = HistoryCache(trialog.service, trialog.veil_digest,
                                      rendered=self.feed.history_entries)
        self.verify_jobs = VerifyJobs(trialog)
        self.stop = threading.Event()
        self.followers = follow_all(trialog, self.stop) if follow else []

    def nudge(self) -> None:
        """A command committed here: the followers need not wait for their next poll."""
        for _, wake in self.followers:
            wake.set()

    def wait_for(self, position: int, timeout: float) -> int | None:
        """Waits until the read models include ``position``: the position they have
        reached then; None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while (reached := self.projection.position()) < position:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)
        return reached

    def close(self) -> None:
        self.stop.set()
        for thread, wake in self.followers:
            wake.set()
            thread.join(timeout=5)
