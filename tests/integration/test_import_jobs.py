"""`trialog import --jobs N`: the file shared by site between processes, with the outcome
of applying it in one process."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace

import orjson
import pytest

from infrastructure.cli.imports import jobs_refusal, router
from infrastructure.store.bootstrap import bootstrap, load_protocol
from tests.conftest import TEST_SECRETS, settings_for
from tests.databases import PG_SERVER, fresh_postgres_database
from tests.e2e import payloads as p
from tests.integration.test_cli import run

SITES = ("CASE", "METRO")


def _line(type_: str, participant_id: str, data: dict, command_id: str | None = None) -> str:
    return json.dumps({"command_id": command_id or str(uuid.uuid4()), "type": type_,
                       "participant_id": participant_id, "data": data})


def _file(tmp_path, participants: int, doses: int = 0) -> tuple[str, list[str]]:
    """Each participant screened, consented and randomized (then given ``doses``), the
    sites' lines interleaved; among them lines each process must refuse as one process
    would."""
    ids = [p.participant_id(SITES[i % 2]) for i in range(participants)]
    early = p.participant_id("METRO")
    lines = [_line("RecordConsent", early, p.CONSENT)]  # before its screening: not found
    for pid in ids:
        lines.append(_line("ScreenParticipant", pid, p.screening(pid.split("-")[0])))
    lines += ["{not json", _line("RecordConsent", "NOSITE-1", p.CONSENT), "[1, 2]"]
    for pid in ids:
        lines.append(_line("RecordConsent", pid, p.CONSENT))
    lines.append(_line("ScreenParticipant", early, p.screening("METRO")))
    for pid in reversed(ids):  # the sites' sequences are drawn in this order
        lines.append(_line("RandomizeParticipant", pid, p.RANDOMIZE))
    lines.append(_line("RandomizeParticipant", p.participant_id("CASE"), p.RANDOMIZE))
    lines += [_line("RecordDose", pid, p.dose(day)) for day in range(doses) for pid in ids]
    path = tmp_path / "commands.ndjson"
    path.write_text("\n".join(lines) + "\n")
    return str(path), [*ids, early]


def _records(url: str, ids: list[str]) -> dict[str, tuple]:
    trialog = bootstrap(settings_for(url))
    try:
        found = {}
        for pid in ids:
            participant = trialog.service.get_participant(pid)
            found[pid] = (participant.version, participant.status, participant.arm)
        return found
    finally:
        trialog.close()


def test_jobs_apply_the_file_as_one_process_does(tmp_path):
    """Two processes on PostgreSQL write what one writes: the same answers, the same
    refusals by line, and every participant's events in the same order, down to the arm
    each site's allocation sequence gave (drawn in the file's order within a site).
    Each process has more than one transaction's lines (500)."""
    path, ids = _file(tmp_path, 200, doses=2)
    alone = f"sqlite:///{tmp_path / 'alone.db'}"
    one = run(["import", path], tmp_path, TRIALOG_DATABASE_URL=alone, **TEST_SECRETS)
    with fresh_postgres_database("trialog_jobs") as name:
        url = f"{PG_SERVER}/{name}"
        bootstrap(settings_for(url), migrate=True).close()
        two = run(["import", path, "--jobs", "2"], tmp_path, TRIALOG_DATABASE_URL=url,
                  **TEST_SECRETS)
        assert two.returncode == 1, two.stderr  # 1: some lines were refused
        assert two.stdout == one.stdout == "1001 accepted, 0 repeated, 5 refused\n"
        assert two.stderr == one.stderr
        refused = [line.split(":")[0] for line in two.stderr.splitlines()]
        assert refused == ["line 1", "line 202", "line 203", "line 204", "line 606"]
        assert _records(url, ids) == _records(alone, ids)
        randomized = _records(url, ids[:-1])  # all but the one screened late
        assert {status for _, status, _ in randomized.values()} == {"randomized"}
        assert {arm for _, _, arm in randomized.values()} == {"b12", "control"}
        again = run(["import", path, "--jobs", "2"], tmp_path, TRIALOG_DATABASE_URL=url,
                    **TEST_SECRETS)
        # Line 1's participant exists now (screened further down the first time).
        assert again.stdout == "1 accepted, 1001 repeated, 4 refused\n"


def _screen(site: str, command_id: str | None = None) -> str:
    return _line("ScreenParticipant", p.participant_id(site), p.screening(site), command_id)


def test_a_command_id_on_two_sites_lines_is_its_first_line_s_whichever_process_is_first(
        tmp_path):
    """A command id on a CASE line and later METRO lines: the METRO lines are refused, as
    one process refuses them, although their process reaches them first (the CASE
    process has a thousand lines to write before). The same line again is repeated, not
    refused; the id in capitals is the same id; a later line refused for its own fields
    keeps its own refusal."""
    first, second, third = (str(uuid.uuid4()) for _ in range(3))
    lines = [_screen("CASE") for _ in range(1000)]
    lines += [_screen("CASE", first), _screen("METRO", first),  # lines 1001 and 1002
              _screen("METRO", second), _screen("METRO") + " ",
              _line("ScreenParticipant", p.participant_id("CASE"),  # line 1005
                    p.screening("CASE", language="xx"), second),
              _screen("CASE", third)]  # line 1006
    lines.append(lines[1000])  # line 1007: line 1001 again
    lines += [_screen("METRO") for _ in range(5)]
    lines += [_screen("METRO", third.upper())]  # line 1013
    lines += [_screen("METRO") for _ in range(500)]  # METRO's first chunk fills here
    path = tmp_path / "reused.ndjson"
    path.write_text("\n".join(lines) + "\n")
    alone = f"sqlite:///{tmp_path / 'alone.db'}"
    one = run(["import", str(path)], tmp_path, TRIALOG_DATABASE_URL=alone, **TEST_SECRETS)
    refused = [line.split(":")[0] for line in one.stderr.splitlines()]
    assert refused == ["line 1002", "line 1005", "line 1013"], one.stderr
    assert f"line 1002: idempotency_key_reused: command_id {first} was already used " \
           "for another command" in one.stderr
    assert one.stdout == "1509 accepted, 1 repeated, 3 refused\n"
    with fresh_postgres_database("trialog_jobs") as name:
        url = f"{PG_SERVER}/{name}"
        bootstrap(settings_for(url), migrate=True).close()
        two = run(["import", str(path), "--jobs", "2"], tmp_path, TRIALOG_DATABASE_URL=url,
                  **TEST_SECRETS)
        assert (two.stdout, two.stderr) == (one.stdout, one.stderr)
        again = run(["import", str(path), "--jobs", "2"], tmp_path,
                    TRIALOG_DATABASE_URL=url, **TEST_SECRETS)
        assert (again.stdout, again.stderr) == ("0 accepted, 1510 repeated, 3 refused\n",
                                                one.stderr)


def test_each_site_goes_to_one_process_and_the_rest_by_participant_id():
    protocol = load_protocol(settings_for("sqlite:///x.db").protocol_path)
    route = router(protocol, 2)

    def part(line: bytes) -> int:
        return route(line)[0]

    by_site = {site: {part(orjson.dumps({"participant_id": p.participant_id(site)}))
                      for _ in range(20)} for site in SITES}
    assert by_site == {"CASE": {0}, "METRO": {1}}
    assert {part(b"{not json"), part(b"[1]"), part(b'{"participant_id": 7}')} == {0}
    others = {part(orjson.dumps({"participant_id": f"X-{i}"})) for i in range(40)}
    assert others == {0, 1}
    alone = router(protocol, 1)
    assert {alone(orjson.dumps({"participant_id": p.participant_id(site)}))[0]
            for site in SITES} == {0}


@pytest.mark.parametrize("url, jobs, refusal", [
    ("postgresql+psycopg://h/db", 0, "--jobs: must be at least 1"),
    ("postgresql+psycopg://h/db", 1, None),
    ("postgresql+psycopg://h/db", 2, None),
    ("postgresql+psycopg://h/db", 3,
     "--jobs: at most 2, one process a site (the protocol has 2 sites)"),
    ("sqlite:///x.db", 2, "--jobs: SQLite takes one writer at a time; use --jobs 1"),
])
def test_jobs_are_refused_where_they_cannot_work(url, jobs, refusal):
    settings = settings_for(url)
    assert jobs_refusal(settings, load_protocol(settings.protocol_path), jobs) == refusal


def test_jobs_need_sites_known_from_participant_ids():
    settings = settings_for("postgresql+psycopg://h/db")
    protocol = load_protocol(settings.protocol_path)
    unprefixed = replace(protocol, sites=tuple(replace(s, participant_prefix="")
                                               for s in protocol.sites))
    assert jobs_refusal(settings, unprefixed, 1) is None
    assert jobs_refusal(settings, unprefixed, 2).startswith(
        "--jobs: the protocol's sites have no participant_prefix")


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_database_that_fails_stops_the_import_saying_why(tmp_path, jobs):
    path, _ = _file(tmp_path, 2)
    name = f"no_such_database_{uuid.uuid4().hex[:8]}"
    failed = run(["import", path, "--jobs", jobs], tmp_path,
                 TRIALOG_DATABASE_URL=f"{PG_SERVER}/{name}", **TEST_SECRETS)
    assert failed.returncode != 0
    assert failed.stdout == ""
    assert failed.stderr.startswith("trialog: the database failed (OperationalError: ")
    assert f'database "{name}" does not exist' in failed.stderr  # the driver's reason
    assert "run the import again" in failed.stderr
    assert len(failed.stderr.splitlines()) == 1


def test_a_line_that_fails_by_a_fault_is_reported_alone_and_the_rest_written(
        isolated, monkeypatch):
    """A command that fails otherwise than by a rule (a fault of the program) is reported
    on its line by its kind and where it happened (its text may quote contact details),
    nothing of it written; the lines around it in the same transaction are written."""
    from domain import commands as c
    from infrastructure.cli.imports import run

    faulty, sound = p.participant_id(), p.participant_id()
    consent = isolated.service.record_consent

    def fails_for_one(participant, cmd, audit):
        decided = consent(participant, cmd, audit)  # its event made, then the fault
        if participant.participant_id == faulty:
            raise RuntimeError(f"a fault while writing to {faulty.lower()}@example.org\n"
                               "and the rest of its text")
        return decided

    monkeypatch.setitem(isolated.service._handlers, c.RecordConsent, fails_for_one)
    lines = [_line("ScreenParticipant", faulty, p.screening()),
             _line("ScreenParticipant", sound, p.screening()),
             _line("RecordConsent", faulty, p.CONSENT),
             _line("RecordConsent", sound, p.CONSENT)]
    report = run(isolated, [line.encode() for line in lines], "import")

    assert (report.accepted, report.failed) == (3, None)
    (number, refusal), = report.refused
    assert number == 3 and refusal.startswith("internal_error: RuntimeError at ")
    assert "fails_for_one" in refusal and "example.org" not in refusal  # where, not what
    assert isolated.service.get_participant(faulty).version == 1  # screened only
    assert isolated.service.get_participant(sound).version == 2


def test_a_database_that_fails_mid_import_reports_what_was_written_before(isolated,
                                                                          monkeypatch):
    """It reported only the failure: what the transactions before it had written and
    refused was left out, so a person could not tell how far the file had gone."""
    import sqlalchemy

    from infrastructure.cli import imports

    monkeypatch.setattr(imports, "CHUNK", 2)  # the second transaction: lines 3 and 4
    first, second = p.participant_id(), p.participant_id()
    lines = [_line("ScreenParticipant", first, p.screening()), "{not json",
             _line("ScreenParticipant", second, p.screening()), "{nor this",  # not reached
             _line("RecordConsent", first, p.CONSENT)]
    dispatch_all, calls = isolated.bus.dispatch_all, []

    def the_second_transaction_fails(intents, *args, **kwargs):
        calls.append(intents)
        if len(calls) == 2:
            raise sqlalchemy.exc.OperationalError("INSERT", {}, OSError("connection lost"))
        return dispatch_all(intents, *args, **kwargs)

    monkeypatch.setattr(isolated.bus, "dispatch_all", the_second_transaction_fails)
    report = imports.run(isolated, [line.encode() for line in lines], "import")

    assert (report.accepted, report.repeated) == (1, 0)
    assert [number for number, _ in report.refused] == [2]
    assert report.failed is not None and report.failed.startswith(
        "the database failed (OperationalError: ")
