"""Valid command data for tests, overridable field by field."""

from __future__ import annotations

import copy
import tomllib
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from domain.commands import Audit
from domain.protocol import Protocol, protocol_from_mapping

PROTOCOL_FILE = Path(__file__).resolve().parents[1] / "protocols" / "nct04205786.toml"
SCREENED_ON = date(2026, 3, 1)


def protocol_data() -> dict[str, Any]:
    with open(PROTOCOL_FILE, "rb") as f:
        return tomllib.load(f)


def protocol() -> Protocol:
    return protocol_from_mapping(protocol_data())


def audit(reason: str | None = None, at: datetime | None = None) -> Audit:
    return Audit(command_id=str(uuid.uuid4()), actor="test-service",
                 recorded_at=at or datetime.now(UTC), reason=reason)


def eligibility(**changes: Any) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "er_positive": True, "pgr_positive": False, "stage": "II", "metastatic": False,
        "surgery_completed": True, "aimss_after_ai_start": True,
        "aromatase_inhibitor": {"drug": "anastrozole", "daily_dose_mg": 1,
                                "started_on": date(2026, 1, 2),
                                "planned_days_after_registration": 365},
        "menopause": {"months_since_last_period": 30, "bilateral_oophorectomy": False,
                      "hysterectomy_ovaries_retained": False, "fsh_postmenopausal": None},
        "zubrod": 1, "b12_allergy": False, "substance_abuse_last_on": None,
        "chronic_liver_disease": False, "end_stage_renal_disease": False,
        "analgesics": [{"drug": "gabapentin", "stable_since": date(2025, 12, 1)}],
        "b12_supplement_stopped_on": None, "willing_blood_samples": True,
        "other_investigational_agents": False, "uncontrolled_intercurrent_illness": False,
        "surgery_side_effects_resolved": True, "prior_therapy_toxicity_resolved": True,
        "pain_due_to_fracture_or_injury": False, "able_to_consent": True,
    }
    facts = copy.deepcopy(facts)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(facts.get(key), dict):
            facts[key].update(value)
        else:
            facts[key] = value
    return facts


def screening(site_id: str = "CASE", **eligibility_changes: Any) -> dict[str, Any]:
    return {"site_id": site_id, "screened_on": SCREENED_ON, "birth_date": date(1958, 6, 15),
            "email": "participant@example.org", "language": "en",
            "eligibility": eligibility(**eligibility_changes)}


def consent(signed_on: date = date(2026, 3, 2)) -> dict[str, Any]:
    return {"consent_version": "2.1", "signed_on": signed_on, "signed_by": "participant",
            "language": "en"}


def new_participant_id(site: str = "CASE") -> str:
    return f"{site}-{uuid.uuid4().hex[:10]}"
