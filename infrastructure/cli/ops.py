"""The operational commands of the ``trialog`` command line: the API server, tokens, the
read models and the workers' scans."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine

from domain.protocol import Protocol
from infrastructure.cli import (
    NO_TABLES,
    CliError,
    _app,
    _not_migrated_later,
    require_the_store_s_key,
)

if TYPE_CHECKING:
    from infrastructure.store.bootstrap import Trialog


def cmd_serve(args: argparse.Namespace) -> int:
    import socket

    from infrastructure.logs import configure_logging

    try:
        socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise CliError(f"--host: {args.host!r} is no address of this machine's names "
                       f"({getattr(e, 'strerror', None) or e})") from None
    configure_logging()
    trialog = _ready_to_serve()
    if args.workers > 1:
        from infrastructure.api.server import serve_processes

        trialog.close()  # each worker makes its own

        # More than granian advises for the cores, it warns at every start.
        threads = args.threads or min(16, 2 * (os.cpu_count() or 1) + 1)
        serve_processes(args.host, args.port, args.workers, threads,
                        follow=not args.no_projection)
        return 0
    from infrastructure.api import create_app

    app = create_app(trialog, follow=not args.no_projection)
    if args.dev:
        app.run(host=args.host, port=args.port)
    else:
        import waitress

        waitress.serve(app, host=args.host, port=args.port, threads=args.threads or 16,
                       ident="trialog")
    return 0


def _ready_to_serve() -> Trialog:
    """The application a server starts on. On a database without Trialog's tables, or
    with older ones, it would answer every request 500, and `_app` refuses it (on SQLite
    they are made as it starts); nor does it start with another key than the store's,
    whose tokens fail their seals and whose events it could not read (one a token made
    with that key let in would be written unreadable)."""
    trialog = _app()
    try:
        require_the_store_s_key(trialog, "the server does not start")
    except CliError:
        trialog.close()
        raise
    return trialog


def _answering(action: Callable[[Any], str], refusal: type[Exception]) -> int:
    """Runs ``action`` on the application; its answer goes to standard output, a
    ``refusal`` to standard error as one line."""
    trialog = _app()
    try:
        require_the_store_s_key(trialog, "nothing was done")  # a revocation is an event of the store
        answer = action(trialog)
    except refusal as e:
        raise CliError(str(e)) from None
    finally:
        trialog.close()
    print(answer)
    return 0


def _on_tokens(action: Callable[[Engine, Protocol], str]) -> int:
    """Runs ``action`` on the tokens or people tables."""
    from infrastructure.store.tokens import TokenError

    return _answering(lambda t: action(t.engine, t.protocol), TokenError)


def cmd_token_create(args: argparse.Namespace) -> int:
    from infrastructure.store.tokens import create_token, scope_for

    def create(engine: Engine, protocol: Protocol) -> str:
        scope = scope_for(protocol, args.role, args.site, args.all_sites)
        return create_token(engine, args.name, args.role, scope, args.reason)

    return _on_tokens(create)


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from infrastructure.store.tokens import revoke_token

    def revoke(engine: Engine, protocol: Protocol) -> str:
        revoke_token(engine, args.name, reason=args.reason)
        return f"revoked {args.name}: refused from the next request on"

    return _on_tokens(revoke)


def _password(from_stdin: bool) -> str:
    """The new password: the first line of standard input, or typed twice at the
    terminal (not echoed)."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    import getpass

    if not sys.stdin.isatty():
        raise CliError("no terminal to read the password from: use --password-stdin")
    password = getpass.getpass("Password: ")
    if getpass.getpass("Password again: ") != password:
        raise CliError("the passwords differ")
    return password


def cmd_user_create(args: argparse.Namespace) -> int:
    from infrastructure.store.people import check_password, create_user
    from infrastructure.store.tokens import TokenError, scope_for

    def create(engine: Engine, protocol: Protocol) -> str:
        scope = scope_for(protocol, args.role, args.site, args.all_sites)
        password = _password(args.password_stdin)
        check_password(password)
        create_user(engine, args.login, args.name, args.role, scope, password, args.reason)
        sites = ", ".join(scope.as_list() or ["every site"])
        return f"created {args.login} ({args.role}; {sites})"

    try:
        return _on_tokens(create)
    except TokenError as e:  # raised before the tables are touched
        raise CliError(str(e)) from None


def cmd_user_disable(args: argparse.Namespace) -> int:
    from infrastructure.store.people import disable_user

    def disable(engine: Engine, protocol: Protocol) -> str:
        disable_user(engine, args.login, reason=args.reason)
        return f"disabled {args.login}: refused from the next request on"

    return _on_tokens(disable)


def cmd_user_password(args: argparse.Namespace) -> int:
    from infrastructure.store.people import check_password, reset_password

    def reset(engine: Engine, protocol: Protocol) -> str:
        password = _password(args.password_stdin)
        check_password(password)
        reset_password(engine, args.login, password)
        return (f"reset the password of {args.login}: their sessions are ended and a "
                "lock on their sign-in lifted")

    return _on_tokens(reset)


def cmd_projections_rebuild(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # loaded by the commands that draw a bar

    from infrastructure.readside.projections import FeedProjection, TrialProjection

    trialog = _app()
    try:
        chosen = [TrialProjection(trialog, batch_size=args.batch_size),
                  FeedProjection(trialog, batch_size=args.batch_size)]
        for projection in [p for p in chosen if args.name in ("all", p.name)]:
            total = projection.head()
            started = time.perf_counter()
            with tqdm(total=total, unit="ev", desc=f"rebuilding {projection.name}",
                      disable=args.quiet, file=sys.stderr) as bar:
                done = projection.rebuild(progress=bar.update)
            # The whole run's rate (tqdm's own is a moving average of the last batches).
            rate = done / max(time.perf_counter() - started, 1e-9)
            print(f"{projection.name}: {done} events applied ({rate:,.0f} events/s)",
                  file=sys.stderr)
    finally:
        trialog.close()
    return 0


def cmd_projections_status(args: argparse.Namespace) -> int:
    from infrastructure.jobs.monitor import SCAN
    from infrastructure.readside.projections import followers
    from infrastructure.readside.quarantine import listing

    trialog = _app(reads=True)
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

    from infrastructure.heap import freeze_startup
    from infrastructure.readside.projections import follow_all
    trialog = _app()
    freeze_startup()
    # SIGTERM (a stop, or the master's death) and SIGINT are blocked in every thread and
    # taken by this one with sigwait. A Python handler setting `stop` would run between two
    # of this thread's bytecodes, possibly while it holds the event's lock, and wait for
    # that lock for ever.
    # The mask outlives exec: unblock these before starting any process from here.
    ends = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, ends)  # before the followers' threads start
    stop = threading.Event()
    followers = follow_all(trialog, stop, batch_size=args.batch_size)
    try:
        signal.sigwait(ends)
    finally:
        stop.set()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, ends)  # a second one ends it at once
        for thread, _ in followers:
            thread.join(timeout=10)
        trialog.close()
    return 0


def cmd_reminders_scan(args: argparse.Namespace) -> int:
    from infrastructure.jobs import reminders
    from infrastructure.readside.projections import TrialProjection
    from workers.tasks import send_reminders

    unreachable: list[Exception] = []

    def enqueue(ids: Any) -> None:
        try:
            send_reminders.delay(ids)
        except Exception as error:
            unreachable.append(error)
            raise

    trialog = _app()
    try:
        require_the_store_s_key(trialog, "nothing was done")
        TrialProjection(trialog).catch_up()  # the schedule is read from the read models
        new = reminders.scan(trialog, reminders.Today.of(trialog))
        # Its warning is the workers' (they retry); here the failure is said below, once.
        reminders.log.disabled = True
        handed = reminders.hand_over(trialog, enqueue, reminders.CHUNK)
    finally:
        reminders.log.disabled = False
        trialog.close()
    print(f"{len(new)} reminders due; {handed} handed to the workers")
    if unreachable:  # the scan was asked to hand them over now: it failed at that
        print(f"trialog: the workers' broker (TRIALOG_REDIS_URL) could not be reached "
              f"({unreachable[0]}); the reminders stay pending for the next scan",
              file=sys.stderr)
        return 1
    return 0


def cmd_reminders_uncertain(args: argparse.Namespace) -> int:
    from infrastructure.jobs import reminders

    trialog = _app(reads=True)
    try:
        for row in reminders.uncertain_rows(trialog):
            print(json.dumps(reminders.shown(trialog, row)))
    finally:
        trialog.close()
    return 0


def cmd_reminders_resolve(args: argparse.Namespace) -> int:
    from infrastructure.jobs import reminders
    from infrastructure.store.schemas import says_something

    if not says_something(args.reason):
        raise CliError("--reason: must not be blank")
    trialog = _app()
    try:
        require_the_store_s_key(trialog, "nothing was done")
        status = reminders.resolve(trialog, args.reminder_id, sent=args.sent,
                                   actor=args.actor, reason=args.reason)
    except reminders.NotUncertain as e:
        raise CliError(str(e)) from None
    finally:
        trialog.close()
    print(f"reminder {args.reminder_id}: {status}")
    return 0


def cmd_deviations_scan(args: argparse.Namespace) -> int:
    from infrastructure.jobs import monitor
    from infrastructure.readside.projections import TrialProjection

    trialog = _app()
    try:
        require_the_store_s_key(trialog, "nothing was done")
        TrialProjection(trialog).catch_up()
        events = monitor.DeviationMonitor(trialog).catch_up()
        counts = monitor.scan_clock(trialog, trialog.ended_everywhere())
    finally:
        trialog.close()
    scanned = ("the database is locked: no participant scanned" if counts.get(
        "database_locked") else f"{counts['participants']} participants scanned")
    print(f"{events} new events checked; {scanned}, "
          f"{counts['missed']} visits missed, {counts['flagged']} deviations flagged")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """The export, from the read models as they stand after every stored event (no
    server need be following the log: after an import the CSV was a header alone); to
    ``--output``, a file written whole or not at all (a failure half way left a previous
    export cut off)."""
    from infrastructure.audit import exports
    from infrastructure.cli import _no_tables, _one_line
    from infrastructure.readside.projections import TrialProjection, UnreadableStore
    from infrastructure.store.outages import DATABASE_ERRORS

    trialog = _app(reads=True)
    try:
        require_the_store_s_key(trialog, "nothing was exported")
        try:
            TrialProjection(trialog).catch_up()
        except (*DATABASE_ERRORS, UnreadableStore) as e:  # a role that may only read, say
            if _no_tables(e):
                raise CliError(NO_TABLES) from None
            print(f"trialog: warning: the read models could not be brought up to date "
                  f"({_one_line(e)}); the CSV and FHIR exports give them as they stand",
                  file=sys.stderr)
        if args.format in exports.FROM_READ_MODELS:
            _say_set_aside(trialog)
        chunks = exports.document(trialog, args.format, args.deidentify)
        if not args.output:
            for chunk in chunks:
                sys.stdout.write(chunk)
            return 0
        _write_whole(args.output, chunks)
    finally:
        trialog.close()
    return 0


def _say_set_aside(trialog: Trialog) -> None:
    """A warning on standard error when the read models (which the CSV and FHIR exports
    read) hold participants set aside: as they stood before an event of theirs that
    can't be applied, or not at all."""
    from infrastructure.readside.projections import TrialProjection
    from infrastructure.readside.quarantine import quarantined_ids

    with trialog.engine.connect() as connection:
        aside = len(quarantined_ids(connection, TrialProjection.name))
    if aside:
        many = aside != 1
        print(f"trialog: warning: {aside} participant{'s' if many else ''} set aside by the "
              "read models (an event of theirs can't be applied: `trialog projections "
              f"status` names them) {'are' if many else 'is'} given as they stood before "
              "it, or left out; the ODM export reads the store", file=sys.stderr)


def _a_descriptor(path: str) -> bool:
    """Whether ``path`` reaches its file through a process's descriptor (`/dev/stdout`,
    `/dev/fd/N`, `/proc/self/fd/N`): a file the shell opened (`>> log`), written to as it
    is, not replaced."""
    seen, here = 0, os.path.abspath(path)
    while seen < 40:
        if here.startswith(("/proc/", "/dev/fd/")):
            return True
        if not os.path.islink(here):
            return False
        here = os.path.join(os.path.dirname(here), os.readlink(here))
        seen += 1
    return False


def _write_whole(path: str, chunks: Any) -> None:
    """The chunks written to ``path``. A regular file (or a new one), through a link or
    not, is written beside itself and replaced once all are written (what it held stays
    until then; a file made new is readable by its owner only, one replaced keeps its
    mode and owner); anything else (a pipe, a device, ``/dev/stdout`` whatever it
    names) is written to as it is."""
    import tempfile

    try:
        found = os.stat(path)  # through any link
    except FileNotFoundError:
        found = None
    except OSError as e:
        raise CliError(f"--output: {path}: {e.strerror or e}") from None
    if found is not None and stat.S_ISDIR(found.st_mode):
        raise CliError(f"--output: {path}: Is a directory")
    if found is not None and (not stat.S_ISREG(found.st_mode) or _a_descriptor(path)):
        try:
            # Appended: opened again through a descriptor, "w" would cut the file the
            # shell opened (`>> log`) back to nothing.
            with open(path, "a", newline="", encoding="utf-8") as out:
                out.writelines(chunks)
        except FileNotFoundError as e:
            raise CliError(f"--output: {path}: {e.strerror or e}") from None
        return
    target = os.path.realpath(path)  # the file a link names is replaced, not the link
    folder, name = os.path.split(target)
    try:
        file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - replaced or removed below
            "w", dir=folder, prefix=f".{name}.", suffix=".partial", delete=False,
            newline="", encoding="utf-8")
    except OSError as e:
        raise CliError(f"--output: {path}: {e.strerror or e}") from None
    try:
        with file:
            file.writelines(chunks)
        if found is not None:
            os.chmod(file.name, stat.S_IMODE(found.st_mode))
            with contextlib.suppress(PermissionError):  # (only root gives a file away)
                os.chown(file.name, found.st_uid, found.st_gid)
        os.replace(file.name, target)
    except BaseException:
        os.unlink(file.name)
        raise


def _on_webhooks(action: Callable[[Any], str]) -> int:
    from infrastructure.jobs.webhooks import WebhookError

    return _answering(action, WebhookError)


def cmd_webhook_add(args: argparse.Namespace) -> int:
    from infrastructure.jobs import webhooks

    def add(t: Any) -> str:
        webhook_id, secret = webhooks.add(t, args.url, args.site, args.type)
        return f"{webhook_id}\n{secret}"

    return _on_webhooks(add)


def cmd_webhook_list(args: argparse.Namespace) -> int:
    from infrastructure.jobs import webhooks

    def listed(t: Any) -> str:
        lines = []
        for w in webhooks.listing(t):
            sites = ",".join(w["sites"] or ["every site"])
            types = ",".join(w["types"] or ["every type"])
            lines.append(f"{w['webhook_id']}  {w['status']:8}  position {w['position']}  "
                         f"failed {w['failed']}  {w['url']}  ({sites}; {types})"
                         + (f"  last error: {w['last_error']}" if w["last_error"] else ""))
        return "\n".join(lines) or "no webhooks"

    return _on_webhooks(listed)


def cmd_webhook_redeliver(args: argparse.Namespace) -> int:
    from infrastructure.jobs import webhooks

    def redeliver(t: Any) -> str:
        done, again = webhooks.redeliver(t, args.webhook_id)
        if again:
            raise CliError(f"{done} failed deliveries delivered, {again} failed again")
        return f"{done} failed deliveries delivered"

    return _on_webhooks(redeliver)


def cmd_webhook_rotate(args: argparse.Namespace) -> int:
    from infrastructure.jobs import webhooks

    return _on_webhooks(lambda t: webhooks.rotate(t, args.webhook_id))


def printable(text: str) -> str:
    """A refusal as one line of plain text: a character that is not printable (a line
    break, a terminal's escape, NUL) in what the file wrote, a field's name say, is written
    as its escape, so that one line of the file can't print as another's refusal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def cmd_import(args: argparse.Namespace) -> int:
    from infrastructure.cli import imports
    from infrastructure.store.bootstrap import load_protocol
    from infrastructure.store.outages import DATABASE_ERRORS
    from infrastructure.store.settings import Settings

    settings = Settings.from_env()
    refusal = imports.jobs_refusal(settings, load_protocol(settings.protocol_path), args.jobs)
    if refusal is not None:
        raise CliError(refusal)
    _not_migrated_later(settings)
    try:
        with open(args.file, "rb") as file:  # readable, before any process starts
            regular = stat.S_ISREG(os.fstat(file.fileno()).st_mode)
    except OSError as e:
        raise CliError(f"{args.file}: {e.strerror}") from None
    if args.jobs > 1 and not regular:  # each process reads the file through: one stream
        raise CliError(f"--jobs: {args.jobs} processes each read the whole file, and "
                       f"{args.file} is not a regular file (a pipe gives each line to one "
                       "of them only): use --jobs 1, or a file")
    try:
        trialog = _app()  # closed before any process starts
        try:
            require_the_store_s_key(trialog, "nothing was imported")
        finally:
            trialog.close()
    except DATABASE_ERRORS as e:
        raise CliError(f"{imports.database_failure(e)}; nothing was imported: run the import "
                       "again") from None
    try:
        if args.jobs > 1:
            report = imports.run_in_processes(settings, args.file, args.actor, args.jobs)
        else:
            report = imports.run_file(settings, args.file, args.actor)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        raise CliError("interrupted: the commands of the transaction it was writing are not "
                       "written: run the import again (what was written is recognised by "
                       "its command ids)") from None
    for number, refusal in report.refused:
        print(f"line {number}: {printable(refusal)}", file=sys.stderr)
    if report.failed is not None:
        done = (f"; before it stopped: {report.accepted} accepted, {report.repeated} "
                f"repeated, {len(report.refused)} refused"
                if report.accepted or report.repeated or report.refused else "")
        raise CliError(f"{report.failed}{done}; the commands of the transaction it stopped "
                       "are not written: run the import again (what was written is "
                       "recognised by its command ids)")
    print(f"{report.accepted} accepted, {report.repeated} repeated, "
          f"{len(report.refused)} refused")
    return 1 if report.refused else 0

