"""The lists read in pages: each page is the slice of the whole list in its own order."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import insert

from domain import commands as c
from domain.access import EVERY_SITE
from infrastructure.readside.projections import TrialProjection
from infrastructure.readside.queries import list_deviations, visits_due
from infrastructure.store.tables import deviations
from tests.factories import consent, new_participant_id, screening
from tests.integration.helpers import send


def test_deviations_are_read_in_pages_in_the_order_they_were_detected(trialog):
    pid = new_participant_id()
    at = datetime(2026, 3, 10, 9, 0, tzinfo=UTC)
    # Two detected at the same instant: their ids order them.
    moments = (at, at + timedelta(hours=1), at + timedelta(hours=1), at + timedelta(hours=2))
    with trialog.engine.begin() as connection:
        for moment in moments:
            connection.execute(insert(deviations).values(
                deviation_id=str(uuid.uuid4()), participant_id=pid, code="dose_missed",
                severity="minor", status="open", detail="", evidence={},
                detected_at=moment))

    whole = list_deviations(trialog, scope=EVERY_SITE, participant_id=pid)
    assert len(whole) == 4
    assert [d["detected_at"] for d in whole] == sorted(d["detected_at"] for d in whole)
    pages = [list_deviations(trialog, scope=EVERY_SITE, participant_id=pid, limit=3,
                             offset=offset) for offset in (0, 3)]
    assert pages == [whole[:3], whole[3:]]
    assert list_deviations(trialog, scope=EVERY_SITE, participant_id=pid, offset=4) == []


def test_visits_due_are_read_in_pages_that_neither_repeat_nor_skip_a_visit(trialog):
    today = datetime.now(UTC).date()
    for _ in range(2):  # registered a week ago: their visits are all still ahead
        pid = new_participant_id()
        send(trialog, c.ScreenParticipant(pid, screening("CASE")))
        send(trialog, c.RecordConsent(pid, consent(today - timedelta(days=7))))
        send(trialog, c.RandomizeParticipant(pid, {"registered_on": today - timedelta(days=7)}))
    TrialProjection(trialog).catch_up()
    whole = visits_due(trialog, 3660, scope=EVERY_SITE)
    assert sum(v["participant_id"] == pid for v in whole) >= 3  # the last one's, at least
    pages = [visits_due(trialog, 3660, scope=EVERY_SITE, limit=3, offset=offset)
             for offset in range(0, len(whole), 3)]
    assert [visit for page in pages for visit in page] == whole
    assert all(len(page) == 3 for page in pages[:-1])


def test_deviations_and_visits_due_are_whole_unless_a_page_is_asked_for(trialog):
    """They answered every row before they took pages: a default page of 1,000 cut a
    longer list silently. The API's arguments ask for no page unless given one."""
    from infrastructure.api.reads import DeviationArgs, DueArgs

    assert DeviationArgs().load({})["limit"] is None
    assert DueArgs().load({})["limit"] is None
    pid = new_participant_id()
    at = datetime(2026, 3, 10, 9, 0, tzinfo=UTC)
    with trialog.engine.begin() as connection:
        connection.execute(insert(deviations), [
            {"deviation_id": str(uuid.uuid4()), "participant_id": pid, "code": "dose_missed",
             "severity": "minor", "status": "open", "detail": "", "evidence": [],
             "detected_at": at + timedelta(seconds=n)} for n in range(1005)])
    listed = list_deviations(trialog, scope=EVERY_SITE, participant_id=pid,
                             limit=DeviationArgs().load({})["limit"])
    assert len(listed) == 1005


def test_a_visits_status_and_the_due_list_follow_its_sites_day(isolated):
    """The default protocol's sites keep New York's days. In the first hours of a UTC day
    it is still the day before there: a week-6 window opening on that (UTC) day showed
    `open` and was listed due, while its reminders (by the site's day) were not due yet.
    And once its last day had ended in New York, it showed `open` until that day had ended
    everywhere (UTC-12). Now the current state, a state replayed or as of a moment, and the
    due list judge it by the site's day, as the reminders do; the clock scan still marks
    it missed only once its last day has ended everywhere, so it is `overdue` till then."""
    from datetime import date
    from datetime import time as midnight

    from infrastructure.readside.queries import participant_state, shown_state

    pid = new_participant_id()
    registered = date(2026, 3, 4)
    send(isolated, c.ScreenParticipant(pid, screening("CASE")))
    send(isolated, c.RecordConsent(pid, consent()))
    send(isolated, c.RandomizeParticipant(pid, {"registered_on": registered}))
    send(isolated, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": registered}))
    TrialProjection(isolated).catch_up()
    participant = isolated.service.get_participant(pid)
    first_day, last_day = registered + timedelta(days=35), registered + timedelta(days=49)

    def week6_at(day: date, hours: float) -> tuple[str, str, str | None]:
        moment = datetime.combine(day, midnight(), UTC) + timedelta(hours=hours)
        isolated.bus.clock = lambda: moment
        due = {v["code"]: v["status"] for v in visits_due(isolated, 0, scope=EVERY_SITE)
               if v["participant_id"] == pid}

        def week6(state):
            return {v["code"]: v["status"] for v in state["visits"]}["week6"]

        return (week6(participant_state(isolated, pid)),
                week6(shown_state(participant, isolated.protocol, moment)), due.get("week6"))

    assert week6_at(first_day, 2) == ("upcoming", "upcoming", None)  # 22:00 the day before
    assert week6_at(first_day, 5) == ("open", "open", "open")  # 01:00 on its first day
    assert week6_at(last_day + timedelta(days=1), 1.5) == ("open", "open", "open")  # 21:30
    # 01:00 the next day in New York: past the window there, not yet everywhere.
    assert week6_at(last_day + timedelta(days=1), 5) == ("overdue", "overdue", None)
    assert visits_due(isolated, 1, scope=EVERY_SITE) == []  # nothing else is due for it
    assert isolated.ended_everywhere() == last_day  # (the scan doesn't mark it missed yet)


def test_a_site_taken_out_of_the_protocol_still_filters_its_participants(isolated):
    """A site the protocol no longer lists may still hold participants: a filter on it
    answers them, where a site no participant is at is a 422."""
    from datetime import date

    from domain.access import Scope
    from infrastructure.api import create_app
    from infrastructure.store.tables import participants
    from infrastructure.store.tokens import create_token

    pid = f"GONE-{uuid.uuid4().hex[:8]}"
    with isolated.engine.begin() as connection:  # as the read models keep it
        connection.execute(insert(participants).values(
            participant_id=pid, site_id="GONE", status="screen_failed", arm=None, version=1,
            language="en", eligible=False, failed_criteria=["zubrod"],
            screened_on=date(2026, 3, 1), scores={}, position=1))
    token = create_token(isolated.engine, f"admin-{uuid.uuid4().hex[:6]}", "admin")
    client = create_app(isolated, follow=False).test_client()
    headers = {"Authorization": f"Bearer {token}"}

    answer = client.get("/v1/participants?site_id=GONE", headers=headers)
    assert answer.status_code == 200, answer.text
    assert [row["participant_id"] for row in answer.json["participants"]] == [pid]
    assert client.get("/v1/queries?site_id=GONE", headers=headers).json == {"queries": []}
    answer = client.get("/v1/participants?site_id=NOPE", headers=headers)
    assert (answer.status_code, answer.json["fields"]) == (
        422, {"site_id": ["must be one of: CASE, METRO"]})
    scoped = create_token(isolated.engine, f"case-{uuid.uuid4().hex[:6]}", "monitor",
                          Scope.of(["CASE"]))  # GONE's participants are not its to know of
    answer = client.get("/v1/participants?site_id=GONE",
                        headers={"Authorization": f"Bearer {scoped}"})
    assert (answer.status_code, list(answer.json["fields"])) == (422, ["site_id"])


def test_a_resolution_quoting_an_address_is_listed_masked(isolated):
    """/v1/deviations gave it whole to every role (the read models keep it in plain)."""
    from infrastructure.readside.queries import list_deviations
    from tests.integration.helpers import enrol

    pid = enrol(isolated)
    deviation = str(uuid.uuid4())
    send(isolated, c.FlagDeviation(pid, {"deviation_id": deviation, "code": "wrong_dose",
                                         "severity": "minor", "evidence": [],
                                         "detail": "2000 mcg"}), actor="deviation-monitor")
    send(isolated, c.ResolveDeviation(pid, {"deviation_id": deviation,
                                            "resolution": "per jane.doe@example.org"}))
    TrialProjection(isolated).catch_up()
    (listed,) = list_deviations(isolated, scope=EVERY_SITE, participant_id=pid)
    assert listed["resolution"] == "per j***@example.org"


def test_the_due_list_takes_each_sites_own_day(isolated):
    """Three sites a day apart at one moment: CASE moved to UTC+14, METRO in New York, and
    a site the protocol no longer lists (UTC). The list is what each visit's status at its
    own site's day gives, at every hour of two days, and its pages add up to it."""
    import dataclasses
    from datetime import date

    from sqlalchemy import select

    from domain.schedule import ScheduledVisit, visit_status
    from infrastructure.store.tables import participants, visits

    registered = date(2026, 3, 4)
    pids = []
    for site in ("CASE", "METRO"):
        pid = new_participant_id(site)
        send(isolated, c.ScreenParticipant(pid, screening(site)))
        send(isolated, c.RecordConsent(pid, consent()))
        send(isolated, c.RandomizeParticipant(pid, {"registered_on": registered}))
        pids.append(pid)
    TrialProjection(isolated).catch_up()
    gone = f"GONE-{uuid.uuid4().hex[:6]}"
    with isolated.engine.begin() as connection:  # as if its site had left the protocol
        row = connection.execute(select(participants).where(
            participants.c.participant_id == pids[0])).mappings().one()
        connection.execute(insert(participants).values(
            {**row, "participant_id": gone, "site_id": "GONE"}))
        for visit in connection.execute(select(visits).where(
                visits.c.participant_id == pids[0])).mappings().all():
            connection.execute(insert(visits).values({**visit, "participant_id": gone}))
    sites = {s.id: s for s in isolated.protocol.sites}
    sites["CASE"] = dataclasses.replace(sites["CASE"], time_zone="Pacific/Kiritimati")
    isolated.protocol = dataclasses.replace(isolated.protocol, sites=tuple(sites.values()))
    with isolated.engine.connect() as connection:
        rows = connection.execute(select(visits, participants.c.site_id).join(
            participants, participants.c.participant_id == visits.c.participant_id)).all()
    week6_opens = datetime(2026, 4, 8, tzinfo=UTC)
    for hours in range(-16, 32, 2):
        now = week6_opens + timedelta(hours=hours)
        isolated.bus.clock = lambda now=now: now
        for within in (0, 1):
            expected = []
            for r in rows:
                day = isolated.protocol.day_at(r.site_id, now)
                scheduled = ScheduledVisit(r.code, r.target, r.window_start, r.window_end)
                status = visit_status(scheduled, r.completed_on, r.missed, day)
                if (status == "open" or status == "upcoming"
                        and r.window_start <= day + timedelta(days=within)):
                    expected.append((r.window_start.isoformat(), r.participant_id, r.code,
                                     status))
            due = visits_due(isolated, within, scope=EVERY_SITE)
            assert [(v["window"]["start"], v["participant_id"], v["code"], v["status"])
                    for v in due] == sorted(expected), (now, within)
            pages = [visits_due(isolated, within, scope=EVERY_SITE, limit=2, offset=offset)
                     for offset in range(0, len(due) + 2, 2)]
            assert [visit for page in pages for visit in page] == due
    # The three sites disagreed at some hours: the week-6 visit due at one, not another.
    isolated.bus.clock = lambda: week6_opens - timedelta(hours=2)  # +14: the 8th; NY: the 7th
    assert {v["participant_id"] for v in visits_due(isolated, 0, scope=EVERY_SITE)
            if v["code"] == "week6"} == {pids[0]}
