import pytest

from domain.errors import ProtocolError
from domain.protocol import protocol_from_mapping
from tests.factories import protocol_data


def test_the_default_protocol_loads():
    p = protocol_from_mapping(protocol_data())
    assert [v.code for v in p.visits] == ["baseline", "week6", "end_of_treatment", "follow_up"]
    assert [(v.target_day, v.window_before) for v in p.visits] == [(0, 0), (42, 7), (90, 7),
                                                                   (180, 14)]
    assert p.site_ids == ("CASE", "METRO")
    assert [a.code for a in p.arms] == ["b12", "control"]
    # Languages, stages and the visits' names come from the file, not from the code.
    assert p.languages == ("en", "es")
    assert p.eligibility.stage_choices == ("0", "I", "II", "III", "IV")
    assert p.visits[1].name_in("es") == "de la semana 6" and p.visits[1].name_in("fr") == "week6"
    assert p.treatment_ends_at == "end_of_treatment"
    assert [s.time_zone for s in p.sites] == ["America/New_York"] * 2  # Cleveland, Ohio


def test_a_site_without_a_time_zone_keeps_utc():
    data = protocol_data()
    del data["sites"][0]["time_zone"]
    assert protocol_from_mapping(data).sites[0].time_zone == "UTC"


@pytest.mark.parametrize(("mutate", "key"), [
    (lambda d: d["eligibility"].pop("zubrod_max"), "eligibility.zubrod_max: missing"),
    (lambda d: d["eligibility"].update(zubrod_max="two"), "eligibility.zubrod_max: expected"),
    (lambda d: d["visits"][1].update(target_day=-3), "visits[1].target_day"),
    (lambda d: d["randomization"].update(block_sizes=[3]), "randomization.block_sizes"),
    (lambda d: d["sites"].append(dict(d["sites"][0])), "sites: codes must be unique"),
    (lambda d: d["eligibility"].update(stages=["V"]), "eligibility.stages"),
    (lambda d: d["eligibility"].pop("stage_choices"), "eligibility.stage_choices: missing"),
    (lambda d: d["dose"].update(treatment_ends_at="week99"), "dose.treatment_ends_at"),
    (lambda d: d["visits"][0]["names"].update(fr="initiale"),
     "visits[0].names: 'fr' is not a language of the study"),
    (lambda d: d["reminders"]["offsets"][0].update(relative_to="moon"),
     "reminders.offsets[0].relative_to"),
    (lambda d: d["eligibility"]["aromatase_inhibitors"][0].update(brand_names="Arimidex"),
     "eligibility.aromatase_inhibitors[0].brand_names: expected"),
    (lambda d: d["eligibility"]["aromatase_inhibitors"][0].update(brand_names=[]),
     "eligibility.aromatase_inhibitors[0].brand_names: expected"),
    (lambda d: d["eligibility"]["aromatase_inhibitors"][1].update(brand_names=["ARIMIDEX"]),
     "eligibility.aromatase_inhibitors: 'ARIMIDEX' names both anastrozole and letrozole"),
    (lambda d: d["sites"][1].update(time_zone="Ohio/Cleveland"),
     "sites[1].time_zone: 'Ohio/Cleveland' is not an IANA time zone"),
    (lambda d: d["sites"][0].update(time_zone="../../etc/passwd"), "sites[0].time_zone"),
])
def test_a_bad_protocol_names_the_key(mutate, key):
    data = protocol_data()
    mutate(data)
    with pytest.raises(ProtocolError, match=key.replace("[", r"\[").replace("]", r"\]")):
        protocol_from_mapping(data)


def test_the_aromatase_inhibitors_carry_their_brand_names():
    inhibitors = protocol_from_mapping(protocol_data()).eligibility.aromatase_inhibitors
    assert [(ai.drug, ai.brand_names, ai.daily_dose_mg) for ai in inhibitors] == [
        ("anastrozole", ("Arimidex",), 1), ("letrozole", ("Femara",), 2.5),
        ("exemestane", ("Aromasin",), 25)]


def test_brand_names_are_optional():
    data = protocol_data()
    for inhibitor in data["eligibility"]["aromatase_inhibitors"]:
        del inhibitor["brand_names"]
    inhibitors = protocol_from_mapping(data).eligibility.aromatase_inhibitors
    assert [ai.names for ai in inhibitors] == [("anastrozole",), ("letrozole",),
                                               ("exemestane",)]
