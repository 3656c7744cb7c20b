"""FHIR R4 export: one ResearchSubject per participant, as NDJSON (the bulk-data
convention), streamed from the read models with constant memory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from sqlalchemy import select

from domain.access import EVERY_SITE, Scope
from domain.participant import participant_uuid
from infrastructure.audit.exports import Deidentifier, by_participant
from infrastructure.readside.queries import in_scope
from infrastructure.store.bootstrap import Trialog
from infrastructure.store.tables import participants

# Our participant status -> R4 ResearchSubject.status (required value set
# http://hl7.org/fhir/ValueSet/research-subject-status). A randomized participant is on
# the intervention in the dosed arm and under observation in the control arm.
STATUS = {
    "screened": "eligible",
    "screen_failed": "ineligible",
    "consented": "pending-on-study",
    "off_treatment": "follow-up",
    "completed": "off-study",
    "withdrawn": "withdrawn",
}


def subject_status(status: str, arm_receives_dose: bool | None) -> str:
    if status == "randomized":
        return "on-study-intervention" if arm_receives_dose else "on-study-observation"
    return STATUS[status]


def research_subjects(t: Trialog, deidentify: bool = False,
                      scope: Scope = EVERY_SITE) -> Iterator[dict[str, Any]]:
    """One ResearchSubject resource per participant of the scope's sites, ordered by
    participant id (de-identified: by pseudonym)."""
    protocol = t.protocol
    # A pseudonym is not the participant's identifier: it gets a system of its own.
    kind = "pseudonym" if deidentify else "participant"
    system = f"urn:trialog:{protocol.study_id}:{kind}"
    doses = {arm.code: arm.receives_dose for arm in protocol.arms}
    masker = Deidentifier(t.settings.pseudonym_key) if deidentify else None
    p = participants
    query = (select(p.c.participant_id, p.c.status, p.c.arm, p.c.screened_on)
             .where(in_scope(scope, p.c.participant_id)).order_by(p.c.participant_id))
    with t.engine.connect() as connection:
        for row in by_participant(connection, query, masker):
            pid, start = row.participant_id, row.screened_on
            if masker is not None:
                start, pid = masker.shift(pid, start), masker.pseudonym(pid)
                resource_id = pid
            else:
                resource_id = str(participant_uuid(pid))  # any text id, as a valid FHIR id
            identifier = {"system": system, "value": pid}
            resource: dict[str, Any] = {
                "resourceType": "ResearchSubject",
                "id": resource_id,
                "identifier": [identifier],
                "status": subject_status(row.status, doses.get(row.arm)),
                "period": {"start": start.isoformat()},
                "study": {"reference": f"ResearchStudy/{protocol.study_id}",
                          "display": protocol.title},
                "individual": {"identifier": identifier},
            }
            if row.arm is not None:
                resource["assignedArm"] = row.arm
                resource["actualArm"] = row.arm  # open label, no crossover
            yield resource


def fhir_ndjson(t: Trialog, deidentify: bool = False,
                scope: Scope = EVERY_SITE) -> Iterator[str]:
    """The NDJSON text in chunks of up to 500 resources."""
    lines: list[str] = []
    for resource in research_subjects(t, deidentify, scope):
        lines.append(json.dumps(resource, ensure_ascii=False, separators=(",", ":")) + "\n")
        if len(lines) == 500:
            yield "".join(lines)
            lines = []
    if lines:
        yield "".join(lines)
