"""The trialog command line."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, NoReturn

from domain.errors import DomainError, ProtocolError
from domain.management import CASEBOOK, visit_key
from infrastructure.audit.exports import FORMATS
from infrastructure.audit.history import history
from infrastructure.audit.verification import check_store
from infrastructure.store import migrations, revocations
from infrastructure.store.bootstrap import Trialog, bootstrap
from infrastructure.store.schemas import MOMENT_RULE, in_utc
from infrastructure.store.settings import Settings, SettingsError, sqlite_file
from infrastructure.store.stored import key_opens, stored_events
from infrastructure.store.tokens import check_name


class CliError(Exception):
    """A failure reported as one line on standard error."""


def parse_moment(text: str) -> datetime:
    """An ISO date or datetime; a time without zone is UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"--as-of: {text!r} is not an ISO 8601 date or datetime") from None
    moment = in_utc(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    if moment is None:
        raise CliError(f"--as-of: {text!r} {MOMENT_RULE}")
    return moment


def _json_default(value: Any) -> str:
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    raise TypeError(repr(value))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=_json_default, ensure_ascii=False))


def _app(reads: bool = False) -> Trialog:
    """The application. A command that only ``reads`` a store does not create one: a
    mistyped SQLite path made a new, empty file that verified `ok`. A PostgreSQL
    database without Trialog's tables (or with older ones) is refused before anything is
    made there (`trialog db upgrade` makes them)."""
    file = sqlite_file(os.environ)
    if reads and file is not None and not file.exists():  # (nor its secrets beside it)
        raise CliError(f"TRIALOG_DATABASE_URL: there is no SQLite file {file}: this command "
                       "reads a store and makes none")
    settings = Settings.from_env()
    _not_migrated_later(settings)
    if not settings.is_sqlite and migrations.behind_at(settings.database_url):
        raise CliError(NO_TABLES)  # before the library makes its tables there
    return bootstrap(settings)


WRONG_KEY = ("TRIALOG_CIPHER_KEY: none of the store's oldest events decrypts with it: it "
             "is not the key this store was written with (or they were damaged: `trialog "
             "audit verify` tells); {}")


def require_the_store_s_key(trialog: Trialog, nothing: str) -> None:
    """Refuses a store whose oldest events TRIALOG_CIPHER_KEY does not open: written with
    another key, what this process writes would never be read with the store's own.
    ``nothing`` says what is not done."""
    if not key_opens(trialog.service):
        raise CliError(WRONG_KEY.format(nothing))


def _not_migrated_later(settings: Settings) -> None:
    """A process of this release on a database a later release migrated would show and
    write what that release's migrations changed: it does not start (on SQLite, every
    command's migration refuses such a file)."""
    file = sqlite_file({"TRIALOG_DATABASE_URL": settings.database_url})
    if settings.is_sqlite and (file is None or not file.is_file()):
        return  # none yet (looking would make one)
    later = migrations.later(settings.database_url)
    if later is not None:
        raise CliError(migrations.later_refusal(later))


def cmd_demo(args: argparse.Namespace) -> int:
    from infrastructure.cli.demo import run_demo

    path = Path(args.database)
    if path.exists() and not _a_demo_s(path):
        raise CliError(f"--database: {path} exists and is not a demo's database (the demo "
                       "replaces its file and keys): give another path")
    summary = run_demo(path, participants=args.participants, seed=args.seed)
    print(format_summary(summary))
    print(f"\nSQLite file: {path.resolve()}")
    # Quoted as a shell reads it: a path may hold a space.
    url = shlex.quote(f"sqlite:///{path.resolve()}")
    program = shlex.quote(str(Path(sys.executable).with_name("trialog")))
    print(f"Try: TRIALOG_DATABASE_URL={url} {program} audit verify")
    return 0


def _a_demo_s(path: Path) -> bool:
    """Whether a file is a database the demo made (its seed file says so)."""
    try:
        return Path(f"{path}.seed").read_text().startswith("demo-")
    except OSError:
        return False


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"Trial summary: {s['participants']} participants"]
    for title, key in (("By status", "by_status"), ("By arm", "by_arm"), ("By site", "by_site"),
                       ("Deviations by code", "deviations_by_code")):
        counts = s[key]
        lines.append(f"\n{title}:")
        lines += [f"  {name:<28}{n:>5}" for name, n in counts.items()] or ["  (none)"]
    lines.append("\nMean BPI average pain by arm and visit:")
    for arm, visits in s["mean_pain_by_arm_and_visit"].items():
        for visit, v in visits.items():
            lines.append(f"  {arm:<9}{visit:<19}{v['mean']:>6.2f}  (n={v['n']})")
    return "\n".join(lines)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    _not_migrated_later(settings)
    before = migrations.tables_and_revision(settings.database_url)
    trialog = bootstrap(settings, migrate=False)
    try:
        migrations.upgrade(trialog.engine)
        recorded = revocations.record_earlier(trialog)
    finally:
        trialog.close()
    if recorded.grants:
        print(f"recorded {recorded.grants} earlier grants of access in the access register")
    if recorded.revocations:
        print(f"recorded {recorded.revocations} earlier revocations in the access register")
    after = migrations.tables_and_revision(settings.database_url)
    created = sorted(after[0] - before[0])
    if created:
        print(f"created {len(created)} tables: {', '.join(created)}")
    if before[1] != after[1]:
        print(f"migrated from revision {before[1] or 'none'} to {after[1]}")
    else:
        print(f"tables are up to date (revision {after[1]})")
    return 0


def cmd_audit_history(args: argparse.Namespace) -> int:
    from domain.views import participant_state

    if args.as_of and args.version is not None:
        raise CliError("give --as-of or --version, not both")
    if args.version is not None and not 1 <= args.version <= 2**31:  # as the API's
        raise CliError(f"--version: {args.version} is not a version (they start at 1; at "
                       f"most {2**31})")
    trialog = _app(reads=True)
    try:
        as_of = parse_moment(args.as_of) if args.as_of else None
        entries = history(trialog.service, args.participant_id, as_of, args.version,
                          veil=trialog.veil_digest)
        if not entries:
            trialog.service.get_participant(args.participant_id)  # 'not found' when unknown
            raise CliError(f"participant {args.participant_id} has no events recorded by "
                           f"{args.as_of or f'version {args.version}'}")
        # The state the record gave at the last event shown, on that event's day at the
        # participant's site.
        last = entries[-1]
        if args.version is not None and last["version"] != args.version:
            raise CliError(f"participant {args.participant_id} has no version "
                           f"{args.version} (its newest is {last['version']})")
        participant = trialog.service.get_participant(args.participant_id,
                                                      version=last["version"])
        moment = datetime.fromisoformat(last["recorded_at"])
        state = participant_state(participant, trialog.protocol,
                                  trialog.protocol.day_at(participant.site_id, moment),
                                  contact=True)
    finally:
        trialog.close()
    if args.format == "json":
        _print_json({"participant_id": args.participant_id, "events": entries,
                     "state": state})
        return 0
    for e in entries:
        reason = f"  reason: {e['reason']}" if e["reason"] else ""
        print(f"v{e['version']:<4} {e['recorded_at']:<33} {e['type']:<22} "
              f"by {e['actor']}  command {e['command_id']}{reason}")
        print(f"      {json.dumps(e['data'], default=_json_default, ensure_ascii=False)}")
        if e["type"] == "RecordSigned":  # the signature's manifestation (Part 11 §11.50)
            d = e["data"]
            print(f"      signed by {d['printed_name']} ({d['signed_by']}) at "
                  f"{e['recorded_at']}, meaning: {d['meaning']}")
    print(f"\nState at v{state['version']} ({last['recorded_at']}): {state['status']}, "
          f"arm {state['arm'] or '-'}, site {state['site_id']}, "
          f"{len(state['open_deviations'])} open deviations, "
          f"{state['open_queries']} open queries")
    for visit in state["visits"]:
        scores = state["scores"].get(visit["code"], {})
        shown = ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if v is not None)
        print(f"  {visit['code']:<18} {visit['status']:<12} {shown}")
        marks = [visit["sdv"].replace("_", " ")] if visit["sdv"] != "not_verified" else []
        marks += ["locked"] if visit["locked"] else []
        if visit["signature"]:
            marks.append(_signature_text(visit["signature"], participant.signatures.get(
                visit_key(visit["code"]))))
        if marks:
            print(f"  {'':<18} {'; '.join(marks)}")
    casebook = state["casebook"]
    if casebook["signature"] or casebook["locked"]:
        marks = ["locked"] if casebook["locked"] else []
        marks += [_signature_text(casebook["signature"], participant.signatures.get(
            CASEBOOK))] if casebook["signature"] else []
        print(f"  casebook: {'; '.join(marks)}")
    return 0


# Why a signature no longer holds, by the cause its SignatureInvalidated records.
INVALIDATED = {"corrected": "its data were corrected since",
               "new data": "new data of it were recorded since",
               "unlocked": "it was unlocked since"}


def _signature_text(signature: dict[str, Any], recorded: dict[str, Any] | None) -> str:
    cause = (recorded or {}).get("cause")
    valid = "" if signature["valid"] else \
        f" (no longer valid: {INVALIDATED.get(cause, cause or 'see its history')})"
    return (f"signed by {signature['printed_name']} ({signature['signed_by']}) at "
            f"{signature['signed_at']}, meaning: {signature['meaning']}{valid}")


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # loaded by the commands that draw a bar (a twentieth of a second)

    tqdm.monitor_interval = 0  # no monitor thread: the check may fork its workers
    trialog = _app(reads=True)
    try:
        total = stored_events(trialog.service.recorder)
        with tqdm(total=total, unit="ev", desc="verifying", disable=args.quiet,
                  file=sys.stderr) as bar:
            report = check_store(trialog, args.processes, progress=bar.update, deep=args.deep)
    finally:
        trialog.close()
    answer = report.as_dict()
    _print_json(answer)
    if not args.quiet:
        print(f"{report.events_checked} events checked "
              f"({answer['events_per_second']:,} events/s)", file=sys.stderr)
    return 0 if report.ok else 1


def _role_and_sites(parser: argparse.ArgumentParser) -> None:
    from infrastructure.store.tokens import ROLES

    parser.add_argument("--role", required=True, choices=ROLES)
    parser.add_argument("--site", action="append", default=[], metavar="SITE",
                        help="a site the caller sees (repeat for more); required, or "
                             "--all-sites, for every role but admin and auditor")
    parser.add_argument("--all-sites", action="store_true", help="every site")


class _Parser(argparse.ArgumentParser):
    """argparse's, but an argument that can't work is one line naming it, as every other
    failure is (not the usage first: `--help` shows it); exit code 2, as argparse's."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from infrastructure.cli.ops import (
        cmd_deviations_scan,
        cmd_export,
        cmd_import,
        cmd_projections_follow,
        cmd_projections_rebuild,
        cmd_projections_status,
        cmd_reminders_resolve,
        cmd_reminders_scan,
        cmd_reminders_uncertain,
        cmd_serve,
        cmd_token_create,
        cmd_token_revoke,
        cmd_user_create,
        cmd_user_disable,
        cmd_user_password,
        cmd_webhook_add,
        cmd_webhook_list,
        cmd_webhook_redeliver,
        cmd_webhook_rotate,
    )

    parser = _Parser(prog="trialog", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="simulate a cohort on SQLite and print the summary")
    demo.add_argument("--participants", type=_at_least_one, default=40)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--database", default="trialog-demo.db")
    demo.set_defaults(func=cmd_demo)

    db = sub.add_parser("db", help="database tables").add_subparsers(dest="db", required=True)
    db.add_parser("upgrade", help="create or migrate the tables").set_defaults(
        func=cmd_db_upgrade)

    audit = sub.add_parser("audit", help="history and verification").add_subparsers(
        dest="audit", required=True)
    hist = audit.add_parser("history", help="the timeline of one participant")
    hist.add_argument("participant_id")
    hist.add_argument("--as-of", help="recording time (ISO 8601; no zone means UTC)")
    hist.add_argument("--version", type=int,
                      help="the timeline up to and including this version of the participant")
    hist.add_argument("--format", choices=("table", "json"), default="table")
    hist.set_defaults(func=cmd_audit_history)
    ver = audit.add_parser("verify", help="check every stored event's hash chain")
    ver.add_argument("--quiet", action="store_true")
    ver.add_argument("--deep", action="store_true",
                     help="also recompute every event's digest from its content")
    ver.add_argument("--processes", type=_at_least_one, default=None,
                     help="worker processes for a deep check of a big store "
                          "(default: one per CPU)")
    ver.set_defaults(func=cmd_audit_verify)

    serve = sub.add_parser("serve", help="the HTTP API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument("--threads", type=_at_least_one, default=None,
                       help="threads per process (default 16; with --workers, twice the "
                            "cores plus one, at most 16)")
    serve.add_argument("--workers", type=_at_least_one, default=1,
                       help="processes (more than 1: granian, one projection follower)")
    serve.add_argument("--dev", action="store_true", help="Flask's development server")
    serve.add_argument("--no-projection", action="store_true",
                       help="don't follow the event log here (run `trialog projections "
                            "follow` beside it instead)")
    serve.set_defaults(func=cmd_serve)

    token = sub.add_parser("token", help="API tokens").add_subparsers(dest="token",
                                                                       required=True)
    create = token.add_parser("create", help="print a new token (only its hash is kept)")
    create.add_argument("--name", required=True, help="who the token is; the events' actor")
    _role_and_sites(create)
    _access_reason(create, "granted")
    create.set_defaults(func=cmd_token_create)
    revoke = token.add_parser("revoke", help="refuse a token from the next request on")
    revoke.add_argument("name", help="the token's name")
    _access_reason(revoke, "revoked")
    revoke.set_defaults(func=cmd_token_revoke)

    user = sub.add_parser("user", help="people who sign in and sign records").add_subparsers(
        dest="user", required=True)
    create_user = user.add_parser("create", help="a person with a role, sites and a password")
    create_user.add_argument("--login", required=True, help="what the person signs in with; "
                                                            "the events' actor")
    create_user.add_argument("--name", required=True, help="the person's full name")
    create_user.add_argument("--password-stdin", action="store_true",
                             help="read the password from the first line of standard input")
    _role_and_sites(create_user)
    _access_reason(create_user, "granted")
    create_user.set_defaults(func=cmd_user_create)
    disable = user.add_parser("disable", help="refuse a person from the next request on")
    disable.add_argument("login")
    _access_reason(disable, "disabled")
    disable.set_defaults(func=cmd_user_disable)
    password = user.add_parser("password", help="give a person a new password (a reset: "
                                                "their sessions end)")
    password.add_argument("login")
    password.add_argument("--password-stdin", action="store_true",
                          help="read the password from the first line of standard input")
    password.set_defaults(func=cmd_user_password)

    importing = sub.add_parser("import", help="apply NDJSON commands, many per transaction")
    importing.add_argument("file", help="one command body a line, as POST /v1/commands "
                                        "takes it")
    importing.add_argument("--actor", default="import", type=_import_actor,
                           help="the actor of the events written (default: import)")
    importing.add_argument("--jobs", type=int, default=1, metavar="N",
                           help="N processes (PostgreSQL), the file shared by site: each "
                                "participant's lines in the file's order (default: 1, the "
                                "whole file in order)")
    importing.set_defaults(func=cmd_import)

    webhook = sub.add_parser("webhook", help="event delivery to other systems").add_subparsers(
        dest="webhook", required=True)
    add = webhook.add_parser("add", help="a subscription; prints its id and secret once")
    add.add_argument("--url", required=True, help="where the events are POSTed")
    add.add_argument("--site", action="append", default=[], metavar="SITE",
                     help="only this site's events (repeat for more; default every site)")
    add.add_argument("--type", action="append", default=[], metavar="TYPE",
                     help="only events of this type, e.g. VisitCompleted (repeat for more)")
    add.set_defaults(func=cmd_webhook_add)
    webhook.add_parser("list", help="subscriptions, positions and failures").set_defaults(
        func=cmd_webhook_list)
    again = webhook.add_parser("redeliver", help="send a subscription's failed deliveries "
                                                 "again")
    again.add_argument("webhook_id")
    again.set_defaults(func=cmd_webhook_redeliver)
    rotate = webhook.add_parser("rotate", help="a new secret (the old one also signs for "
                                               "24 hours); prints it once")
    rotate.add_argument("webhook_id")
    rotate.set_defaults(func=cmd_webhook_rotate)

    projections = sub.add_parser("projections", help="read models").add_subparsers(
        dest="projections", required=True)
    rebuild = projections.add_parser("rebuild", help="rebuild the read models and the "
                                                     "feed's pages from event 1")
    rebuild.add_argument("name", nargs="?", default="all", choices=("all", "trial", "feed"))
    rebuild.add_argument("--batch-size", type=_at_least_one, default=5000)
    rebuild.add_argument("--quiet", action="store_true")
    rebuild.set_defaults(func=cmd_projections_rebuild)
    projections.add_parser("status", help="position and lag of each follower").set_defaults(
        func=cmd_projections_status)
    follow = projections.add_parser("follow", help="keep the read models and the feed's "
                                                   "pages up to date")
    follow.add_argument("--batch-size", type=_at_least_one, default=500)
    follow.set_defaults(func=cmd_projections_follow)

    groups = {}
    for name, func, text, scan in (
            ("reminders", cmd_reminders_scan,
             "visit reminders: a scan now; those that may have been emailed",
             "the reminders due now"),
            ("deviations", cmd_deviations_scan, "deviation rules now",
             "the deviation rules now")):
        group = sub.add_parser(name, help=text).add_subparsers(dest=name, required=True)
        group.add_parser("scan", help=f"one scan of {scan}").set_defaults(func=func)
        groups[name] = group
    groups["reminders"].add_parser(
        "uncertain", help="the reminders that may have been emailed (a sender stopped, or "
                          "the connection failed, while SMTP talked), never emailed again "
                          "until resolved; one JSON object a line"
    ).set_defaults(func=cmd_reminders_uncertain)
    resolving = groups["reminders"].add_parser(
        "resolve", help="an uncertain reminder, from the SMTP server's log: --sent records "
                        "its ReminderSent; --not-sent hands it to the next scan")
    resolving.add_argument("reminder_id", help="as trialog reminders uncertain lists it")
    answer = resolving.add_mutually_exclusive_group(required=True)
    answer.add_argument("--sent", action="store_true", help="the server took it")
    answer.add_argument("--not-sent", action="store_true", help="the server never had it")
    resolving.add_argument("--actor", required=True, type=_actor,
                           help="who resolves it; the event's actor")
    resolving.add_argument("--reason", required=True,
                           help="what showed it (kept on the row, and with the event)")
    resolving.set_defaults(func=cmd_reminders_resolve)

    export = sub.add_parser("export", help="the trial's data, to standard output or a file")
    export.add_argument("format", choices=FORMATS)
    export.add_argument("--output", help="a file instead of standard output")
    export.add_argument("--deidentify", action="store_true",
                        help="pseudonymous ids, dates shifted per participant")
    export.set_defaults(func=cmd_export)
    return parser


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _at_least_one(text: str) -> int:
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _port(text: str) -> int:
    """A port from 1 to 65535, or 0: one the system picks."""
    value = _whole_number(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 0 to 65535, not {value}")
    return value


def _actor(text: str, own: frozenset[str] = frozenset()) -> str:
    """Who the events written are by: a name as a token's is (1-100 printable characters,
    no surrounding spaces, none of the system's own actors' but ``own``)."""
    try:
        check_name(text, "--actor", own)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--actor: ")) from None
    return text


def _reason(value: str) -> str:
    """A reason, as a command's: 1-2000 characters, none a control character, one a
    reader sees."""
    from marshmallow import ValidationError

    from infrastructure.store.schemas import text

    try:
        text(1, 2000).deserialize(value)
    except ValidationError as e:
        raise argparse.ArgumentTypeError("; ".join(map(str, e.messages))) from None
    return value


def _access_reason(parser: argparse.ArgumentParser, done: str) -> None:
    parser.add_argument("--reason", type=_reason,
                        help=f"why access is {done} (kept with the access register's event)")


def _import_actor(text: str) -> str:
    """An import's actor: its own default, ``import``, or a name as ``_actor`` takes."""
    return _actor(text, frozenset({"import"}))


NO_TABLES = "the database has no Trialog tables (or older ones): run `trialog db upgrade`"


def _one_line(error: Exception) -> str:
    """A failure as one line: the database's own say a migration is missing as such."""
    if _no_tables(error):
        return NO_TABLES
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _no_tables(error: Exception) -> bool:
    import psycopg

    origin = getattr(error, "orig", None)
    return isinstance(origin, psycopg.errors.UndefinedTable) or "no such table" in str(origin)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (CliError, DomainError, SettingsError, ProtocolError) as e:
        print(f"trialog: {e}", file=sys.stderr)
        code = 1
    except BrokenPipeError:  # the reader went away (``| head``): nothing more to say
        _stdout_to_nowhere()
        return 0
    except Exception as e:  # noqa: BLE001 - every failure is one line, not a traceback
        if isinstance(e, OSError) and _flushed(0) != 0:  # the output itself (said there)
            return 1
        print(f"trialog: {_one_line(e)}", file=sys.stderr)
        code = 1
    return _flushed(code)


def _flushed(code: int) -> int:
    """The exit code once what is left of standard output is written: a closed pipe or a
    full disk shows here, as one line (at the interpreter's exit it would be a warning
    and exit code 120)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_to_nowhere()
    except OSError as e:
        _stdout_to_nowhere()
        print(f"trialog: can't write the output: {e.strerror or e}", file=sys.stderr)
        return 1
    return code


def _stdout_to_nowhere() -> None:
    """Standard output pointed at the null device, so that the interpreter's last flush
    of what could not be written fails no more (when it is a file descriptor at all)."""
    import os

    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):
        return
    nowhere = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(nowhere, fd)
    finally:
        os.close(nowhere)

if __name__ == "__main__":
    sys.exit(main())
