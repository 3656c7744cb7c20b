"""Queries, source verification, signatures and locks: every rule in the aggregate, run on
the service's in-memory event store."""

import uuid
from datetime import UTC, date, datetime

import pytest

from domain import commands as c
from domain.errors import InvalidTransition, Locked, ValidationFailed
from domain.service import TrialService
from tests.factories import audit, consent, protocol, screening

PID = "CASE-0001"
QUERY = "9b2f3c4e-0000-4000-8000-000000000001"


@pytest.fixture
def service():
    service = TrialService(protocol(), b"unit-seed")
    for command in (c.ScreenParticipant(PID, screening()), c.RecordConsent(PID, consent()),
                    c.RandomizeParticipant(PID, {"registered_on": date(2026, 3, 4)}),
                    c.CompleteVisit(PID, {"visit": "baseline",
                                          "completed_on": date(2026, 3, 4)})):
        service.execute(command, audit())
    yield service
    service.close()


def run(service, command_class, reason=None, **data):
    service.execute(command_class(PID, data), audit(reason))
    return service.get_participant(PID)


def baseline_event(service) -> str:
    return service.get_participant(PID).completed_visits()["baseline"]["event_id"]


def test_a_query_goes_open_answered_closed_reopened_cancelled(service):
    p = run(service, c.RaiseQuery, query_id=QUERY, text="BPI worst missing?", visit="baseline")
    assert p.queries[QUERY]["status"] == "open" and p.open_queries == 1
    p = run(service, c.RespondToQuery, query_id=QUERY, text="Checked: source says 6")
    assert p.queries[QUERY]["status"] == "answered" and p.open_queries == 1
    p = run(service, c.CloseQuery, query_id=QUERY, text=None)
    assert p.queries[QUERY]["status"] == "closed" and p.open_queries == 0
    with pytest.raises(ValidationFailed, match="reason"):
        run(service, c.ReopenQuery, query_id=QUERY)
    p = run(service, c.ReopenQuery, reason="the source was misread", query_id=QUERY)
    assert p.queries[QUERY]["status"] == "open"
    p = run(service, c.CancelQuery, query_id=QUERY, text="raised in error")
    thread = p.queries[QUERY]["thread"]
    assert [m["action"] for m in thread] == ["raise", "respond", "close", "reopen", "cancel"]
    assert thread[3]["text"] == "the source was misread"
    assert all(m["by"] == "test-service" for m in thread)


def test_a_step_with_a_text_and_a_reason_keeps_both_in_the_thread(service):
    """A reopening's text hid its required reason: the thread showed the text alone."""
    run(service, c.RaiseQuery, query_id=QUERY, text="BPI worst missing?", visit="baseline")
    run(service, c.RespondToQuery, query_id=QUERY, text="Checked: source says 6")
    run(service, c.CloseQuery, query_id=QUERY, text=None)
    p = run(service, c.ReopenQuery, reason="the source was misread", query_id=QUERY,
            text="Please look again")
    assert p.queries[QUERY]["thread"][-1] == {
        "action": "reopen", "by": "test-service", "at": p.queries[QUERY]["thread"][-1]["at"],
        "text": "Please look again", "reason": "the source was misread"}
    p = run(service, c.CancelQuery, reason="raised in error", query_id=QUERY, text=None)
    assert p.queries[QUERY]["thread"][-1]["text"] == "raised in error"  # the reason alone
    assert "reason" not in p.queries[QUERY]["thread"][-1]


@pytest.mark.parametrize(("steps", "refused", "state"), [
    ([], c.CloseQuery, "open"),
    ([], c.ReopenQuery, "open"),
    ([c.RespondToQuery], c.RespondToQuery, "answered"),
    ([c.CancelQuery], c.RespondToQuery, "cancelled"),
    ([c.RespondToQuery, c.CloseQuery], c.CancelQuery, "closed"),
])
def test_a_query_refuses_every_transition_outside_the_table(service, steps, refused, state):
    run(service, c.RaiseQuery, query_id=QUERY, text="?", visit="baseline")
    for step in steps:
        run(service, step, query_id=QUERY, text="x")
    with pytest.raises(InvalidTransition, match=f"in status {state}") as raised:
        run(service, refused, reason="r", query_id=QUERY, text="x")
    assert raised.value.details == {"status": state}


def test_a_query_targets_a_visit_or_an_event_that_exists(service):
    with pytest.raises(ValidationFailed, match="data.visit"):
        run(service, c.RaiseQuery, query_id=QUERY, text="?", visit="week99")
    with pytest.raises(ValidationFailed, match="data.event_id"):
        run(service, c.RaiseQuery, query_id=QUERY, text="?",
            event_id="00000000-0000-5000-8000-000000000000", field=None)
    p = run(service, c.RaiseQuery, query_id=QUERY, text="?", event_id=baseline_event(service),
            field="completed_on")
    assert p.queries[QUERY]["target"] == {"event_id": baseline_event(service),
                                          "field": "completed_on"}
    with pytest.raises(InvalidTransition, match="exists already"):
        run(service, c.RaiseQuery, query_id=QUERY, text="again", visit="baseline")
    with pytest.raises(ValidationFailed, match="data.query_id"):
        run(service, c.RespondToQuery, query_id="00000000-0000-4000-8000-000000000009",
            text="?")


def test_a_query_asking_what_a_waiting_query_asks_of_its_target_is_refused(service):
    """The same question of the same target under a new id (a form sent again after Back,
    a client's retry) while the first still waits: refused, naming the first."""
    event = baseline_event(service)
    run(service, c.RaiseQuery, query_id=QUERY, text="BPI worst?", visit="baseline")
    run(service, c.RaiseQuery, query_id=str(uuid.uuid4()), text="BPI worst?",
        event_id=event, field=None)
    again = str(uuid.uuid4())
    for waiting in ("open", "answered"):
        with pytest.raises(InvalidTransition, match=f"query {QUERY} asks this already") \
                as raised:
            run(service, c.RaiseQuery, query_id=again, text="BPI worst?", visit="baseline")
        assert raised.value.details == {"status": waiting, "query_id": QUERY}
        if waiting == "open":
            run(service, c.RespondToQuery, query_id=QUERY, text="6 in the source")
    # Another question of the target, or the same question once the first is done, is
    # a new query.
    p = run(service, c.RaiseQuery, query_id=again, text="BPI least?", visit="baseline")
    run(service, c.CloseQuery, query_id=QUERY, text=None)
    p = run(service, c.RaiseQuery, query_id=str(uuid.uuid4()), text="BPI worst?",
            visit="baseline")
    assert p.open_queries == 3
    with pytest.raises(InvalidTransition, match="asks this already"):
        run(service, c.RaiseQuery, query_id=str(uuid.uuid4()), text="BPI worst?",
            event_id=event, field=None)


def test_a_visit_whose_data_moved_keeps_its_verification_and_signature_in_the_state(
        service):
    """Its data moved to another visit by a correction, a verified and signed visit was
    shown not verified and unsigned (the state listed only visits completed or missed),
    while the history and the ODM export said changed since verified and invalidated."""
    from domain.views import management_view

    run(service, c.VerifySource, visit="baseline")
    run(service, c.SignVisit, visit="baseline", meaning="I approve", signer="dr.ada",
        printed_name="Ada Lovelace")
    p = run(service, c.CorrectData, reason="entered on the wrong visit",
            event_id=baseline_event(service), field="visit", value="week6")
    assert "baseline" not in p.completed_visits()
    shown = management_view(p)["visits"]
    assert shown["baseline"]["sdv"] == "changed_since_verified"
    assert (shown["baseline"]["signature"]["signed_by"],
            shown["baseline"]["signature"]["valid"]) == ("dr.ada", False)
    assert shown["week6"] == {"sdv": "not_verified", "signature": None, "locked": False}


def test_a_correction_after_verification_marks_the_visit_changed(service):
    with pytest.raises(InvalidTransition, match="not completed"):
        run(service, c.VerifySource, visit="week6")
    assert service.get_participant(PID).sdv_status("baseline") == "not_verified"
    p = run(service, c.VerifySource, visit="baseline")
    assert p.sdv_status("baseline") == "verified"
    with pytest.raises(InvalidTransition, match="verified already"):
        run(service, c.VerifySource, visit="baseline")
    p = run(service, c.CorrectData, reason="transcription", event_id=baseline_event(service),
            field="completed_on", value=date(2026, 3, 5))
    assert p.sdv_status("baseline") == "changed_since_verified"
    assert run(service, c.VerifySource, visit="baseline").sdv_status("baseline") == "verified"


SIGN = {"meaning": "I approve the data of this visit", "signer": "dr.ada",
        "printed_name": "Ada Lovelace"}


def test_a_correction_of_signed_data_invalidates_the_signature_in_the_same_command(service):
    p = run(service, c.SignVisit, visit="baseline", **SIGN)
    signature = p.signatures["visit:baseline"]
    assert (signature["signed_by"], signature["printed_name"], signature["valid"]) == (
        "dr.ada", "Ada Lovelace", True)
    assert len(signature["data_sha256"]) == 64 and signature["signed_version"] == 4
    with pytest.raises(InvalidTransition, match="signed already by dr.ada"):
        run(service, c.SignVisit, visit="baseline", **SIGN)
    before = p.version
    service.execute(c.CorrectData(PID, {"event_id": baseline_event(service),
                                        "field": "completed_on", "value": date(2026, 3, 5)}),
                    audit("transcription"))
    p = service.get_participant(PID)
    assert p.version == before + 2  # DataCorrected and SignatureInvalidated, one command
    assert p.signatures["visit:baseline"]["valid"] is False
    assert run(service, c.SignVisit, visit="baseline", **SIGN).signatures[
        "visit:baseline"]["valid"]


def test_a_locked_visit_or_casebook_refuses_changes_but_not_queries_or_signing(service):
    with pytest.raises(InvalidTransition, match="neither completed nor missed"):
        run(service, c.LockVisit, visit="week6")
    run(service, c.SignVisit, visit="baseline", **SIGN)
    run(service, c.LockVisit, visit="baseline")
    correction = c.CorrectData(PID, {"event_id": baseline_event(service),
                                     "field": "completed_on", "value": date(2026, 3, 5)})
    with pytest.raises(Locked, match="visit baseline"):
        service.execute(correction, audit("transcription"))
    run(service, c.RaiseQuery, query_id=QUERY, text="?", visit="baseline")
    run(service, c.VerifySource, visit="baseline")
    with pytest.raises(ValidationFailed, match="reason"):
        run(service, c.UnlockVisit, visit="baseline")
    p = run(service, c.UnlockVisit, reason="query 1 needs a correction", visit="baseline")
    assert p.signatures["visit:baseline"]["valid"] is False  # an unlock invalidates it
    service.execute(correction, audit("transcription"))
    run(service, c.LockCasebook)
    for command in (c.RecordDose(PID, {"taken_on": date(2026, 3, 6), "taken": True,
                                       "dose_mcg": 1000}),
                    c.WithdrawParticipant(PID, {"withdrawn_on": date(2026, 3, 7),
                                                "scope": "study", "reason_code": "x"})):
        with pytest.raises(Locked, match="casebook is locked"):
            service.execute(command, audit())
    with pytest.raises(InvalidTransition, match="locked already"):
        run(service, c.LockCasebook)
    run(service, c.UnlockCasebook, reason="late diary")
    service.execute(c.RecordDose(PID, {"taken_on": date(2026, 3, 6), "taken": True,
                                       "dose_mcg": 1000}), audit())


def test_a_casebook_is_signed_at_the_end_with_no_query_open(service):
    with pytest.raises(InvalidTransition, match="completed or withdrawn, not randomized"):
        run(service, c.SignCasebook, **SIGN)
    run(service, c.RaiseQuery, query_id=QUERY, text="?", visit="baseline")
    run(service, c.WithdrawParticipant, withdrawn_on=date(2026, 3, 10), scope="study",
        reason_code="moved")
    with pytest.raises(InvalidTransition, match="1 queries are not closed"):
        run(service, c.SignCasebook, **SIGN)
    run(service, c.CancelQuery, query_id=QUERY, text="withdrawn")
    p = run(service, c.SignCasebook, **SIGN)
    assert p.signatures["casebook"]["valid"]


def test_the_database_lock_opens_its_stream_and_refuses_a_second_lock(service):
    for blank in (None, " "):
        with pytest.raises(ValidationFailed, match="is required for LockDatabase"):
            service.decide_trial("LockDatabase", audit(blank))
    database = service.decide_trial("LockDatabase", audit("interim analysis"))
    service.save(database)
    assert service.database().locked["locked_by"] == "test-service"
    with pytest.raises(InvalidTransition, match="locked already"):
        service.decide_trial("LockDatabase", audit("again"))
    with pytest.raises(ValidationFailed, match="reason"):
        service.decide_trial("UnlockDatabase", audit())
    service.save(service.decide_trial("UnlockDatabase", audit("a late query")))
    assert service.database().locked is None


def test_a_long_record_loads_from_its_snapshot_exactly_as_replayed(service):
    from datetime import timedelta

    for day in range(1, 130):
        service.execute(c.RecordDose(PID, {"taken_on": date(2026, 3, 4) + timedelta(days=day),
                                           "taken": True, "dose_mcg": 1000}),
                        audit(at=datetime(2026, 7, 20, tzinfo=UTC)))
    run(service, c.RaiseQuery, query_id=QUERY, text="?", visit="baseline")
    snapshots = list(service.snapshots.get(service.get_participant(PID).id))
    assert [s.originator_version for s in snapshots] == [100]
    loaded = service.get_participant(PID)  # from the snapshot and 34 events
    replayed = _replayed(service, loaded.id)  # from the first event
    assert vars(loaded) == vars(replayed)
    assert list(loaded.records)[:3] == [1, 2, 3]  # integer keys, as replayed


def _doses(service, days):
    from datetime import timedelta

    for day in days:
        service.execute(c.RecordDose(PID, {"taken_on": date(2026, 3, 4) + timedelta(days=day),
                                           "taken": True, "dose_mcg": 1000}),
                        audit(at=datetime(2026, 7, 20, tzinfo=UTC)))


def _snapshot_put_as_is(service, snapshot):
    """A snapshot stored without the store's own put (which names this code as its
    deriver): as another release's code would have stored it."""
    stored = service.snapshots.mapper.to_stored_event(snapshot)
    service.snapshots.recorder.insert_events([stored])


def test_a_snapshot_is_used_only_by_the_code_that_derived_it(service):
    """A snapshot holds state as its code's ``apply`` derived it: after a release that
    derives otherwise, it would show what the events no longer give. Each names the code
    that took it; other code's (or one naming none) is passed over for the events."""
    from domain.participant import DERIVED_BY, derivation

    _doses(service, range(1, 98))  # versions 5..101: a snapshot at 100
    uuid = service.get_participant(PID).id
    [taken] = list(service.snapshots.get(uuid))
    assert taken.state[DERIVED_BY] == derivation()
    assert DERIVED_BY not in vars(service.get_participant(PID))
    true_arm = service.get_participant(PID).arm
    other_arm = "control" if true_arm == "b12" else "b12"

    def at(version, **state):
        """The participant's snapshot at ``version``, as the library takes it, with
        ``state`` in place of what its events give."""
        snapshot = type(taken).take(service.repository.get(uuid, version=version))
        snapshot.state.update(state)
        return snapshot

    # Another release's snapshot says arm is the other one: not used, nor one naming none.
    _snapshot_put_as_is(service, at(101, arm=other_arm, derived_by="another release"))
    assert service.get_participant(PID).arm == true_arm
    assert [s.originator_version for s in service.snapshots.get(uuid)] == [100]
    _doses(service, [98])
    _snapshot_put_as_is(service, at(102, arm=other_arm))
    assert service.get_participant(PID).arm == true_arm
    # The same snapshot naming this code is used (what makes the two above pass over).
    _doses(service, [99])
    _snapshot_put_as_is(service, at(103, arm=other_arm, derived_by=derivation()))
    assert service.get_participant(PID).arm == other_arm
    # One this code can't even read (its class moved since) is passed over too.
    from eventsourcing.persistence import StoredEvent

    _doses(service, [100])
    readable = service.snapshots.mapper.to_stored_event(at(104, derived_by=derivation()))
    service.snapshots.recorder.insert_events([StoredEvent(
        uuid, 104, "domain.gone:Snapshot", readable.state)])
    assert service.get_participant(PID).arm == true_arm


def _replayed(service, originator_id):
    from eventsourcing.domain import Aggregate

    participant = None
    for event in service.events.get(originator_id):
        participant = event.mutate(participant)
    assert isinstance(participant, Aggregate)
    return participant


def test_new_data_in_a_signed_casebook_invalidates_its_signature(service):
    run(service, c.WithdrawParticipant, withdrawn_on=date(2026, 3, 10), scope="treatment",
        reason_code="side effects")
    run(service, c.CompleteVisit, visit="week6", completed_on=date(2026, 4, 15))
    run(service, c.CompleteVisit, visit="end_of_treatment", completed_on=date(2026, 6, 3))
    p = run(service, c.CompleteVisit, visit="follow_up", completed_on=date(2026, 9, 2))
    assert p.status == "completed"
    p = run(service, c.SignCasebook, **SIGN)
    assert p.signatures["casebook"]["valid"]
    before = p.version
    p = run(service, c.ReportMedication, drug="ibuprofen", started_on=None, stopped_on=None,
            contains_b12=False)
    assert p.version == before + 2  # the medication and the invalidation, one command
    assert p.signatures["casebook"]["valid"] is False


def test_a_blood_sample_belongs_to_its_visit_for_locks_verification_and_signatures(service):
    sample = {"timepoint": "baseline", "collected_at": datetime(2026, 3, 4, 8, tzinfo=UTC),
              "results": {"b12_pg_ml": 400.0}}
    run(service, c.RecordBloodSample, **sample)
    run(service, c.VerifySource, visit="baseline")
    run(service, c.SignVisit, visit="baseline", **SIGN)
    run(service, c.LockVisit, visit="baseline")
    with pytest.raises(Locked, match="visit baseline"):
        run(service, c.RecordBloodSample, **sample)
    run(service, c.UnlockVisit, reason="a late sample", visit="baseline")
    run(service, c.SignVisit, visit="baseline", **SIGN)
    p = run(service, c.RecordBloodSample, **sample)  # a second sample of the visit
    assert p.signatures["visit:baseline"]["valid"] is False
    assert p.sdv_status("baseline") == "changed_since_verified"  # data not verified yet
    assert _replayed(service, p.id).sdv_status("baseline") == "changed_since_verified"
    p = run(service, c.VerifySource, visit="baseline")
    event_id = next(e for e, d in p.records_of("BloodSampleCollected"))
    p = run(service, c.CorrectData, reason="lab correction", event_id=event_id,
            field="results.b12_pg_ml", value=410.0)
    assert p.sdv_status("baseline") == "changed_since_verified"


def test_a_visit_s_signature_digests_its_samples_with_its_form(service):
    """A sample recorded after a signature invalidated it as new data of the visit, yet the
    next signature's SHA-256 of the signed data was the same: it covered the form alone."""
    first = run(service, c.SignVisit, visit="baseline", **SIGN).signatures["visit:baseline"]
    sample = {"timepoint": "baseline", "collected_at": datetime(2026, 3, 4, 8, tzinfo=UTC),
              "results": {"b12_pg_ml": 400.0}}
    assert run(service, c.RecordBloodSample, **sample).signatures[
        "visit:baseline"]["valid"] is False
    p = run(service, c.SignVisit, visit="baseline", **SIGN)
    second = p.signatures["visit:baseline"]
    assert second["data_sha256"] != first["data_sha256"]
    event_id = next(e for e, _ in p.records_of("BloodSampleCollected"))
    p = run(service, c.CorrectData, reason="lab correction", event_id=event_id,
            field="results.b12_pg_ml", value=410.0)
    assert p.signatures["visit:baseline"]["valid"] is False
    third = run(service, c.SignVisit, visit="baseline", **SIGN).signatures["visit:baseline"]
    assert len({first["data_sha256"], second["data_sha256"], third["data_sha256"]}) == 3


def test_a_sample_moved_into_a_verified_signed_visit_changes_both_visits(service):
    sample = {"timepoint": "baseline", "collected_at": datetime(2026, 3, 4, 8, tzinfo=UTC)}
    p = run(service, c.RecordBloodSample, **sample)
    run(service, c.CompleteVisit, visit="week6", completed_on=date(2026, 4, 15))
    for visit in ("baseline", "week6"):
        run(service, c.VerifySource, visit=visit)
        p = run(service, c.SignVisit, visit=visit, **SIGN)
    before = p.version
    event_id = next(e for e, _ in p.records_of("BloodSampleCollected"))
    p = run(service, c.CorrectData, reason="wrong timepoint", event_id=event_id,
            field="timepoint", value="week6")
    assert p.version == before + 3  # the correction and both invalidations, one command
    for visit in ("baseline", "week6"):
        assert p.sdv_status(visit) == "changed_since_verified"
        assert p.signatures[f"visit:{visit}"]["valid"] is False
    assert p.sdv_status("week6") == _replayed(service, p.id).sdv_status("week6")


def test_a_query_names_a_field_of_its_event(service):
    for unknown in ("no.such.field", "nosuchfield", "completed_on.day"):
        with pytest.raises(ValidationFailed) as refused:
            run(service, c.RaiseQuery, query_id=QUERY, text="?",
                event_id=baseline_event(service), field=unknown)
        assert refused.value.fields == {
            "data.field": [f"{unknown!r} is not a field of VisitCompleted"]}
    assert service.get_participant(PID).queries == {}
    p = run(service, c.RaiseQuery, query_id=QUERY, text="Date?",
            event_id=baseline_event(service), field="completed_on")
    assert p.queries[QUERY]["target"]["field"] == "completed_on"


def test_a_query_may_ask_about_a_field_its_command_defines_but_the_record_left_out():
    """Where the service knows the commands' fields (the correction rule's), a field the
    record does not hold is one a query may well ask about ("why is BPI worst missing?")."""
    defined = {("VisitCompleted", "bpi_sf.worst")}
    service = TrialService(protocol(), b"unit-seed")
    service.field_defined = lambda event_type, path: (event_type, path) in defined
    for command in (c.ScreenParticipant(PID, screening()), c.RecordConsent(PID, consent()),
                    c.RandomizeParticipant(PID, {"registered_on": date(2026, 3, 4)}),
                    c.CompleteVisit(PID, {"visit": "baseline",
                                          "completed_on": date(2026, 3, 4)})):
        service.execute(command, audit())
    p = run(service, c.RaiseQuery, query_id=QUERY, text="BPI worst missing?",
            event_id=baseline_event(service), field="bpi_sf.worst")
    assert p.queries[QUERY]["target"]["field"] == "bpi_sf.worst"
    with pytest.raises(ValidationFailed):
        run(service, c.RaiseQuery, query_id=str(uuid.uuid4()), text="?",
            event_id=baseline_event(service), field="bpi_sf.best")
    service.close()
