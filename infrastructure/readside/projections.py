"""Followers of the notification log, and the projection that builds the read models.

A follower reads events after its recorded position in batches; what it does with a batch
and its new position commit in one transaction, so each event is applied exactly once and a
crash loses nothing. The position row is locked for the batch, so several followers of the
same name (API processes, a CLI rebuild) take turns instead of applying a batch twice.

On PostgreSQL the event store inserts under a table lock, so notification ids become
visible in order and reading ``id > position`` never skips a slow writer's event.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg
from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.orm import Session

from domain.participant import ACTIVE, Participant
from domain.revocations import AccessRegister
from domain.schedule import reminder_due, reminder_id, schedule
from domain.views import management_view
from infrastructure.audit.feed import FEED_FOLLOWER, Feed
from infrastructure.audit.history import holds_address, masked_text, with_signatures_masked
from infrastructure.readside.quarantine import quarantined_ids, release, set_aside
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.bus import WRITE_CONFLICTS
from infrastructure.store.outages import DATABASE_ERRORS, is_unavailable
from infrastructure.store.stored import (
    PARTICIPANT_TOPIC,
    as_uuid,
    decode,
    select_rows,
    stored_events,
)
from infrastructure.store.tables import (
    READ_MODELS,
    any_of,
    deviations,
    feed_events,
    insert_rows,
    participants,
    positions,
    quarantine,
    queries,
    reminder_schedule,
    scores,
    set_position,
    visits,
)

Progress = Callable[[int], None]  # called with the events done in each batch
log = logging.getLogger("trialog.projections")
GATHER_SECONDS = 0.1


class LogFollower:
    """Applies batches of the notification log; subclasses say what a batch does."""

    name = "follower"
    topic_prefix = PARTICIPANT_TOPIC

    def __init__(self, trialog: Trialog, batch_size: int = 500) -> None:
        self.trialog = trialog
        self.service = trialog.service
        self.recorder: Any = trialog.service.recorder
        self.events_table = self.recorder.events_record_cls.__table__
        self.batch_size = batch_size
        # After a batch, a busy follower waits this long for the next one to gather more
        # events: each batch costs the same few statements however many events it holds.
        # An event after a quiet spell is applied at once.
        self.gather = GATHER_SECONDS
        self._position_exists = False
        # A step's statements, built once; the values bound when run, the follower's name
        # too (a follower may be named after it is made).
        mine = positions.c.name == bindparam("follower")
        self._position = select(positions.c.position).where(mine)
        self._news = select(select(func.max(self.events_table.c.id)).scalar_subquery(),
                            self._position.scalar_subquery())
        # Locks the position row for the transaction, and reads it.
        self._claim_row = (update(positions).where(mine).values(position=positions.c.position)
                           .returning(positions.c.position))
        self._move = update(positions).where(mine).values(
            position=bindparam("position"), updated_at=bindparam("updated_at"))

    # --- positions -----------------------------------------------------------------------

    def position(self) -> int:
        with self.trialog.engine.connect() as connection:
            value = connection.execute(self._position, {"follower": self.name}).scalar()
        return int(value or 0)

    def head(self) -> int:
        """The newest notification id in the store (0 when empty)."""
        return stored_events(self.recorder)

    def ensure_position(self) -> None:
        """Creates this follower's position row (at 0) unless it exists; checked once."""
        if self._position_exists:
            return
        try:
            with self.recorder.transaction(commit=True) as session:
                exists = session.execute(
                    select(positions.c.name).where(positions.c.name == self.name)
                ).first()
                if exists is None:
                    session.execute(insert(positions).values(name=self.name, position=0))
        except WRITE_CONFLICTS:
            pass  # another process created it first
        self._position_exists = True

    def _claim(self, session: Session) -> int:
        """Locks this follower's position row for the transaction and reads it."""
        return int(session.execute(self._claim_row, {"follower": self.name}).scalar_one())

    def _move_to(self, session: Session, position: int) -> None:
        """This follower's position, in the transaction of what it applied up to there."""
        session.execute(self._move, {"follower": self.name, "position": position,
                                     "updated_at": datetime.now(UTC)})

    def _behind(self) -> bool:
        """Whether the store holds events past this follower's position: the head and the
        position in one query."""
        with self.trialog.engine.connect() as connection:
            head, position = connection.execute(self._news, {"follower": self.name}).one()
        return int(head or 0) > int(position or 0)

    # What a rebuild empties before applying every event again; forget() is called for all.
    rebuilt_tables: tuple[Any, ...] = ()

    def rebuild(self, progress: Progress | None = None) -> int:
        """Empties the follower's tables and applies every event again from the first."""
        self.ensure_position()
        with self.recorder.transaction(commit=True) as session:
            self._claim(session)
            for table in self.rebuilt_tables:
                session.execute(delete(table))
            self._move_to(session, 0)
        self.forget_all()
        return self.catch_up(progress)

    def forget_all(self) -> None:
        """Drops all the follower keeps in memory (before a rebuild)."""

    # --- batches -------------------------------------------------------------------------

    def step(self) -> int:
        """Applies the next batch; the number of notifications consumed (0: caught up)."""
        if not self._behind():
            return 0
        self.ensure_position()
        with self.recorder.transaction(commit=True) as session:
            position = self._claim(session)
            rows = self._select(session, position, self.batch_size)
            self._apply_rows(session, rows)
        return len(rows)

    def _select(self, connection: Any, position: int, limit: int) -> list[Any]:
        t = self.events_table
        return list(connection.execute(
            select_rows(t).where(t.c.id > position).order_by(t.c.id).limit(limit)).all())

    def _apply_rows(self, session: Session, rows: list[Any]) -> None:
        if not rows:
            return
        batch, broken = [], []
        for row in rows:
            if not row.topic.startswith(self.topic_prefix):
                continue
            try:
                batch.append((row.id, self._decode(row)))
            except Exception as error:  # noqa: BLE001 - an unreadable row: its participant waits
                broken.append((row, error))
        _refuse_unreadable_store(batch, broken)
        held = quarantined_ids(session, self.name)
        try:
            with session.begin_nested():
                self.apply(session, batch)
            failed: dict[Any, tuple[int, Any, BaseException]] = {}
        except Exception as error:
            if is_unavailable(error):
                raise
            failed = self._apply_one_by_one(session, batch)
        for row, error in broken:
            failed[row.originator_id] = (row.id, None, error)
        # Only a participant whose event this follower really evaluated is released.
        applied = {event.originator_id for _, event in batch if self.evaluates(event)}
        release(session, self.name, {i for i in applied - set(failed) if str(i) in held})
        for originator_id, (position, event, error) in failed.items():
            set_aside(session, self.name, originator_id, self.participant_id_of(originator_id),
                      position, type(event).__name__ if event is not None else None, error)
        self._move_to(session, rows[-1].id)

    def _apply_one_by_one(self, session: Session, batch: list[tuple[int, Any]],
                          ) -> dict[Any, tuple[int, Any, BaseException]]:
        """A batch that failed, again one event at a time, each in its own savepoint: the
        participants whose last event this follower evaluates still fails, with that event
        and the error (an event it does nothing with applies, and proves nothing)."""
        failed: dict[Any, tuple[int, Any, BaseException]] = {}
        for position, event in batch:
            self.forget(event.originator_id)
            try:
                with session.begin_nested():
                    self.apply(session, [(position, event)])
            except Exception as error:
                if is_unavailable(error):
                    raise
                self.forget(event.originator_id)
                failed[event.originator_id] = (position, event, error)
            else:
                if self.evaluates(event):
                    failed.pop(event.originator_id, None)
        return failed

    def forget(self, originator_id: Any) -> None:
        """Drops what the follower keeps in memory of a participant (after a rollback)."""

    def evaluates(self, event: Any) -> bool:
        """Whether applying ``event`` runs all this follower does for its participant (so
        that success lifts a quarantine)."""
        return True

    def participant_id_of(self, originator_id: Any) -> str:
        try:
            first: Participant = self.service.repository.get(originator_id, version=1)
            return first.participant_id
        except Exception:  # noqa: BLE001 - the stream can't even be read: name it by its id
            return str(originator_id)

    def _decode(self, row: Any) -> Any:
        return decode(self.service.mapper, row.originator_id, row.originator_version,
                      row.topic, row.state)

    def apply(self, session: Session, batch: list[tuple[int, Any]]) -> None:
        raise NotImplementedError

    def catch_up(self, progress: Progress | None = None) -> int:
        """Applies batches until the head; the number of notifications consumed."""
        done = 0
        while n := self.step():
            done += n
            if progress:
                progress(n)
        return done

    def follow(self, stop: threading.Event, wake: threading.Event | None = None,
               poll_interval: float = 0.05) -> None:
        """Applies batches until ``stop`` is set; between them waits for a PostgreSQL
        NOTIFY from the event store, an in-process ``wake``, or the poll interval."""
        waiter = _Waiter(self.trialog, self.recorder, wake, poll_interval)
        try:
            while not stop.is_set():
                try:
                    n = self.step()
                except DATABASE_ERRORS as error:
                    if not is_unavailable(error):
                        raise
                    n = 0  # the database is briefly unavailable: wait and try again
                    waiter.reset()
                    time.sleep(max(poll_interval, 0.5))
                if n < self.batch_size:
                    waiter.wait()
                    if n and self.gather:  # busy: let the next batch gather more events
                        stop.wait(self.gather)
        finally:
            waiter.close()


def _refuse_unreadable_store(batch: list[Any], broken: list[Any]) -> None:
    """A batch in which no row of any participant can be read is not one participant's
    fault (another cipher key, a damaged store): the follower stops, loudly, rather than
    set everyone aside and move past every event."""
    if broken and not batch and len({row.originator_id for row, _ in broken}) > 1:
        row, error = broken[0]
        raise UnreadableStore(
            f"no event of this batch can be read (from position {row.id}): {error!r}; "
            "check TRIALOG_CIPHER_KEY") from error


class UnreadableStore(RuntimeError):
    pass


class _Waiter:
    """Waits for news of the event store: PostgreSQL's NOTIFY on a listening connection
    (made again after the database comes back), or an in-process wake and a poll."""

    def __init__(self, trialog: Trialog, recorder: Any, wake: threading.Event | None,
                 poll_interval: float) -> None:
        self.wake = wake or threading.Event()
        self.poll_interval = poll_interval
        self.channel = recorder.channel_name
        self.url = (None if trialog.settings.is_sqlite else
                    trialog.settings.database_url.replace("postgresql+psycopg://",
                                                          "postgresql://"))
        self.connection: Any = None

    def wait(self) -> None:
        if self.url is None:
            self.wake.wait(self.poll_interval)
            self.wake.clear()
            return
        try:
            if self.connection is None:
                self.connection = psycopg.connect(self.url, autocommit=True)
                self.connection.execute(f"LISTEN {self.channel}")
            for _ in self.connection.notifies(timeout=self.poll_interval * 4, stop_after=1):
                pass
        except psycopg.OperationalError:  # the database went away: listen again later
            self.reset()
            time.sleep(max(self.poll_interval, 0.5))

    def reset(self) -> None:
        if self.connection is not None:
            try:
                self.connection.close()
            except psycopg.Error:
                pass
        self.connection = None

    def close(self) -> None:
        self.reset()


# The rules the read models are rendered by: raised with each change of what they hold
# (0035: a query step's reason beside its text). Read models a process of older rules
# rendered (one still following while the migration that empties them ran, or after it)
# are rendered again when a follower of these rules starts.
RULES = 35
RULES_ROW = "trial:rules"


class TrialProjection(LogFollower):
    """Builds rm_participants, rm_visits, rm_deviations and rm_scores from participant
    events, by applying them to aggregates kept in a bounded cache."""

    name = "trial"
    rebuilt_tables = READ_MODELS
    _rules_checked = False

    def rebuild(self, progress: Progress | None = None) -> int:
        self._stamp_rules()  # rendered from the first by these rules, whoever stops it
        self._rules_checked = True
        return super().rebuild(progress)

    def catch_up(self, progress: Progress | None = None) -> int:
        self.check_rules()
        return super().catch_up(progress)

    def follow(self, stop: threading.Event, wake: threading.Event | None = None,
               poll_interval: float = 0.05) -> None:
        self.check_rules()
        super().follow(stop, wake, poll_interval)

    def check_rules(self) -> None:
        """Renders the read models again if a process of older rules rendered any since
        they were emptied for these (see RULES); else records that they are these rules'
        from here on. Once a process."""
        if self._rules_checked:
            return
        with self.trialog.engine.connect() as connection:
            found = dict(connection.execute(select(positions.c.name, positions.c.position)
                                            .where(positions.c.name.in_((self.name,
                                                                          RULES_ROW)))).all())
        if found.get(RULES_ROW, 0) < RULES:
            if found.get(self.name, 0) > 0:
                log.warning("the read models hold rows rendered by older rules than this "
                            "release's (a process of an earlier release followed the log "
                            "after the migration that emptied them): rendering them again")
                self.rebuild()
            else:
                self._stamp_rules()
        self._rules_checked = True  # (not before: a start that failed checks again)

    def _stamp_rules(self) -> None:
        try:
            with self.recorder.transaction(commit=True) as session:
                set_position(session, RULES_ROW, RULES, updated_at=datetime.now(UTC))
        except WRITE_CONFLICTS:
            pass  # another process stamped it first

    def __init__(self, trialog: Trialog, batch_size: int = 500,
                 cache_size: int = 50_000) -> None:
        super().__init__(trialog, batch_size)
        self.cache: OrderedDict[UUID, Participant] = OrderedDict()
        self.cache_size = cache_size
        postgres = trialog.engine.dialect.name == "postgresql"
        gone = [delete(table).where(any_of(table.c.participant_id, postgres))
                for table in READ_MODELS]
        # The batch's participants' old rows, gone from every read model: on PostgreSQL in
        # one statement (the other tables' deletes as its WITH clauses, all of which run).
        self._deletes = gone if not postgres else [gone[0].add_cte(
            *(statement.cte(f"gone_{table.name}")
              for table, statement in zip(READ_MODELS[1:], gone[1:], strict=True)))]

    def apply(self, session: Session, batch: list[tuple[int, Any]]) -> None:
        touched: dict[str, tuple[Participant, int]] = {}
        for position, event in batch:
            participant = event.mutate(self._before(event))
            self._remember(participant)
            touched[participant.participant_id] = (participant, position)
        if touched:
            self._write(session, touched.values())

    def _before(self, event: Any) -> Participant | None:
        """The participant as it was just before ``event``."""
        if event.originator_version == 1:
            return None
        cached = self.cache.get(event.originator_id)
        if cached is not None and cached.version == event.originator_version - 1:
            return cached
        # Not cached, or another process applied events in between: read it back.
        participant: Participant = self.service.repository.get(
            event.originator_id, version=event.originator_version - 1
        )
        return participant

    def forget(self, originator_id: Any) -> None:
        self.cache.pop(originator_id, None)

    def _remember(self, participant: Participant) -> None:
        self.cache[participant.id] = participant
        self.cache.move_to_end(participant.id)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)

    def _write(self, session: Session,
               touched: Iterable[tuple[Participant, int]]) -> None:
        rows: dict[Any, list[dict[str, Any]]] = {t: [] for t in READ_MODELS}
        ids = []
        for participant, position in touched:
            ids.append(participant.participant_id)
            for table, row in read_model_rows(participant, self.trialog, position):
                rows[table].append(row)
        for statement in self._deletes:
            session.execute(statement, {"ids": ids})
        for table in READ_MODELS:
            insert_rows(session, table, rows[table])

    def forget_all(self) -> None:
        self.cache.clear()


def read_model_rows(p: Participant, trialog: Trialog,
                    position: int) -> Iterable[tuple[Any, dict[str, Any]]]:
    """The read-model rows of one participant, as (table, row) pairs."""
    screening = p.screening
    eligible, failed = p.eligibility_now(trialog.protocol)
    scored = p.scores()
    management = management_view(p)
    with_signatures_masked([*management["visits"].values(), management["casebook"]])
    yield participants, {
        "participant_id": p.participant_id, "site_id": p.site_id, "status": p.status,
        "arm": p.arm, "version": p.version, "language": screening["language"],
        "eligible": eligible, "failed_criteria": failed,
        "screened_on": screening["screened_on"], "registered_on": p.registered_on,
        "left_on": p.withdrawn_on("study"),
        "scores": scored, "position": position, "management": management,
    }
    for q in p.queries.values():
        yield queries, {
            "query_id": q["query_id"], "participant_id": p.participant_id,
            "site_id": p.site_id, "status": q["status"], "target": q["target"],
            "opened_at": datetime.fromisoformat(q["opened_at"]),
            "opened_by": q["opened_by"], "thread": without_addresses(q["thread"]),
        }
    completed = p.completed_visits()
    if p.registered_on is not None:
        for sequence, visit in enumerate(schedule(trialog.protocol, p.registered_on)):
            done = completed.get(visit.code)
            yield visits, {
                "participant_id": p.participant_id, "code": visit.code, "sequence": sequence,
                "target": visit.target, "window_start": visit.window_start,
                "window_end": visit.window_end,
                "completed_on": done["completed_on"] if done else None,
                "missed": visit.code in p.missed_visits,
            }
            if p.status not in ACTIVE or done or visit.code in p.missed_visits:
                continue
            for offset in trialog.protocol.reminders:
                yield reminder_schedule, {
                    "reminder_id": reminder_id(p.id, visit.code, offset.kind),
                    "participant_id": p.participant_id, "visit": visit.code,
                    "kind": offset.kind, "due_on": reminder_due(visit, offset),
                    "until": visit.window_end, "position": position,
                }
    for code, visit_scores in scored.items():
        bpi = completed[code].get("bpi_sf") or {}
        average = bpi.get("average")
        yield scores, {"participant_id": p.participant_id, "visit": code, "arm": p.arm,
                       "bpi_average": float(average) if average is not None else None,
                       **visit_scores}
    for d in p.deviations.values():
        yield deviations, {
            "deviation_id": d["deviation_id"], "participant_id": p.participant_id,
            "code": d["code"], "severity": d["severity"], "status": d["status"],
            "detail": d["detail"], "evidence": list(d["evidence"]),
            "detected_at": datetime.fromisoformat(d["detected_at"]),
            "resolution": masked_text(d["resolution"]),
        }


# The access register's event types (its CloudEvents' subject is access/<study>).
REGISTER_TYPES = sorted(name for name, kind in vars(AccessRegister).items()
                        if isinstance(kind, type) and name not in ("Event", "Created"))


class FeedProjection(LogFollower):
    """Renders the event feed's pages ahead into rm_feed: every event of the log (the
    participants', the allocation sequences', the trial's), one row per position. An event
    that can't be rendered gets a row without a body, and the feed reads it from the store
    when asked, as it does the positions this follower has not reached; its stream is set
    aside (shown as the other followers' are) until every such event of it reads again."""

    name = FEED_FOLLOWER
    topic_prefix = ""
    rebuilt_tables = (feed_events,)

    def __init__(self, trialog: Trialog, batch_size: int = 1000) -> None:
        super().__init__(trialog, batch_size)
        self.feed = Feed(trialog)

    def follow(self, stop: threading.Event, wake: threading.Event | None = None,
               poll_interval: float = 0.05) -> None:
        """As every follower, once rm_feed is known to be this release's (see
        ``rendered_before``)."""
        if self.rendered_before():
            log.warning("rm_feed holds rows rendered by a release before migration 0034 "
                        "(one still following while it ran): rendering them again")
            self.rebuild()
        super().follow(stop, wake, poll_interval)

    def rendered_before(self) -> bool:
        """Whether rm_feed holds an access register's event under the study's subject, as
        a release before migration 0034 rendered them: one still running while the
        migration emptied rm_feed renders it again so, the seals holding."""
        with self.trialog.engine.connect() as connection:
            return connection.execute(
                select(feed_events.c.position).where(
                    feed_events.c.subject == self.trialog.protocol.study_id,
                    feed_events.c.type.in_(REGISTER_TYPES)).limit(1)).first() is not None

    def _apply_rows(self, session: Session, rows: list[Any]) -> None:
        if not rows:
            return
        failed: dict[Any, tuple[Any, str, BaseException]] = {}
        rendered = self.feed.render(session, rows, failed)
        if len(failed) > 1 and all(r["body"] is None for r in rendered):
            error = next(iter(failed.values()))[2]  # as _refuse_unreadable_store
            raise UnreadableStore(f"no event of this batch can be read (from position "
                                  f"{rows[0].id}): {error!r}; check TRIALOG_CIPHER_KEY")
        insert_rows(session, feed_events, rendered)
        self._release_readable(session, set(failed))
        for originator_id, (row, subject, error) in failed.items():
            set_aside(session, self.name, originator_id, subject, row.id,
                      row.topic.rsplit(".", 1)[-1], error)
        self._move_to(session, rows[-1].id)

    def _release_readable(self, session: Session, failing: set[Any]) -> None:
        """Lifts the quarantine of streams whose every event it could not render reads
        again (the rows repaired: the feed reads them from the store, as it did not render
        them). One query when none is set aside."""
        held = {subject: originator_id for originator_id, subject in session.execute(
            select(quarantine.c.originator_id, quarantine.c.participant_id).where(
                quarantine.c.follower == self.name))
            if as_uuid(originator_id) not in failing}
        if not held:
            return
        unrendered = session.execute(select(feed_events.c.position, feed_events.c.subject)
                                     .where(feed_events.c.subject.in_(sorted(held)),
                                            feed_events.c.body.is_(None))).all()
        table = self.events_table
        rows = session.execute(select_rows(table).where(
            table.c.id.in_(sorted(r.position for r in unrendered)))).all()
        unreadable = {as_uuid(row.originator_id) for row in rows if not self.feed.readable(row)}
        release(session, self.name, {originator_id for originator_id in held.values()
                                     if as_uuid(originator_id) not in unreadable})


def without_addresses(thread: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A query's thread as the read models keep it (in plain text, for every role): each
    message's text and reason as ``masked_text`` gives them; the record keeps them whole,
    encrypted, for the history of those with contact rights."""
    return [{**m, **{name: masked_text(m[name]) for name in ("text", "reason")
                     if holds_address(m.get(name))}} for m in thread]


def follow_all(trialog: Trialog, stop: threading.Event,
               batch_size: int | None = None) -> list[tuple[threading.Thread, threading.Event]]:
    """The read models' and the feed's followers, each in a thread of its own until
    ``stop``, each with the event that wakes it before its next poll. A failed batch is
    rolled back, logged and tried again."""
    started = []
    for follower in (TrialProjection(trialog), FeedProjection(trialog)):
        if batch_size:
            follower.batch_size = batch_size
        wake = threading.Event()
        thread = threading.Thread(target=_keep_following, args=(follower, stop, wake),
                                  name=f"{follower.name}-follower", daemon=True)
        thread.start()
        started.append((thread, wake))
    return started


def _keep_following(follower: LogFollower, stop: threading.Event,
                    wake: threading.Event) -> None:
    while not stop.is_set():
        try:
            follower.follow(stop, wake)
        except Exception:  # keep following: a failed batch is rolled back and retried
            log.exception("%s batch failed; retrying", follower.name)
            stop.wait(1.0)


def followers(trialog: Trialog) -> list[LogFollower]:
    """Every follower of the notification log, for status reports (the reminder schedule
    is one of the trial projection's read models)."""
    from infrastructure.jobs.monitor import DeviationMonitor

    return [TrialProjection(trialog), FeedProjection(trialog), DeviationMonitor(trialog)]
