"""The raw library's side of every comparison."""

from __future__ import annotations

import time
from typing import Any

from eventsourcing.domain import Aggregate


class Ping(Aggregate):
    """The raw library's single-event aggregate (the baseline of the command figures)."""


def _read_range(settings: Any, start: int, stop: int, decode: bool) -> tuple[int, float]:
    """The library reads the notifications ``start..stop`` of the store and decrypts each
    with its cipher (what the plain verify does to every row), or, with ``decode``, turns
    each into a domain event (decrypt, decompress, decode: what the deep check does before
    it hashes). Answers how many, and the seconds the reading took (not the process's
    set-up: the baseline is not handicapped)."""
    import time

    from infrastructure.store.bootstrap import bootstrap

    t = bootstrap(settings, migrate=False)
    try:
        recorder, mapper = t.service.recorder, t.service.mapper
        started = time.perf_counter()
        done, position = 0, start
        while position <= stop:
            notifications = recorder.select_notifications(position, 1000, stop=stop)
            if not notifications:
                break
            for notification in notifications:
                if decode:
                    mapper.to_domain_event(notification)
                else:
                    mapper.cipher.decrypt(notification.state)
            done += len(notifications)
            position = notifications[-1].id + 1
        return done, time.perf_counter() - started
    finally:
        t.close()


def library_store_read(settings: Any, head: int, processes: int, decode: bool) -> float:
    """Events/s of the library reading the whole store, split into ``processes`` ranges of
    notification ids read at once in as many processes (verify's baseline: the same store,
    the same number of processes): all the events over the slowest range's time."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    step = -(-head // processes)
    ranges = [(1 + i * step, min(head, (i + 1) * step)) for i in range(processes)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        parts = list(pool.map(_read_range, [settings] * processes, *zip(*ranges, strict=True),
                              [decode] * processes))
    return sum(done for done, _ in parts) / max(seconds for _, seconds in parts)


def read_whole_log(app: Any) -> tuple[int, float]:
    """(events, events/s): a library application reads its notification log from the
    start, 1,000 at a time, turning each into a domain event."""
    count, position = 0, 0
    start = time.perf_counter()
    while page := app.recorder.select_notifications(position + 1, 1000):
        for notification in page:
            app.mapper.to_domain_event(notification)
        count += len(page)
        position = page[-1].id
    return count, count / (time.perf_counter() - start)
