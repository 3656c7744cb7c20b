"""The straight walk of a schema's load gives what marshmallow's own load gives, the same
values in the same order or the same errors, for valid bodies and for every kind of broken
one; and a valid body doesn't go through marshmallow's load at all."""

from __future__ import annotations

import copy
import random
import uuid
from pathlib import Path
from typing import Any

import pytest
from marshmallow import Schema, ValidationError, fields

from domain.commands import COMMAND_TYPES
from infrastructure.api.schemas import CommandEnvelope
from infrastructure.store.bootstrap import load_protocol
from infrastructure.store.loaders import loader
from infrastructure.store.schemas import data_schemas
from tests.e2e.payloads import CONSENT, RANDOMIZE, dose, screening, visit

PROTOCOL = load_protocol(Path(__file__).parents[2] / "protocols" / "nct04205786.toml")
SCHEMAS = data_schemas(PROTOCOL)
QUERY_ID = "6f1c1d8e-4b7a-4d52-9a3e-0f6a3c2b9d10"
EXAMPLES: dict[str, dict[str, Any]] = {
    "ScreenParticipant": screening(),
    "RecordConsent": CONSENT,
    "RandomizeParticipant": RANDOMIZE,
    "RecordBloodSample": {"timepoint": "baseline", "collected_at": "2026-03-05T09:30:00+01:00",
                          "results": {"b12_pg_ml": 410.5, "crp_mg_l": None,
                                      "homocysteine_umol_l": 9, "mma_nmol_l": 180.0}},
    "RecordDose": dose(3),
    "CompleteVisit": visit("week6", 42),
    "ReportMedication": {"drug": "ibuprofen", "started_on": "2026-03-10", "stopped_on": None,
                         "contains_b12": False},
    "WithdrawParticipant": {"withdrawn_on": "2026-04-01", "scope": "study",
                            "reason_code": "moved", "note": "moved abroad"},
    "CorrectData": {"event_id": str(uuid.UUID(int=7)), "field": "bpi_sf.worst", "value": 4},
    "ResolveDeviation": {"deviation_id": str(uuid.UUID(int=8)), "resolution": "documented"},
    "RaiseQuery": {"query_id": QUERY_ID, "text": "Is the date right?", "visit": "week6"},
    "RespondToQuery": {"query_id": QUERY_ID, "text": "Yes."},
    "CloseQuery": {"query_id": QUERY_ID},
    "ReopenQuery": {"query_id": QUERY_ID, "text": "Again?"},
    "CancelQuery": {"query_id": QUERY_ID, "text": None},
    "VerifySource": {"visit": "baseline"},
    "SignVisit": {"meaning": "I approve this visit's data", "password": "pw",
                  "visit": "week6"},
    "SignCasebook": {"meaning": "I approve the casebook", "password": "pw"},
    "LockVisit": {"visit": "week6"},
    "UnlockVisit": {"visit": "week6"},
    "LockCasebook": {},
    "UnlockCasebook": {},
}
ODD_VALUES: list[Any] = [None, "", "x" * 5000, "not-a-date", "2026-02-30", "\x00", 0, -1,
                         2**40, 1.5, float("nan"), True, False, [], [1], {}, {"a": 1},
                         "gabapentin", "ANASTROZOLE", "Arimidex", "week6", "es", "III",
                         "2026-03-01", "2026-03-05T09:30:00", str(uuid.UUID(int=9)),
                         "participant@example.org", "no-at-sign"]


def _outcome(load: Any, body: Any) -> tuple[str, Any]:
    """The loaded value with every object's keys in order, or the error messages."""
    try:
        return "loaded", _ordered(load(copy.deepcopy(body)))
    except ValidationError as e:
        return "refused", e.messages


def _ordered(value: Any) -> Any:
    if isinstance(value, dict):
        return [(type(value), [(k, _ordered(v)) for k, v in value.items()])]
    if isinstance(value, list):
        return [_ordered(v) for v in value]
    return (type(value), value)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The path of every value inside ``value`` (keys and list indexes)."""
    found = [path] if path else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*path, index))
    return found


def _mutants(body: dict[str, Any]) -> list[Any]:
    """Each value replaced by every odd value, each key dropped, an unknown key added at
    every level, and the body itself swapped for other shapes."""
    mutants: list[Any] = [None, [], "body", [body]]
    for path in _paths(body):
        *parents, last = path
        for odd in [*ODD_VALUES, "__drop__"]:
            mutant = copy.deepcopy(body)
            target = mutant
            for step in parents:
                target = target[step]
            if odd == "__drop__":
                target.pop(last)
            else:
                target[last] = copy.deepcopy(odd)
            mutants.append(mutant)
        mutant = copy.deepcopy(body)
        target = mutant
        for step in path:
            target = target[step]
        if isinstance(target, dict):
            target["unexpected"] = 1
            mutants.append(mutant)
    mutants.append({**copy.deepcopy(body), "unexpected": 1})
    return mutants


def test_every_command_type_has_an_example():
    assert set(EXAMPLES) == set(COMMAND_TYPES) == set(SCHEMAS)


@pytest.mark.parametrize("type_name", sorted(EXAMPLES))
def test_the_walk_loads_what_marshmallow_loads_and_refuses_as_it_refuses(type_name):
    schema = SCHEMAS[type_name]()
    load = loader(schema)
    valid = EXAMPLES[type_name]
    assert _outcome(load, valid)[0] == "loaded"
    mutants = _mutants(valid)
    assert len(mutants) > 4
    refused = 0
    for body in [valid, *mutants]:
        expected = _outcome(schema.load, body)
        assert _outcome(load, body) == expected, body
        refused += expected[0] == "refused"
    assert refused > 0


def test_random_combinations_of_changes_agree_on_the_screening():
    """Several changes at once (the walk must not accept a body with two faults)."""
    schema = SCHEMAS["ScreenParticipant"]()
    load = loader(schema)
    rng = random.Random(20261202)
    paths = _paths(EXAMPLES["ScreenParticipant"])
    outcomes = set()
    for _ in range(1500):
        body = copy.deepcopy(EXAMPLES["ScreenParticipant"])
        for path in rng.sample(paths, rng.randint(1, 4)):
            target = body
            for step in path[:-1]:
                if not isinstance(target, (dict, list)):
                    break
                try:
                    target = target[step]
                except (KeyError, IndexError, TypeError):
                    break
            else:
                if isinstance(target, (dict, list)):
                    try:
                        target[path[-1]] = copy.deepcopy(rng.choice(ODD_VALUES))
                    except (IndexError, TypeError):
                        pass
        expected = _outcome(schema.load, body)
        assert _outcome(load, body) == expected, body
        outcomes.add(expected[0])
    assert outcomes == {"loaded", "refused"}


def test_the_envelope_walk_agrees():
    schema = CommandEnvelope()
    load = loader(schema)
    body = {"command_id": str(uuid.UUID(int=5)), "type": "RecordConsent",
            "participant_id": "CASE-1", "expected_version": 2, "reason": "late entry",
            "data": CONSENT}
    for each in [body, *_mutants(body)]:
        assert _outcome(load, each) == _outcome(schema.load, each), each


class _Refusing(Exception):
    pass


@pytest.mark.parametrize("type_name", ["ScreenParticipant", "CompleteVisit",
                                       "RecordBloodSample", "RaiseQuery"])
def test_a_valid_body_is_walked_without_marshmallows_load(type_name, monkeypatch):
    """The fast path is taken (marshmallow's load, made to fail, is never called), for
    nested schemas, lists and schema-level checks too; a broken body does call it."""
    schema = SCHEMAS[type_name]()
    load = loader(schema)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise _Refusing

    monkeypatch.setattr(Schema, "load", refuse)
    assert load(copy.deepcopy(EXAMPLES[type_name]))
    with pytest.raises(_Refusing):
        load({**EXAMPLES[type_name], "unexpected": 1})


class _NoRepeats(fields.List):
    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        out = super()._deserialize(value, attr, data, **kwargs)
        if len(set(out)) != len(out):
            raise ValidationError("no repeats")
        return out


class _NotBad(fields.String):
    def _validate(self, value: Any) -> None:
        if value == "bad":
            raise ValidationError("bad")
        super()._validate(value)


def test_a_field_that_overrides_a_step_the_walk_skips_is_loaded_by_marshmallow():
    """A List subclass checking its items together, a field validating in ``_validate``:
    the walk would not call them, so their schemas are not walked."""
    schema = Schema.from_dict({"xs": _NoRepeats(fields.String()), "s": _NotBad()})()
    load = loader(schema)
    assert load == schema.load
    for body in ({"xs": ["a", "a"], "s": "ok"}, {"xs": ["a"], "s": "bad"}):
        assert _outcome(load, body)[0] == "refused"
        assert _outcome(load, body) == _outcome(schema.load, body)
    nested = Schema.from_dict({"inner": fields.Nested(schema)})()
    assert _outcome(loader(nested), {"inner": {"xs": ["a", "a"]}})[0] == "refused"


@pytest.mark.parametrize(("type_name", "target"), [
    ("RaiseQuery", {"query_id": QUERY_ID, "text": "?", "event_id": str(uuid.UUID(int=7))}),
    ("CorrectData", {"event_id": str(uuid.UUID(int=7)), "value": 4}),
])
def test_a_field_path_is_at_most_200_characters(type_name, target):
    """A query's or a correction's field is kept in its event and shown in every list: a
    path no event has, 200,000 characters long, was stored as given."""
    load = loader(SCHEMAS[type_name]())
    assert load({**target, "field": "a" * 200})["field"] == "a" * 200
    with pytest.raises(ValidationError) as refused:
        load({**target, "field": "a" * 201})
    assert refused.value.messages == {"field": ["Longer than maximum length 200."]}


@pytest.mark.parametrize("written", ["20260307", "2026-W10-6", "2026-3-7", "2026-03-07 "])
def test_a_date_is_written_as_the_contract_says(written):
    load = loader(SCHEMAS["RecordDose"]())
    with pytest.raises(ValidationError) as refused:
        load({**dose(3), "taken_on": written})
    assert refused.value.messages == {"taken_on": ["Not a valid date (YYYY-MM-DD)."]}
    assert load({**dose(3), "taken_on": "2026-03-07"})["taken_on"].isoformat() == "2026-03-07"


@pytest.mark.parametrize(("written", "taken"), [
    ("2026-03-05T09:30", "2026-03-05T09:30:00+00:00"),
    ("2026-03-05T09:30:15+01:00", "2026-03-05T09:30:15+01:00"),
    ("2026-03-05 09:30:15Z", "2026-03-05T09:30:15+00:00"),  # RFC 3339's space
    ("2026-03-05", None), ("20260305T0930Z", None), ("2026-03-05T9:30", None),
])
def test_a_blood_sample_s_time_is_a_date_and_a_time_of_day(written, taken):
    load = loader(SCHEMAS["RecordBloodSample"]())
    body = {**EXAMPLES["RecordBloodSample"], "collected_at": written}
    if taken is None:
        with pytest.raises(ValidationError) as refused:
            load(body)
        assert list(refused.value.messages) == ["collected_at"]
        assert "YYYY-MM-DDTHH:MM" in refused.value.messages["collected_at"][0]
    else:
        assert load(body)["collected_at"].isoformat() == taken


def test_an_id_or_a_path_ending_in_a_line_break_is_refused():
    """Python's "$" also matches before a last line break: such an id was stored, then
    no participant route could find it (they match the whole id)."""
    load = loader(CommandEnvelope())
    body = {"command_id": str(uuid.UUID(int=5)), "type": "RecordConsent", "data": CONSENT}
    with pytest.raises(ValidationError) as refused:
        load({**body, "participant_id": "CASE-1\n"})
    assert list(refused.value.messages) == ["participant_id"]
    assert load({**body, "participant_id": "CASE-1"})["participant_id"] == "CASE-1"
    correction = loader(SCHEMAS["CorrectData"]())
    with pytest.raises(ValidationError) as refused:
        correction({"event_id": str(uuid.UUID(int=7)), "field": "bpi_sf.worst\n",
                    "value": 4})
    assert list(refused.value.messages) == ["field"]


def test_the_correction_rules_know_each_command_s_fields():
    """What a query may name: any field the event's command defines, nested ones too."""
    from infrastructure.store.corrections import CorrectionRules

    defines = CorrectionRules(PROTOCOL).defines
    for event_type, path in (("VisitCompleted", "bpi_sf.worst"),
                             ("VisitCompleted", "completed_on"),
                             ("ParticipantScreened", "eligibility.aromatase_inhibitor.drug"),
                             ("BloodSampleCollected", "results.b12_pg_ml")):
        assert defines(event_type, path), path
    for event_type, path in (("VisitCompleted", "bpi_sf.best"), ("VisitCompleted", "nope"),
                             ("DeviationFlagged", "code"), ("NoSuchEvent", "x")):
        assert not defines(event_type, path), path


def test_a_corrected_value_may_be_nested_32_levels_and_no_more():
    """Past that, the fingerprint's JSON encoder recursed past Python's limit (a 500)."""
    import json

    import orjson

    from infrastructure.store.schemas import shallow

    shallow(json.loads("[" * 32 + "]" * 32))
    shallow({"a": [[{"b": None}], "x"]})
    with pytest.raises(ValidationError):
        shallow(json.loads("[" * 32 + "{}" + "]" * 32))  # the object is the 33rd level
    with pytest.raises(ValidationError):
        shallow(orjson.loads("[" * 1000 + "]" * 1000))  # as the API's parser takes it
