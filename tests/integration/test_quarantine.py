"""One participant can never stop the others: an event a follower of the log can't apply
sets its participant aside (stored, shown), the follower moves on, and the participant's
next event tries again."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from domain import commands as c
from domain.participant import Participant
from infrastructure.jobs.monitor import DeviationMonitor
from infrastructure.readside.projections import TrialProjection
from infrastructure.readside.quarantine import listing
from infrastructure.store.tables import deviations, participants, scores
from tests.integration.helpers import REGISTERED, dose, enrol, send
from tests.integration.test_cli import TEST_KEY, run


def visit(day: int = 0) -> dict:
    return {"visit": "baseline", "completed_on": REGISTERED.replace(day=REGISTERED.day + day),
            "fact_es": {"GE2": 1, "GE3": 1, "GE4": 1}}


def write_straight_into_the_store(t, pid: str, target_version: int | None, field: str,
                                  value) -> None:
    """A DataCorrected that no command would accept, stored by the library's recorder
    directly (not applied to the aggregate first, so it may be one that can't be)."""
    participant = t.service.get_participant(pid)
    target = (participant.event_id_of(target_version) if target_version
              else str(uuid.uuid4()))
    event = Participant.DataCorrected(
        originator_id=participant.id, originator_version=participant.version + 1,
        timestamp=datetime.now(UTC), command_id=str(uuid.uuid4()),
        actor="straight-into-the-store", reason="test", previous_digest=participant.chain_head,
        target_event_id=target, field=field, previous_value=None, value=value)
    t.service.recorder.insert_events([t.service.mapper.to_stored_event(event)])


def quarantined(t, follower: str) -> dict[str, dict]:
    with t.engine.connect() as connection:
        return {q["participant_id"]: q for q in listing(connection)
                if q["follower"] == follower}


def row(t, table, pid: str):
    with t.engine.connect() as connection:
        return connection.execute(select(table).where(table.c.participant_id == pid)).first()


def test_the_read_models_set_a_bad_participant_aside_and_a_correction_repairs_it(isolated):
    t = isolated
    bad, good = enrol(t), enrol(t)
    visit_version = send(t, c.CompleteVisit(bad, visit()))["version"]
    write_straight_into_the_store(t, bad, visit_version, "fact_es.GE1", "x")
    send(t, c.CompleteVisit(good, visit()))
    projection = TrialProjection(t)

    projection.catch_up()

    assert projection.position() == projection.head()
    assert row(t, participants, good).status == "randomized"
    assert row(t, scores, good) is not None
    held = quarantined(t, "trial")
    assert list(held) == [bad] and held[bad]["event_type"] == "DataCorrected"
    assert "TypeError" in held[bad]["error"]

    repaired = send(t, c.CorrectData(bad, {"event_id": t.service.get_participant(bad)
                                           .event_id_of(visit_version),
                                           "field": "fact_es.GE1", "value": 2}),
                    reason="transcription error")
    projection.catch_up()

    assert quarantined(t, "trial") == {}
    assert row(t, participants, bad).version == repaired["version"]
    assert row(t, scores, bad).fact_ewb is not None


def test_an_event_that_cannot_be_applied_at_all_leaves_the_others_going(isolated):
    t = isolated
    bad = enrol(t)
    write_straight_into_the_store(t, bad, None, "bpi_sf.worst", 3)  # names no event
    later = enrol(t)
    projection = TrialProjection(t)

    projection.catch_up()

    assert projection.position() == projection.head()
    assert row(t, participants, later) is not None
    assert list(quarantined(t, "trial")) == [bad]
    assert row(t, participants, bad).version == 3  # as it was before the event


def test_the_deviation_monitor_sets_a_bad_participant_aside_and_flags_the_others(isolated):
    t = isolated
    bad, good = enrol(t), enrol(t)
    visit_version = send(t, c.CompleteVisit(bad, visit()))["version"]
    write_straight_into_the_store(t, bad, visit_version, "completed_on", None)
    send(t, c.RecordDose(good, {"taken_on": REGISTERED, "taken": True, "dose_mcg": 5}))
    monitor = DeviationMonitor(t)

    monitor.catch_up()

    assert monitor.position() == monitor.head()
    assert list(quarantined(t, "deviation_monitor")) == [bad]
    TrialProjection(t).catch_up()
    with t.engine.connect() as connection:
        codes = set(connection.execute(select(deviations.c.code).where(
            deviations.c.participant_id == good)).scalars())
    assert "wrong_dose" in codes


def test_projections_status_lists_every_follower_with_its_quarantine(tmp_path):
    from infrastructure.store.bootstrap import bootstrap
    from tests.conftest import settings_for

    url = f"sqlite:///{tmp_path / 'status.db'}"
    t = bootstrap(settings_for(url), migrate=True)
    try:
        bad = enrol(t)
        write_straight_into_the_store(t, bad, None, "bpi_sf.worst", 3)
        TrialProjection(t).catch_up()
    finally:
        t.close()
    status = run(["projections", "status"], tmp_path, TRIALOG_DATABASE_URL=url,
                 TRIALOG_CIPHER_KEY=TEST_KEY)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].startswith("trial ") and "quarantined 1" in lines[0]
    assert bad in lines[1] and "DataCorrected" in lines[1]
    assert any(line.startswith("deviation_monitor") and "quarantined 0" in line
               for line in lines)


def test_the_clock_scan_sets_a_bad_participant_aside_and_scans_the_others(isolated):

    from infrastructure.jobs.monitor import scan_clock

    t = isolated
    bad, good = enrol(t), enrol(t)
    write_straight_into_the_store(t, bad, None, "bpi_sf.worst", 3)  # bad can't be loaded
    TrialProjection(t).catch_up()

    counts = scan_clock(t, REGISTERED + timedelta(days=400))

    assert counts["quarantined"] == 1 and counts["missed"] >= 4  # good's four windows
    assert list(quarantined(t, "deviation_scan")) == [bad]
    assert t.service.get_participant(good).missed_visits


def test_the_monitor_lifts_a_quarantine_only_when_it_ran_the_rules_again(isolated):
    t = isolated
    bad = enrol(t)
    visit_version = send(t, c.CompleteVisit(bad, visit()))["version"]
    write_straight_into_the_store(t, bad, visit_version, "completed_on", None)
    monitor = DeviationMonitor(t)
    monitor.catch_up()
    assert list(quarantined(t, "deviation_monitor")) == [bad]

    # A reminder is an event the monitor does not evaluate: the quarantine stays.
    send(t, c.RecordReminderSent(bad, {"visit": "week6", "kind": "window_open",
                                       "recipients": ["coordinator@case.example"]}))
    monitor.catch_up()
    assert list(quarantined(t, "deviation_monitor")) == [bad]

    event_id = t.service.get_participant(bad).event_id_of(visit_version)
    send(t, c.CorrectData(bad, {"event_id": event_id, "field": "completed_on",
                                "value": REGISTERED.isoformat()}), reason="source check")
    monitor.catch_up()
    assert quarantined(t, "deviation_monitor") == {}


def test_an_event_the_monitor_does_not_evaluate_after_a_bad_one_in_its_batch_lifts_nothing(
        isolated):
    """The batch failed and is applied again event by event: the reminder after the bad
    event 'applies' (the monitor does nothing with it), and must not release the
    participant the bad event set aside."""
    t = isolated
    bad, good = enrol(t), enrol(t)
    monitor = DeviationMonitor(t)
    monitor.catch_up()
    visit_version = send(t, c.CompleteVisit(bad, visit()))["version"]
    write_straight_into_the_store(t, bad, visit_version, "completed_on", None)
    send(t, c.RecordReminderSent(bad, {"visit": "week6", "kind": "window_open",
                                       "recipients": ["coordinator@case.example"]}))
    send(t, c.RecordDose(good, {"taken_on": REGISTERED, "taken": True, "dose_mcg": 5}))

    monitor.catch_up()  # the four events in one batch

    assert monitor.position() == monitor.head()
    held = quarantined(t, "deviation_monitor")
    assert list(held) == [bad] and held[bad]["event_type"] == "DataCorrected"


def test_a_store_no_row_of_which_can_be_read_stops_the_follower_loudly(isolated_url):
    import pytest

    from infrastructure.readside.projections import UnreadableStore
    from infrastructure.store.bootstrap import bootstrap
    from tests.conftest import settings_for

    first = bootstrap(settings_for(isolated_url), migrate=True)
    try:
        enrol(first), enrol(first)
    finally:
        first.close()
    other_key = "b3RoZXIta2V5LW90aGVyLWtleS1vdGhlci1rZXktMzI="
    t = bootstrap(settings_for(isolated_url, TRIALOG_CIPHER_KEY=other_key))
    try:
        projection = TrialProjection(t)
        with pytest.raises(UnreadableStore, match="TRIALOG_CIPHER_KEY"):
            projection.catch_up()
        assert projection.position() == 0 and quarantined(t, "trial") == {}
    finally:
        t.close()


def _flip_state(t, pid: str, version: int) -> tuple[bytes, int]:
    """Damages one stored event of ``pid`` (its last byte flipped): the original state and
    the event's position."""
    from sqlalchemy import and_, update

    from domain.participant import participant_uuid
    from infrastructure.store.stored import as_bytes, events_table

    table = events_table(t.service.recorder)
    where = and_(table.c.originator_id == participant_uuid(pid),
                 table.c.originator_version == version)
    with t.engine.begin() as connection:
        state, position = connection.execute(select(table.c.state, table.c.id).where(where)).one()
        state = as_bytes(state)
        connection.execute(update(table).where(where).values(
            state=state[:-1] + bytes([state[-1] ^ 1])))
    return state, position


def _restore_state(t, pid: str, version: int, state: bytes) -> None:
    from sqlalchemy import and_, update

    from domain.participant import participant_uuid
    from infrastructure.store.stored import events_table

    table = events_table(t.service.recorder)
    with t.engine.begin() as connection:
        connection.execute(update(table).where(and_(
            table.c.originator_id == participant_uuid(pid),
            table.c.originator_version == version)).values(state=state))


def test_an_unreadable_event_is_set_aside_by_the_feed_and_given_in_its_place(isolated):
    """The feed's follower rendered the row without a body and told no one; every page
    over it then failed for every reader who could see it, webhooks included."""
    from domain.access import EVERY_SITE, Scope
    from infrastructure.audit.feed import Feed, Reader
    from infrastructure.readside.projections import FeedProjection

    t = isolated
    bad, good = enrol(t), enrol(t)
    original, position = _flip_state(t, bad, 2)
    send(t, c.CompleteVisit(good, visit()))
    follower = FeedProjection(t)

    follower.catch_up()

    assert follower.position() == follower.head()
    held = quarantined(t, "feed")
    assert list(held) == [bad] and held[bad]["position"] == position
    for reader in (Reader(EVERY_SITE), Reader(EVERY_SITE, contact=True),
                   Reader(Scope.of(["CASE"]))):
        events, resume = Feed(t).page(0, 1000, reader)
        assert resume == follower.head()
        assert [e["position"] for e in events] == list(range(1, follower.head() + 1))
        placeholder = next(e for e in events if e["position"] == position)
        assert (placeholder["type"], placeholder["subject"]) == (
            "org.trialog.EventUnreadable", bad)
        assert not {"time", "digest", "previousdigest"} & placeholder.keys()
        assert placeholder["data"]["version"] == 2
        assert sum(e["subject"] == good for e in events) == 4  # its own, all of them

    _restore_state(t, bad, 2, original)  # repaired: the next batch reads it again
    send(t, c.RecordDose(good, {"taken_on": REGISTERED, "taken": True, "dose_mcg": 1000}))
    follower.catch_up()
    assert quarantined(t, "feed") == {}
    events, _ = Feed(t).page(position - 1, 1, Reader(EVERY_SITE))
    assert events[0]["type"] == "org.trialog.ConsentRecorded"


def test_the_feed_lifts_a_quarantine_only_when_every_unreadable_event_reads_again(isolated):
    """It looked at the last event that failed: with two damaged, repairing that one
    lifted the quarantine while the other was still given as unreadable."""
    from infrastructure.readside.projections import FeedProjection

    t = isolated
    bad, good = enrol(t), enrol(t)
    send(t, c.CompleteVisit(bad, visit()))
    first, _ = _flip_state(t, bad, 2)
    last, _ = _flip_state(t, bad, 4)
    follower = FeedProjection(t, batch_size=1)
    follower.catch_up()
    assert list(quarantined(t, "feed")) == [bad]

    _restore_state(t, bad, 4, last)
    send(t, c.RecordDose(good, {"taken_on": REGISTERED, "taken": True, "dose_mcg": 1000}))
    follower.catch_up()
    assert list(quarantined(t, "feed")) == [bad]  # version 2 still can't be read

    _restore_state(t, bad, 2, first)
    send(t, c.RecordDose(good, {"taken_on": REGISTERED + timedelta(days=1), "taken": True,
                                "dose_mcg": 1000}))
    follower.catch_up()
    assert quarantined(t, "feed") == {}


def test_the_feeds_checkpoint_over_an_unreadable_newest_event_has_no_digest(isolated):
    """It answered 500: the digest of the newest event was read with no guard."""
    from sqlalchemy import func, update

    from domain.access import EVERY_SITE
    from infrastructure.audit.feed import Feed, Reader
    from infrastructure.store.stored import as_bytes, events_table

    t = isolated
    enrol(t)
    table = events_table(t.service.recorder)
    with t.engine.begin() as connection:
        newest = connection.execute(select(func.max(table.c.id))).scalar()
        state = as_bytes(connection.execute(select(table.c.state).where(
            table.c.id == newest)).scalar())
        connection.execute(update(table).where(table.c.id == newest).values(
            state=state[:-1] + bytes([state[-1] ^ 1])))
    checkpoint = Feed(t).checkpoint(Reader(EVERY_SITE))
    assert checkpoint["position"] == newest and checkpoint["digest"] is None
    assert checkpoint["events"] == newest  # the unreadable one is given in its place too
    with t.engine.begin() as connection:  # repaired
        connection.execute(update(table).where(table.c.id == newest).values(state=state))
    assert Feed(t).checkpoint(Reader(EVERY_SITE))["digest"] is not None


def test_a_history_the_store_cant_give_says_so_and_a_scoped_caller_finds_no_one(isolated):
    """Both were a 500 that said only that the server failed: the history, and any route
    about a participant whose first event (its site) can't be read, for a site-scoped
    caller."""
    from domain.access import Scope
    from infrastructure.api import create_app
    from infrastructure.store.tokens import create_token

    t = isolated
    damaged, lost = enrol(t), enrol(t)
    _flip_state(t, damaged, 2)
    _flip_state(t, lost, 1)
    client = create_app(t, follow=False).test_client()
    every = {"Authorization": f"Bearer {create_token(t.engine, 'adm-unread', 'admin')}"}
    scoped = {"Authorization": "Bearer " + create_token(
        t.engine, "cra-unread", "monitor", Scope.of(["CASE"]))}

    answer = client.get(f"/v1/participants/{damaged}/history", headers=every)
    assert (answer.status_code, answer.json["error"]) == (500, "record_unreadable")
    assert answer.json["message"].startswith(f"event 2 of {damaged}'s record can't be read")
    answer = client.get(f"/v1/participants/{lost}/history", headers=scoped)
    assert (answer.status_code, answer.json["error"]) == (404, "not_found")


def signed_into_the_console(t, client, login: str) -> None:
    """``client`` signed into the console as a new data manager of every site."""
    import re

    from domain.access import EVERY_SITE
    from infrastructure.store.people import create_user

    create_user(t.engine, login, "Dee Em", "data_manager", EVERY_SITE, "a long password 123!")
    sign_in = client.get("/console/sign-in").get_data(as_text=True)
    assert client.post("/console/sign-in", data={
        "csrf_token": re.search(r'name="csrf_token" value="([^"]+)"', sign_in).group(1),
        "login": login, "password": "a long password 123!"}).status_code == 303


def test_a_state_the_store_cant_replay_says_so_and_one_that_cant_be_applied_shows_its_contact(
        isolated):
    """The current state and a state by version of a participant with an event the store
    can't give were a 500 that said only that the server failed (a role without contact
    rights got the read models' older state as the current one), in the API and the
    console; a participant whose newest event can't be applied is answered from its read
    models, and a role with contact rights got a 500 there too."""
    from domain.access import Scope
    from infrastructure.api import create_app
    from infrastructure.store.tokens import create_token

    t = isolated
    damaged, unapplied = enrol(t), enrol(t)
    send(t, c.CompleteVisit(damaged, visit()))
    _flip_state(t, damaged, 3)
    write_straight_into_the_store(t, unapplied, None, "bpi_sf.worst", 3)  # names no event
    TrialProjection(t).catch_up()  # both set aside, their rows as before the bad event
    client = create_app(t, follow=False).test_client()
    admin = {"Authorization": f"Bearer {create_token(t.engine, 'adm-state', 'admin')}"}
    monitor = {"Authorization": "Bearer " + create_token(
        t.engine, "cra-state", "monitor", Scope.of(["CASE"]))}

    for headers in (admin, monitor):
        for query in ("", "?version=4"):
            answer = client.get(f"/v1/participants/{damaged}{query}", headers=headers)
            assert (answer.status_code, answer.json["error"]) == (500, "record_unreadable")
            assert answer.json["message"].startswith(
                f"event 3 of {damaged}'s record can't be read")
    assert client.get(f"/v1/participants/{damaged}?version=2", headers=admin).json[
        "version"] == 2
    state = client.get(f"/v1/participants/{unapplied}", headers=admin)
    assert state.status_code == 200 and state.json["version"] == 3
    assert state.json["contact"]["email"] == "participant@example.org"

    signed_into_the_console(t, client, "dm-state")
    page = client.get(f"/console/participants/{damaged}?version=4")
    assert page.status_code == 500 and page.mimetype == "text/html"
    assert f"Event 3 of {damaged}&#39;s record can&#39;t be read" in page.get_data(as_text=True)


def test_the_consort_flow_counts_a_record_it_cant_read_apart_and_everyone_else(isolated):
    """One damaged row, or one correction the rules can't apply, made the CONSORT report
    (and the console's overview) a 500 for every caller: the flow is read from every
    participant's events."""
    import re

    from domain.access import Scope
    from infrastructure.api import create_app
    from infrastructure.store.tokens import create_token
    from tests.integration.helpers import dose

    t = isolated
    enrol(t)  # counted as ever: the one randomized
    randomization, lost, corrected, unapplied = enrol(t), enrol(t), enrol(t), enrol(t)
    write_straight_into_the_store(t, unapplied, None, "bpi_sf.worst", 3)  # names no event
    visit_version = send(t, c.CompleteVisit(corrected, visit()))["version"]
    send(t, c.CorrectData(corrected, {
        "event_id": t.service.get_participant(corrected).event_id_of(visit_version),
        "field": "fact_es.GE1", "value": 2}), reason="transcription error")
    dose_version = send(t, c.RecordDose(corrected, dose(1)))["version"]
    _flip_state(t, randomization, 3)
    _flip_state(t, lost, 1)  # its id and site with it
    _flip_state(t, corrected, dose_version)  # not read by the flow, but by the replay
    client = create_app(t, follow=False).test_client()
    admin = {"Authorization": f"Bearer {create_token(t.engine, 'adm-consort', 'admin')}"}
    monitor = {"Authorization": "Bearer " + create_token(
        t.engine, "cra-consort", "monitor", Scope.of(["CASE"]))}

    flow = client.get("/v1/reports/consort", headers=admin)
    assert flow.status_code == 200, flow.json
    assert (flow.json["assessed"], flow.json["randomized"]) == (5, 1)
    assert flow.json["unreadable"] == {
        "total": 4, "participants": sorted([randomization, corrected, unapplied])}
    scoped = client.get("/v1/reports/consort", headers=monitor).json
    assert (scoped["assessed"], scoped["unreadable"]["total"]) == (4, 3)
    assert sum(arm["allocated"] for arm in scoped["arms"].values()) == 1
    signed_into_the_console(t, client, "dm-consort")
    overview = client.get("/console/")
    assert overview.status_code == 200
    page = overview.get_data(as_text=True)
    assert '<td data-key="unreadable.total">4</td>' in page  # the table, and the diagram:
    assert re.search(r'<text[^>]*data-key="unreadable.total"[^>]*>Record can&#39;t be read '
                     r'\(n=4\)</text>', page)


def test_a_participant_the_store_cant_give_fails_its_own_commands_in_a_batch_and_an_import(
        isolated, tmp_path):
    """Read together with the others, it made the whole batch a 500 and stopped the import
    (and every run of it again), with nothing written for anyone."""
    import json

    from domain.access import Scope
    from infrastructure.api import create_app
    from infrastructure.store.tokens import create_token
    from tests.conftest import TEST_SECRETS
    from tests.factories import consent, new_participant_id, screening
    from tests.integration.helpers import dose

    t = isolated
    damaged = enrol(t)
    _flip_state(t, damaged, 2)
    TrialProjection(t).catch_up()  # its site known to the read models: the caller's
    waiting = [new_participant_id(), new_participant_id()]
    for pid in waiting:
        send(t, c.ScreenParticipant(pid, screening()))

    def commands(pid: str) -> list[dict]:
        return [{"command_id": str(uuid.uuid4()), "type": type_, "participant_id": who,
                 "data": data} for type_, who, data in (
                    ("RecordConsent", pid, consent()), ("RecordDose", damaged, dose(1)),
                    ("ScreenParticipant", new_participant_id(), screening()))]

    client = create_app(t, follow=False).test_client()
    token = create_token(t.engine, "crc-unread", "coordinator", Scope.of(["CASE"]))
    results = client.post("/v1/commands/batch", json={"commands": commands(waiting[0])},
                          headers={"Authorization": f"Bearer {token}"}).json["results"]
    assert [r["status"] for r in results] == [201, 500, 201]
    assert results[1]["body"] == {"error": "record_unreadable", "message": (
        f"event 2 of {damaged}'s record can't be read from the store (a damaged or altered "
        "row: trialog audit verify names it)")}

    path = tmp_path / "commands.ndjson"
    path.write_text("".join(json.dumps(line, default=str) + "\n"
                            for line in commands(waiting[1])))
    imported = run(["import", str(path)], tmp_path,
                   TRIALOG_DATABASE_URL=t.settings.database_url, **TEST_SECRETS)
    assert imported.stdout == "2 accepted, 0 repeated, 1 refused\n", imported.stderr
    assert imported.stderr == (f"line 2: record_unreadable: event 2 of {damaged}'s record "
                               "can't be read from the store (a damaged or altered row: "
                               "trialog audit verify names it)\n")
    assert all(t.service.get_participant(pid).status == "consented" for pid in waiting)


def test_a_record_the_store_cant_give_outside_the_callers_sites_is_not_found(isolated):
    """A command about it answered record_unreadable, naming it (or, alone, 500 for a
    record the rules can't replay), where an unknown id and every read answer 404: it told
    a caller of other sites that the participant exists. A caller of its own site is told
    why, though the read models hold no row of it."""
    from domain.access import Scope
    from infrastructure.api import create_app
    from infrastructure.store.tokens import create_token
    from tests.factories import consent

    t = isolated
    damaged, unapplied = enrol(t, "METRO"), enrol(t, "METRO")
    _flip_state(t, damaged, 2)
    write_straight_into_the_store(t, unapplied, None, "bpi_sf.worst", 3)  # names no event
    client = create_app(t, follow=False).test_client()

    def headers(site: str) -> dict:
        return {"Authorization": "Bearer " + create_token(
            t.engine, f"crc-{site}-{uuid.uuid4().hex[:6]}", "coordinator", Scope.of([site]))}

    def command(pid: str) -> dict:
        return {"command_id": str(uuid.uuid4()), "type": "RecordConsent",
                "participant_id": pid, "data": json_ready(consent())}

    elsewhere = headers("CASE")
    for pid in (damaged, unapplied):
        alone = client.post("/v1/commands", json=command(pid), headers=elsewhere)
        batch = client.post("/v1/commands/batch", json={"commands": [command(pid)]},
                            headers=elsewhere).json["results"]
        assert (alone.status_code, alone.json["error"]) == (404, "not_found")
        assert (batch[0]["status"], batch[0]["body"]) == (404, alone.json)
    own = client.post("/v1/commands", json=command(damaged), headers=headers("METRO"))
    assert (own.status_code, own.json["error"]) == (500, "record_unreadable")


def json_ready(data: dict) -> dict:
    return {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in data.items()}


def test_a_repaired_first_event_shows_its_participant_to_its_sites_readers_again(isolated):
    """A stream whose first event could not be read was remembered as of no site for as
    long as the process lived: once the row was repaired, its new events still went to
    the feed under no participant and no site until the server restarted. (Its events
    rendered before the repair are rendered again by `trialog projections rebuild`.)"""
    from domain.access import Scope
    from infrastructure.audit.feed import Reader
    from infrastructure.readside.projections import FeedProjection

    t = isolated
    pid = enrol(t)
    original, _ = _flip_state(t, pid, 1)
    follower = FeedProjection(t)  # one process's, as a server's follower is
    follower.catch_up()
    site_reader = Reader(Scope.of(["CASE"]))

    def subjects() -> list[str]:
        return [e["subject"] for e in follower.feed.page(0, 1000, site_reader)[0]]

    assert pid not in subjects()
    _restore_state(t, pid, 1, original)
    send(t, c.RecordDose(pid, {"taken_on": REGISTERED, "taken": True, "dose_mcg": 1000}))
    follower.catch_up()
    assert subjects().count(pid) == 1  # the dose recorded since the repair
    FeedProjection(t).rebuild()  # as `trialog projections rebuild` does
    assert subjects().count(pid) == 4


def test_the_consort_flow_fails_when_the_database_does_not_hide_it(isolated, monkeypatch):
    """A database error while a corrected record was replayed was counted as a record that
    can't be read, in a report for the regulator: it fails the report, as any database
    error does."""
    import pytest
    import sqlalchemy

    from domain.access import EVERY_SITE
    from infrastructure.readside import consort

    t = isolated
    pid = enrol(t)
    visit_version = send(t, c.CompleteVisit(pid, visit()))["version"]
    send(t, c.CorrectData(pid, {
        "event_id": t.service.get_participant(pid).event_id_of(visit_version),
        "field": "fact_es.GE1", "value": 2}), reason="transcription error")

    def disk_fails(*args, **kwargs):
        raise sqlalchemy.exc.OperationalError("SELECT", {}, OSError("disk I/O error"))

    monkeypatch.setattr(consort, "replayed", disk_fails)
    with pytest.raises(sqlalchemy.exc.OperationalError):
        consort.consort(t, EVERY_SITE)


def test_an_export_of_the_read_models_over_http_says_how_many_of_the_callers_are_set_aside(
        isolated, monkeypatch):
    """The CSV and FHIR exports read the read models, which give a participant set aside as
    it stood before the event that can't be applied (or leave it out): over HTTP they gave
    that as the record with nothing said (the command line warns on standard error)."""
    from domain.access import Scope
    from infrastructure.api import create_app
    from infrastructure.store.tokens import create_token

    t = isolated
    on_time, behind = enrol(t, "CASE"), enrol(t, "METRO")
    client = create_app(t, follow=False).test_client()

    def monitor(sites: list[str] | None) -> dict[str, str]:
        token = create_token(t.engine, f"cra-{uuid.uuid4().hex[:8]}", "monitor",
                             Scope.of(sites))
        return {"Authorization": f"Bearer {token}"}

    every, case, metro = monitor(None), monitor(["CASE"]), monitor(["METRO"])
    TrialProjection(t).catch_up()
    assert client.get("/v1/exports/csv", headers=every).headers["Trialog-Set-Aside"] == "0"

    send(t, c.RecordDose(behind, dose(1)))
    _flip_state(t, behind, 4)  # its row stays as it stood at version 3
    unknown = enrol(t, "METRO")
    _flip_state(t, unknown, 1)  # never applied: the read models don't know its site
    TrialProjection(t).catch_up()
    for headers, held in ((every, 2), (metro, 2), (case, 1)):
        for kind in ("csv", "fhir"):
            answer = client.get(f"/v1/exports/{kind}", headers=headers)
            assert answer.status_code == 200, answer.text
            assert answer.headers["Trialog-Set-Aside"] == str(held), (kind, headers)
    fhir = client.get("/v1/exports/fhir", headers=metro).get_data(as_text=True)
    assert behind in fhir and unknown not in fhir and on_time not in fhir
    odm = client.get("/v1/exports/odm", headers=every)  # it reads the store and says so
    assert odm.status_code == 200 and "Trialog-Set-Aside" not in odm.headers

    # One let go while the export is made (its row brought up to date meanwhile, or not)
    # is counted, as one set aside meanwhile would be.
    from domain.participant import participant_uuid
    from infrastructure.audit import exports
    from infrastructure.readside.quarantine import release

    made = exports.document

    def letting_go(*args, **kwargs):
        with t.engine.begin() as connection:
            release(connection, TrialProjection.name, {participant_uuid(behind)})
        yield from made(*args, **kwargs)

    monkeypatch.setattr(exports, "document", letting_go)
    assert client.get("/v1/exports/csv", headers=metro).headers["Trialog-Set-Aside"] == "2"
    monkeypatch.setattr(exports, "document", made)
    assert client.get("/v1/exports/csv", headers=metro).headers["Trialog-Set-Aside"] == "1"
    document = client.get("/openapi.json").json
    for kind in ("csv", "fhir"):
        header = document["paths"][f"/v1/exports/{kind}"]["get"]["responses"]["200"][
            "headers"]["Trialog-Set-Aside"]
        assert header["required"] and header["schema"]["type"] == "integer"
