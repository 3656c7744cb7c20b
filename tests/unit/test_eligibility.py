from datetime import date, timedelta

import pytest

from domain.eligibility import (
    CRITERIA,
    TIME_RELATIVE,
    age_on,
    aromatase_inhibitor_choices,
    aromatase_inhibitor_generic_name,
    failed_criteria,
    washout_failures,
)
from tests.factories import eligibility, protocol

RULES = protocol().eligibility
REF = date(2026, 3, 1)
BORN = date(1958, 6, 15)


def failed(facts, birth_date=BORN, reference=REF):
    return failed_criteria(facts, birth_date, reference, RULES)


def days_before(n):
    return REF - timedelta(days=n)


def test_a_typical_candidate_meets_every_criterion():
    assert failed(eligibility()) == []


@pytest.mark.parametrize(("changes", "expected"), [
    ({"aromatase_inhibitor": {"started_on": days_before(14)}}, []),
    ({"aromatase_inhibitor": {"started_on": days_before(13)}}, ["ai_duration"]),
    ({"aromatase_inhibitor": {"planned_days_after_registration": 180}}, []),
    ({"aromatase_inhibitor": {"planned_days_after_registration": 179}},
     ["ai_planned_continuation"]),
    ({"analgesics": [{"drug": "tramadol", "stable_since": days_before(30)}]}, []),
    ({"analgesics": [{"drug": "tramadol", "stable_since": days_before(29)}]},
     ["analgesics_stable"]),
    ({"b12_supplement_stopped_on": days_before(14)}, []),
    ({"b12_supplement_stopped_on": days_before(13)}, ["b12_washout"]),
    ({"substance_abuse_last_on": days_before(366)}, []),
    ({"substance_abuse_last_on": days_before(365)}, ["no_recent_substance_abuse"]),
    ({"zubrod": 2}, []),
    ({"zubrod": 3}, ["zubrod"]),
    ({"stage": "I"}, []),
    ({"stage": "III"}, []),
    ({"stage": "0"}, ["stage"]),
    ({"stage": "IV"}, ["stage"]),
    ({"er_positive": None, "pgr_positive": True}, []),
    ({"er_positive": False, "pgr_positive": False}, ["hormone_receptor_positive"]),
    ({"metastatic": True}, ["non_metastatic"]),
    ({"surgery_completed": False}, ["surgery_completed"]),
    ({"aimss_after_ai_start": False}, ["aimss_after_ai_start"]),
    ({"aromatase_inhibitor": {"drug": "letrozole", "daily_dose_mg": 2.5}}, []),
    ({"aromatase_inhibitor": {"drug": "exemestane", "daily_dose_mg": 25}}, []),
    ({"aromatase_inhibitor": {"drug": "letrozole", "daily_dose_mg": 1}},
     ["aromatase_inhibitor"]),
    ({"aromatase_inhibitor": {"drug": "tamoxifen", "daily_dose_mg": 20}},
     ["aromatase_inhibitor"]),
    ({"b12_allergy": True}, ["no_b12_allergy"]),
    ({"chronic_liver_disease": True}, ["no_chronic_liver_disease"]),
    ({"end_stage_renal_disease": True}, ["no_end_stage_renal_disease"]),
    ({"willing_blood_samples": False}, ["willing_blood_samples"]),
    ({"other_investigational_agents": True}, ["no_other_investigational_agents"]),
    ({"uncontrolled_intercurrent_illness": True}, ["no_uncontrolled_intercurrent_illness"]),
    ({"surgery_side_effects_resolved": True}, []),
    ({"surgery_side_effects_resolved": False}, ["surgery_side_effects_resolved"]),
    ({"prior_therapy_toxicity_resolved": True}, []),
    ({"prior_therapy_toxicity_resolved": False}, ["prior_therapy_toxicity_resolved"]),
    ({"pain_due_to_fracture_or_injury": False}, []),
    ({"pain_due_to_fracture_or_injury": True}, ["no_pain_due_to_fracture_or_injury"]),
    ({"able_to_consent": True}, []),
    ({"able_to_consent": False}, ["able_to_consent"]),
])
def test_each_criterion_at_its_boundary(changes, expected):
    assert failed(eligibility(**changes)) == expected


NOT_MENOPAUSAL = {"months_since_last_period": None, "bilateral_oophorectomy": False,
                  "hysterectomy_ovaries_retained": False, "fsh_postmenopausal": None}


@pytest.mark.parametrize(("menopause", "birth_date", "ok"), [
    ({"months_since_last_period": 12}, BORN, True),
    ({"months_since_last_period": 11}, BORN, False),
    ({"bilateral_oophorectomy": True}, BORN, True),
    # Hysterectomy with ovaries retained: age 60 suffices without FSH...
    ({"hysterectomy_ovaries_retained": True}, date(1966, 3, 1), True),
    # ...one day short of 60 it needs an FSH in the post-menopausal range.
    ({"hysterectomy_ovaries_retained": True}, date(1966, 3, 2), False),
    ({"hysterectomy_ovaries_retained": True, "fsh_postmenopausal": True}, date(1970, 1, 1), True),
    ({"hysterectomy_ovaries_retained": True, "fsh_postmenopausal": False}, date(1970, 1, 1),
     False),
    ({}, BORN, False),
])
def test_post_menopausal_definitions(menopause, birth_date, ok):
    facts = eligibility(menopause={**NOT_MENOPAUSAL, **menopause})
    assert (failed(facts, birth_date) == []) is ok
    assert ("postmenopausal" in failed(facts, birth_date)) is not ok


def test_age_is_completed_years_on_the_reference_date():
    assert age_on(date(1966, 3, 1), REF) == 60
    assert age_on(date(1966, 3, 2), REF) == 59


def test_every_failed_criterion_is_listed_in_protocol_order():
    facts = eligibility(zubrod=4, stage="IV", b12_allergy=True)
    assert failed(facts) == ["stage", "zubrod", "no_b12_allergy"]


NEW_QUESTIONS = ("surgery_side_effects_resolved", "prior_therapy_toxicity_resolved",
                 "pain_due_to_fracture_or_injury", "able_to_consent")


def screened_before_the_new_questions(**changes):
    facts = eligibility(**changes)
    for key in NEW_QUESTIONS:
        del facts[key]
    return facts


def test_a_record_stored_before_the_new_questions_is_not_failed_for_them():
    assert failed(screened_before_the_new_questions()) == []


def test_a_record_stored_before_the_new_questions_still_fails_its_other_criteria():
    assert failed(screened_before_the_new_questions(zubrod=3)) == ["zubrod"]


def test_a_record_stored_before_the_new_questions_is_rechecked_at_randomization():
    facts = screened_before_the_new_questions()
    later = REF + timedelta(days=3)
    assert failed_criteria(facts, BORN, later, RULES, only=TIME_RELATIVE) == []


def test_every_failed_criterion_is_listed_in_protocol_order_with_the_new_ones():
    facts = eligibility(able_to_consent=False, pain_due_to_fracture_or_injury=True,
                        prior_therapy_toxicity_resolved=False, stage="IV")
    assert failed(facts) == ["stage", "prior_therapy_toxicity_resolved",
                             "no_pain_due_to_fracture_or_injury", "able_to_consent"]


@pytest.mark.parametrize(("name", "generic"), [
    ("anastrozole", "anastrozole"), ("Anastrozole", "anastrozole"),
    ("Arimidex", "anastrozole"), ("ARIMIDEX", "anastrozole"), ("arimidex", "anastrozole"),
    ("Femara", "letrozole"), ("fEMARA", "letrozole"), ("LETROZOLE", "letrozole"),
    ("Aromasin", "exemestane"), ("aromasin", "exemestane"), ("Exemestane", "exemestane"),
    ("tamoxifen", None), ("Nolvadex", None), ("Arimidex 1 mg", None), ("", None),
])
def test_an_aromatase_inhibitor_is_named_by_its_generic_or_brand_name_in_any_case(name,
                                                                                     generic):
    assert aromatase_inhibitor_generic_name(name, RULES) == generic


def test_the_protocol_drugs_are_listed_with_their_brand_names():
    assert aromatase_inhibitor_choices(RULES) == [
        "anastrozole (Arimidex)", "letrozole (Femara)", "exemestane (Aromasin)"]


def test_the_criterion_compares_the_generic_name_the_record_keeps():
    assert failed(eligibility(aromatase_inhibitor={"drug": "letrozole",
                                                   "daily_dose_mg": 2.5})) == []
    assert failed(eligibility(aromatase_inhibitor={"drug": "anastrozole",
                                                   "daily_dose_mg": 2.5})) == [
        "aromatase_inhibitor"]


def test_every_criterion_has_the_seed_wording_in_its_docstring():
    assert all(rule.__doc__ for rule in CRITERIA.values())


@pytest.mark.parametrize(("stopped_on", "failures"), [
    (days_before(14), []),
    (days_before(13), ["multivitamin"]),
    (None, ["multivitamin"]),
])
def test_washout_counts_every_reported_b12_product(stopped_on, failures):
    meds = [{"drug": "multivitamin", "contains_b12": True, "stopped_on": stopped_on},
            {"drug": "ibuprofen", "contains_b12": False, "stopped_on": None}]
    assert washout_failures(meds, REF, RULES) == failures
