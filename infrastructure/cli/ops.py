"""The operational commands of the ``trialog`` command line: the API server, tokens, the
read models and the workers' scans."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Engine
from tqdm import tqdm

from infrastructure.cli import CliError, _app


def cmd_serve(args: argparse.Namespace) -> int:
    from infrastructure.logs import configure_logging

    configure_logging()
    if args.workers > 1:
        from infrastructure.api.server import serve_processes

        serve_processes(args.host, args.port, args.workers, args.threads,
                        follow=not args.no_projection)
        return 0
    from infrastructure.api import create_app

    app = create_app(_app(), follow=not args.no_projection)
    if args.dev:
        app.run(host=args.host, port=args.port)
    else:
        import waitress

        waitress.serve(app, host=args.host, port=args.port, threads=args.threads,
                       ident="trialog")
    return 0


def _on_tokens(action: Callable[[Engine], str]) -> int:
    """Runs ``action`` on the tokens table; its answer goes to standard output."""
    from infrastructure.store.tokens import TokenError

    trialog = _app()
    try:
        answer = action(trialog.engine)
    except TokenError as e:
        raise CliError(str(e)) from None
    finally:
        trialog.close()
    print(answer)
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    from infrastructure.store.tokens import create_token

    return _on_tokens(lambda engine: create_token(engine, args.name, args.role))


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from infrastructure.store.tokens import revoke_token

    def revoke(engine: Engine) -> str:
        revoke_token(engine, args.name)
        return f"revoked {args.name}: refused from the next request on"

    return _on_tokens(revoke)


def cmd_projections_rebuild(args: argparse.Namespace) -> int:
    from infrastructure.readside.projections import TrialProjection

    trialog = _app()
    try:
        projection = TrialProjection(trialog, batch_size=args.batch_size)
        total = projection.head()
        started = time.perf_counter()
        with tqdm(total=total, unit="ev", desc=f"rebuilding {projection.name}",
                  disable=args.quiet, file=sys.stderr) as bar:
            done = projection.rebuild(progress=bar.update)
        # The whole run's rate (tqdm's own is a moving average of the last batches).
        rate = done / max(time.perf_counter() - started, 1e-9)
    finally:
        trialog.close()
    print(f"{projection.name}: {done} events applied ({rate:,.0f} events/s)", file=sys.stderr)
    return 0


def cmd_projections_status(args: argparse.Namespace) -> int:
    from infrastructure.jobs.monitor import SCAN
    from infrastructure.readside.projections import followers
    from infrastructure.readside.quarantine import listing

    trialog = _app()
    try:
        head = None
        with trialog.engine.connect() as connection:
            held = listing(connection)
        for follower in followers(trialog):
            head = follower.head() if head is None else head
            position = follower.position()
            mine = [q for q in held if q["follower"] == follower.name]
            print(f"{follower.name:<20} position {position:>10}  lag {head - position:>8}  "
                  f"quarantined {len(mine)}")
            _print_quarantined(mine)
        scanned = [q for q in held if q["follower"] == SCAN]
        print(f"{SCAN:<20} (the clock-driven rules' scan)  quarantined {len(scanned)}")
        _print_quarantined(scanned)
    finally:
        trialog.close()
    return 0


def _print_quarantined(rows: list[dict[str, Any]]) -> None:
    for q in rows:
        what = q["event_type"] or ("unreadable event" if q["position"] else "scan")
        where = f" at position {q['position']}" if q["position"] else ""
        print(f"  {q['participant_id']}: {what}{where}, since {q['quarantined_at']}: "
              f"{q['error']}")


def cmd_projections_follow(args: argparse.Namespace) -> int:
    import signal
    import threading

    from infrastructure.readside.projections import TrialProjection

    trialog = _app()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        TrialProjection(trialog, batch_size=args.batch_size).follow(stop)
    except KeyboardInterrupt:
        pass
    finally:
        trialog.close()
    return 0


def cmd_reminders_scan(args: argparse.Namespace) -> int:
    from infrastructure.jobs import reminders
    from infrastructure.readside.projections import TrialProjection
    from workers.tasks import send_reminder

    trialog = _app()
    try:
        TrialProjection(trialog).catch_up()  # the schedule is read from the read models
        new = reminders.scan(trialog, trialog.today())
        handed = reminders.hand_over(trialog, send_reminder.delay)
    finally:
        trialog.close()
    print(f"{len(new)} reminders due; {handed} handed to the workers")
    return 0


def cmd_deviations_scan(args: argparse.Namespace) -> int:
    from infrastructure.jobs import monitor
    from infrastructure.readside.projections import TrialProjection

    trialog = _app()
    try:
        TrialProjection(trialog).catch_up()
        events = monitor.DeviationMonitor(trialog).catch_up()
        counts = monitor.scan_clock(trialog, trialog.today())
    finally:
        trialog.close()
    print(f"{events} new events checked; {counts['participants']} participants scanned, "
          f"{counts['missed']} visits missed, {counts['flagged']} deviations flagged")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from infrastructure.audit import exports

    trialog = _app()
    try:
        out = (open(args.output, "w", newline="", encoding="utf-8")  # noqa: SIM115
               if args.output else sys.stdout)
        try:
            for chunk in exports.document(trialog, args.format, args.deidentify):
                out.write(chunk)
        finally:
            if args.output:
                out.close()
    finally:
        trialog.close()
    return 0
