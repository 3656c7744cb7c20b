"""Command bodies as an upstream service sends them (JSON: dates as strings)."""

from __future__ import annotations

import uuid
from datetime import date, timedelta
from typing import Any

REGISTERED = date(2026, 3, 4)


def participant_id(site: str = "CASE") -> str:
    return f"{site}-{uuid.uuid4().hex[:10]}"


def eligibility(**changes: Any) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "er_positive": True, "pgr_positive": False, "stage": "II", "metastatic": False,
        "surgery_completed": True, "aimss_after_ai_start": True,
        "aromatase_inhibitor": {"drug": "anastrozole", "daily_dose_mg": 1,
                                "started_on": "2026-01-02",
                                "planned_days_after_registration": 365},
        "menopause": {"months_since_last_period": 30, "bilateral_oophorectomy": False,
                      "hysterectomy_ovaries_retained": False, "fsh_postmenopausal": None},
        "zubrod": 1, "b12_allergy": False, "substance_abuse_last_on": None,
        "chronic_liver_disease": False, "end_stage_renal_disease": False,
        "analgesics": [{"drug": "gabapentin", "stable_since": "2025-12-01"}],
        "b12_supplement_stopped_on": None, "willing_blood_samples": True,
        "other_investigational_agents": False, "uncontrolled_intercurrent_illness": False,
        "surgery_side_effects_resolved": True, "prior_therapy_toxicity_resolved": True,
        "pain_due_to_fracture_or_injury": False, "able_to_consent": True,
    }
    facts.update(changes)
    return facts


def screening(site: str = "CASE", language: str = "en", **changes: Any) -> dict[str, Any]:
    return {"site_id": site, "screened_on": "2026-03-01", "birth_date": "1958-06-15",
            "email": "participant@example.org", "language": language,
            "eligibility": eligibility(**changes)}


CONSENT = {"consent_version": "2.1", "signed_on": "2026-03-02", "signed_by": "participant",
           "language": "en"}
RANDOMIZE = {"registered_on": REGISTERED.isoformat()}


def dose(day: int, dose_mcg: float = 1000) -> dict[str, Any]:
    return {"taken_on": (REGISTERED + timedelta(days=day)).isoformat(), "taken": True,
            "dose_mcg": dose_mcg}


def visit(code: str, day: int, pain: int = 5) -> dict[str, Any]:
    return {
        "visit": code, "completed_on": (REGISTERED + timedelta(days=day)).isoformat(),
        "bpi_sf": {"worst": pain + 2, "least": pain - 2, "average": pain, "now": pain,
                   "interference": {"general_activity": 4, "mood": 3, "walking": 5,
                                    "work": 4, "relations": 2, "sleep": 6, "enjoyment": 3}},
        "fact_es": {f"GP{i}": 1 for i in range(1, 8)},
        "adherence": {"doses_taken": 40, "doses_expected": 42},
    }
