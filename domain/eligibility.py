"""Eligibility: which of the protocol's criteria a screened participant fails.

Every criterion is evaluated against a reference date (``screened_on`` at screening,
``registered_on`` at randomization). "At least N days before" holds when
``(reference - date).days >= N``; substance use excludes when ``(reference - date).days <= 365``;
age is completed years on the reference date.

A yes/no criterion added after records were first stored is not evaluated (so not failed)
for a record that lacks its key: re-evaluating an old record never fails it, or raises, for
a question it was not asked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import date
from typing import Any

from domain.protocol import EligibilityRules

Facts = Mapping[str, Any]


def age_on(birth_date: date, reference: date) -> int:
    """Completed years on the reference date."""
    before_birthday = (reference.month, reference.day) < (birth_date.month, birth_date.day)
    return reference.year - birth_date.year - int(before_birthday)


def days_between(earlier: date, reference: date) -> int:
    return (reference - earlier).days


def hormone_receptor_positive(f: Facts, rules: EligibilityRules, ref: date, age: int) -> bool:
    """ER and/or PgR positive invasive carcinoma of the breast."""
    return bool(f.get("er_positive")) or bool(f.get("pgr_positive"))


def stage(f: Facts, rules: EligibilityRules, ref: date, age: int) -> bool:
    """Stage I-III."""
    return f["stage"] in rules.stages


def non_metastatic(f: Facts, rules: EligibilityRules, ref: date, age: int) -> bool:
    """No evidence of metastatic disease (M0)."""
    return f["metastatic"] is False


def _answered(f: Facts, key: str, required: bool) -> bool:
    """The fact has the required answer, or the record predates the question."""
    return key not in f or f[key] is required


def surgery_completed(f: Facts, rules: EligibilityRules, ref: date, age: int) -> bool:
    """Must have completed mastectomy or breast sparing surgery."""
    return f["surgery_completed"] is True


def surgery_side_effects_resolved(f: Facts, rules: EligibilityRules, ref: date,
                                  age: int) -> bool:
    """Must have recovered from all side effects of the surgery."""
    return _answered(f, "surgery_side_effects_resolved", True)


def prior_therapy_toxicity_resolved(f: Facts, rules: EligibilityRules, ref: date,
                                    age: int) -> bool:
    """Recovered from all Grade 2 or higher side effects of chemotherapy and/or radiation
    therapy with the exception of alopecia and peripheral neuropathy."""
    return _answered(f, "prior_therapy_toxicity_resolved", True)


def aimss_after_ai_start(f: Facts, rules: EligibilityRules, ref: date, age: int) -> bool:
    """Musculoskeletal symptoms that began or increased after starting AI therapy."""
    return f["aimss_after_ai_start"] is True


def no_pain_due_to_fracture_or_injury(f: Facts, rules: EligibilityRules, ref: date,
                                      age: int) -> bool:
    """New musculoskeletal pain must not be due specifically to fracture or traumatic
    injury."""
    return _answered(f, "pain_due_to_fracture_or_injury", False)


def aromatase_inhibitor_generic_name(name: str, rules: EligibilityRules) -> str | None:
    """The generic name of the protocol's aromatase inhibitor that ``name`` names, by its
    generic or a brand name in any case (Anastrozole (Arimidex), Letrozole (Femara),
    Exemestane (Aromasin)); None for any other drug."""
    return rules.generic_names.get(name.casefold())


def aromatase_inhibitor_choices(rules: EligibilityRules) -> list[str]:
    """The protocol's aromatase inhibitors as a person reads them: ``anastrozole
    (Arimidex)``, each drug once."""
    choices: dict[str, str] = {}
    for ai in rules.aromatase_inhibitors:
        brands = f" ({', '.join(ai.brand_names)})" if ai.brand_names else ""
        choices.setdefault(ai.drug, ai.drug + brands)
    return list(choices.values())


def aromatase_inhibitor(f: Facts, rules: EligibilityRules, ref: date, age: int) -> bool:
    """Currently taking one of the following aromatase inhibitor (AI) doses: Anastrozole
    (Arimidex) 1 mg daily OR Letrozole (Femara) 2.5 mg daily OR Exemestane (Aromasin) 25 mg
    daily. The record holds the generic name (brand names are resolved when the command is
    validated)."""
    ai = f["aromatase_inhibitor"]
    return any(
        ai["drug"] == allowed.drug and float(ai["daily_dose_mg"]) == allowed.daily_dose_mg
        for allowed in rules.aromatase_inhibitors
    )


def ai_duration(f: Facts, rules: EligibilityRules, ref: date, age: int) -> bool:
    """AI taken for at least 14 days prior to registration."""
    started: date = f["aromatase_inhibitor"]["started_on"]
    return days_between(started, ref) >= rules.ai_min_days_before_registration


def ai_planned_continuation(f: Facts, rules: EligibilityRules, ref: date, age: int) -> bool:
    """AI planned for at least an additional 180 days after registration."""
    planned: int = f["aromatase_inhibitor"]["planned_days_after_registration"]
    return planned >= rules.ai_min_planned_days_after_registration


def postmenopausal(f: Facts, rules: EligibilityRules, ref: date, age: int) -> bool:
    """Post-menopausal: >=12 months since the last period, or prior bilateral oophorectomy,
    or hysterectomy with ovaries left in place and (age >= 60 or FSH in the post-menopausal
    range)."""
    m = f["menopause"]
    months = m.get("months_since_last_period")
    if months is not None and months >= rules.menopause_min_months_since_last_period:
        return True
    if m["bilateral_oophorectomy"]:
        return True
    if m["hysterectomy_ovaries_retained"]:
        return age >= rules.menopause_age_without_fsh or m.get("fsh_postmenopausal") is True
    return False


def zubrod(f: Facts, rules: EligibilityRules, ref: date, age: int) -> bool:
    """Zubrod performance status 0-2."""
    score: int = f["zubrod"]
    return 0 <= score <= rules.zubrod_max


def no_b12_allergy(f: Facts, rules: EligibilityRules, ref: date, age: int) -> bool:
    """No known allergy or hypersensitivity to vitamin B12."""
    return f["b12_allergy"] is False


def no_recent_substance_abuse(f: Facts, rules: EligibilityRules, ref: date, age: int) -> bool:
    """No alcohol or other substance abuse or dependence within 365 days prior to enrollment."""
    last: date | None = f.get("substance_abuse_last_on")
    return last is None or days_between(last, ref) > rules.substance_abuse_exclusion_days


def no_chronic_liver_disease(f: Facts, rules: EligibilityRules, ref: date, age: int) -> bool:
    """No chronic liver disease."""
    return f["chronic_liver_disease"] is False


def no_end_stage_renal_disease(f: Facts, rules: EligibilityRules, ref: date, age: int) -> bool:
    """No end-stage renal disease."""
    return f["end_stage_renal_disease"] is False


def analgesics_stable(f: Facts, rules: EligibilityRules, ref: date, age: int) -> bool:
    """Narcotics, tramadol, gabapentin or pregabalin at a stable dose for at least 30 days."""
    return all(
        days_between(a["stable_since"], ref) >= rules.analgesic_min_stable_days
        for a in f.get("analgesics") or ()
    )


def b12_washout(f: Facts, rules: EligibilityRules, ref: date, age: int) -> bool:
    """Vitamin B12 or a B12-containing multivitamin stopped for two weeks."""
    stopped: date | None = f.get("b12_supplement_stopped_on")
    return stopped is None or days_between(stopped, ref) >= rules.b12_washout_min_days


def willing_blood_samples(f: Facts, rules: EligibilityRules, ref: date, age: int) -> bool:
    """Willing to submit blood samples for laboratory testing."""
    return f["willing_blood_samples"] is True


def able_to_consent(f: Facts, rules: EligibilityRules, ref: date, age: int) -> bool:
    """Subjects must have the ability to understand and the willingness to sign a written
    informed consent document."""
    return _answered(f, "able_to_consent", True)


def no_other_investigational_agents(f: Facts, rules: EligibilityRules, ref: date, age: int) -> bool:
    """Not receiving any other investigational agents."""
    return f["other_investigational_agents"] is False


def no_uncontrolled_intercurrent_illness(
    f: Facts, rules: EligibilityRules, ref: date, age: int
) -> bool:
    """No uncontrolled intercurrent illness."""
    return f["uncontrolled_intercurrent_illness"] is False


Criterion = Callable[[Facts, EligibilityRules, date, int], bool]

CRITERIA: dict[str, Criterion] = {
    c.__name__: c
    for c in (
        hormone_receptor_positive, stage, non_metastatic, surgery_completed,
        surgery_side_effects_resolved, prior_therapy_toxicity_resolved, aimss_after_ai_start,
        no_pain_due_to_fracture_or_injury, aromatase_inhibitor, ai_duration,
        ai_planned_continuation, postmenopausal, zubrod, no_b12_allergy,
        no_recent_substance_abuse, no_chronic_liver_disease, no_end_stage_renal_disease,
        analgesics_stable, b12_washout, willing_blood_samples, able_to_consent,
        no_other_investigational_agents, no_uncontrolled_intercurrent_illness,
    )
}

# Re-checked against the registration date at randomization.
TIME_RELATIVE = ("ai_duration", "analgesics_stable", "b12_washout", "no_recent_substance_abuse")


def failed_criteria(
    facts: Facts, birth_date: date, reference: date, rules: EligibilityRules,
    only: Iterable[str] | None = None,
) -> list[str]:
    """The codes of the criteria not met on the reference date, in protocol order."""
    age = age_on(birth_date, reference)
    names = list(only) if only is not None else list(CRITERIA)
    return [name for name in names if not CRITERIA[name](facts, rules, reference, age)]


def washout_failures(
    medications: Iterable[Mapping[str, Any]], registered_on: date, rules: EligibilityRules
) -> list[str]:
    """B12 products reported before randomization that were not stopped at least 14 days
    before registration (a product with no stop date fails)."""
    failures = []
    for med in medications:
        if not med["contains_b12"]:
            continue
        stopped: date | None = med.get("stopped_on")
        if stopped is None or days_between(stopped, registered_on) < rules.b12_washout_min_days:
            failures.append(med["drug"])
    return failures
