"""The raw library's side of every comparison."""

from __future__ import annotations

from typing import Any

from eventsourcing.domain import Aggregate


class Ping(Aggregate):
    """The raw library's single-event aggregate (the baseline of the command figures)."""


def _read_range(settings: Any, start: int, stop: int) -> int:
    """The library reads the notifications ``start..stop`` of the store and turns each into
    a domain event (decrypt, decompress, decode): the work verify does first."""
    from infrastructure.store.bootstrap import bootstrap

    t = bootstrap(settings, migrate=False)
    try:
        recorder, mapper = t.service.recorder, t.service.mapper
        done, position = 0, start
        while position <= stop:
            notifications = recorder.select_notifications(position, 1000, stop=stop)
            if not notifications:
                break
            for notification in notifications:
                mapper.to_domain_event(notification)
            done += len(notifications)
            position = notifications[-1].id + 1
        return done
    finally:
        t.close()


def library_store_read(settings: Any, head: int, processes: int) -> float:
    """Events/s of the library reading the whole store, split into ``processes`` ranges of
    notification ids read in as many processes (verify's baseline: the same store, the
    same number of processes)."""
    import multiprocessing
    import time
    from concurrent.futures import ProcessPoolExecutor

    step = -(-head // processes)
    ranges = [(1 + i * step, min(head, (i + 1) * step)) for i in range(processes)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        list(pool.map(_read_range, [settings] * processes, [0] * processes,
                      [0] * processes))  # start the processes before the clock
        started = time.perf_counter()
        done = sum(pool.map(_read_range, [settings] * processes, *zip(*ranges, strict=True)))
    return done / (time.perf_counter() - started)
