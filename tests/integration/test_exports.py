"""The auditors' exports: ODM 1.3.2 validated against the official schema, FHIR R4
ResearchSubjects parsed by fhir.resources, both with and without de-identification."""

from __future__ import annotations

import csv
import io
import json
import uuid
from datetime import date, datetime, timedelta
from pathlib import Path

import odmlib
import pytest
from fhir.resources.R4B.researchsubject import ResearchSubject
from lxml import etree

from domain import commands as c
from infrastructure.audit import exports
from infrastructure.audit.fhir import research_subjects
from infrastructure.audit.history import history
from infrastructure.audit.odm import odm_document
from infrastructure.readside.projections import TrialProjection
from tests.factories import consent, new_participant_id, screening
from tests.integration.helpers import REGISTERED, dose, enrol, send

ODM_XSD = Path(odmlib.__file__).parent / "schemas" / "odm" / "1.3.2" / "ODM1-3-2.xsd"
NS = {"odm": "http://www.cdisc.org/ns/odm/v1.3"}
R4_SUBJECT_STATUSES = {
    "candidate", "eligible", "follow-up", "ineligible", "not-registered", "off-study",
    "on-study", "on-study-intervention", "on-study-observation", "pending-on-study",
    "potential-candidate", "screening", "withdrawn"}


@pytest.fixture(scope="module")
def odm_schema() -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(ODM_XSD)))


def _record_with_a_correction(t) -> dict[str, str]:
    """A randomized participant with doses, a visit, a blood sample, a medication, a
    correction of a score and of the email, and a deviation flag; the ids to look for."""
    pid = enrol(t)
    for day in range(3):
        send(t, c.RecordDose(pid, dose(day)))
    visit_command = str(uuid.uuid4())
    send(t, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": REGISTERED,
                                  "bpi_sf": {"worst": 6, "least": 2, "average": 4, "now": 3}}),
         command_id=visit_command, actor="site-coordinator")
    send(t, c.RecordBloodSample(pid, {"timepoint": "baseline",
                                      "collected_at": datetime(2026, 3, 4, 8, 30),
                                      "results": {"b12_pg_ml": 410.0}}))
    send(t, c.ReportMedication(pid, {"drug": "ibuprofen", "contains_b12": False}))
    participant = t.service.get_participant(pid)
    visit_event = next(event_id for event_id, _ in participant.records_of("VisitCompleted"))
    correction = str(uuid.uuid4())
    send(t, c.CorrectData(pid, {"event_id": visit_event, "field": "bpi_sf.worst", "value": 7}),
         command_id=correction, actor="data-manager", reason="transcription error on page 2")
    send(t, c.CorrectData(pid, {"event_id": visit_event, "field": "bpi_sf.now", "value": None}),
         actor="data-manager", reason="answer given by the companion, taken back")
    send(t, c.CorrectData(pid, {"event_id": participant.screening_event, "field": "email",
                                "value": "new-address@participants.example"}),
         actor="data-manager", reason="participant moved")
    deviation = str(uuid.uuid4())  # as the monitor's: derived from the participant's id
    send(t, c.FlagDeviation(pid, {"deviation_id": deviation, "code": "wrong_dose",
                                  "severity": "minor", "evidence": [visit_event],
                                  "detail": "dose on 2026-03-02 was 2000 mcg"}),
         actor="deviation-monitor")
    return {"pid": pid, "visit_command": visit_command, "correction": correction,
            "deviation": deviation, "visit_event": visit_event}


def _export(t, deidentify=False) -> etree._Element:
    chunks = list(odm_document(t, deidentify=deidentify))
    assert len(chunks) > 3, "the document is yielded in parts"
    return etree.fromstring("".join(chunks).encode())


def _defined(root, tag: str) -> set[str]:
    return {e.get("OID") for e in root.iterfind(f".//odm:{tag}", NS)}


def _referenced(root, tag: str, attribute: str) -> set[str]:
    return {e.get(attribute) for e in root.iterfind(f".//odm:{tag}", NS)}


def test_the_odm_export_validates_and_carries_every_change_with_its_audit_record(
        isolated, odm_schema):
    ids = _record_with_a_correction(isolated)
    root = _export(isolated)
    assert odm_schema.validate(root), odm_schema.error_log
    # The schema has no key references: check every OID used is defined in the document.
    assert _referenced(root, "ItemData", "ItemOID") <= _defined(root, "ItemDef")
    assert _referenced(root, "ItemRef", "ItemOID") == _defined(root, "ItemDef")
    assert _referenced(root, "FormData", "FormOID") <= _defined(root, "FormDef")
    assert _referenced(root, "StudyEventData", "StudyEventOID") <= _defined(root,
                                                                             "StudyEventDef")
    assert _referenced(root, "ItemGroupData", "ItemGroupOID") <= _defined(root, "ItemGroupDef")
    assert _referenced(root, "UserRef", "UserOID") == _defined(root, "User")
    assert _referenced(root, "LocationRef", "LocationOID") <= _defined(root, "Location")

    subject = root.find(f".//odm:SubjectData[@SubjectKey='{ids['pid']}']", NS)
    forms = subject.findall(".//odm:FormData[@TransactionType='Insert']", NS)
    assert [f.get("FormOID") for f in forms] == [
        "F.SCREENING", "F.CONSENT", "F.RANDOMIZATION", "F.DOSE", "F.DOSE", "F.DOSE",
        "F.VISIT", "F.BLOOD", "F.MEDICATION", "F.DEVIATION"]
    assert all(f.find("odm:AuditRecord/odm:SourceID", NS) is not None for f in forms)
    visit = forms[6]
    assert visit.find("odm:AuditRecord/odm:SourceID", NS).text == ids["visit_command"]
    assert visit.find("odm:AuditRecord/odm:UserRef", NS).get("UserOID") == \
        "USR.site-coordinator"
    original = visit.find(".//odm:ItemData[@ItemOID='I.VISIT.bpi_sf.worst']", NS)
    assert original.get("Value") == "6" and original.get("TransactionType") == "Insert"

    updates = subject.findall(".//odm:ItemData[@TransactionType='Update']", NS)
    assert [u.get("ItemOID") for u in updates] == ["I.VISIT.bpi_sf.worst",
                                                   "I.VISIT.bpi_sf.now", "I.SCREENING.email"]
    assert updates[1].get("IsNull") == "Yes"  # an answer taken back
    worst = updates[0]
    assert worst.get("Value") == "7"
    audit = worst.find("odm:AuditRecord", NS)
    assert audit.find("odm:ReasonForChange", NS).text == "transcription error on page 2"
    assert audit.find("odm:SourceID", NS).text == ids["correction"]
    assert audit.find("odm:UserRef", NS).get("UserOID") == "USR.data-manager"
    assert audit.find("odm:LocationRef", NS).get("LocationOID") == "LOC.CASE"
    assert datetime.fromisoformat(audit.find("odm:DateTimeStamp", NS).text).tzinfo
    # The update is placed in the corrected form: same study event, form and repeat key.
    corrected_form = worst.getparent().getparent()
    assert (corrected_form.get("FormOID"), corrected_form.get("FormRepeatKey")) == \
        (visit.get("FormOID"), visit.get("FormRepeatKey"))
    assert corrected_form.getparent().get("StudyEventOID") == "SE.BASELINE"


def test_the_deidentified_odm_export_has_no_identifiers_and_shifted_dates(isolated,
                                                                        odm_schema):
    ids = _record_with_a_correction(isolated)
    plain, masked = _export(isolated), _export(isolated, deidentify=True)
    assert odm_schema.validate(masked), odm_schema.error_log
    text = etree.tostring(masked, encoding="unicode")
    assert ids["pid"] not in text and "participants.example" not in text
    for item in ("I.SCREENING.email", "I.SCREENING.birth_date"):
        assert masked.find(f".//odm:ItemData[@ItemOID='{item}']", NS) is None
        assert plain.find(f".//odm:ItemData[@ItemOID='{item}']", NS) is not None
    subjects = masked.findall(".//odm:SubjectData", NS)
    assert len(subjects) == 1 and subjects[0].get("SubjectKey").startswith("P-")

    def dates(root, oid):
        return [date.fromisoformat(e.get("Value"))
                for e in root.iterfind(f".//odm:ItemData[@ItemOID='{oid}']", NS)]
    shifts = {(a - b).days for oid in ("I.SCREENING.screened_on", "I.DOSE.taken_on",
                                       "I.RANDOMIZATION.registered_on")
              for a, b in zip(dates(plain, oid), dates(masked, oid), strict=True)}

    def stamps(root):  # of the forms (the withheld email correction has one more)
        return [datetime.fromisoformat(e.text)
                for e in root.iterfind(".//odm:FormData/odm:AuditRecord/odm:DateTimeStamp", NS)]
    shifts |= {(a - b).days for a, b in zip(stamps(plain), stamps(masked), strict=True)}
    # dates inside a list of objects move too (a medication's start)
    listed = [json.loads(root.find(
        ".//odm:ItemData[@ItemOID='I.SCREENING.eligibility.analgesics']", NS).get("Value"))
        for root in (plain, masked)]
    shifts |= {(date.fromisoformat(a["stable_since"]) - date.fromisoformat(b["stable_since"])).days
               for a, b in zip(*listed, strict=True)}
    assert listed[0] and len(shifts) == 1 and 1 <= shifts.pop() <= 365
    # a command id, which the history lists with the participant's id, is a pseudonym too
    sources = [[e.text for e in root.iterfind(".//odm:AuditRecord/odm:SourceID", NS)]
               for root in (plain, masked)]
    assert sources[0] and all(uuid.UUID(s) for s in sources[0])
    assert len(sources[1]) == len(sources[0]) - 1  # not the withheld email correction's
    assert all(s.startswith("C-") for s in sources[1]) and not set(sources[0]) & set(sources[1])
    assert not any(s in text for s in sources[0])
    # ids derived from the participant's without a key, free text with real dates, and the
    # reasons given for changes: pseudonyms, or left out
    for secret in (ids["deviation"], ids["visit_event"], "2026-03-02 was",
                   "transcription error"):
        assert secret in etree.tostring(plain, encoding="unicode")
        assert secret not in text
    deviation_items = {e.get("ItemOID"): e.get("Value")
                       for e in masked.iterfind(".//odm:ItemData", NS)
                       if e.get("ItemOID", "").startswith("I.DEVIATION.")}
    assert deviation_items["I.DEVIATION.deviation_id"].startswith("R-")
    assert json.loads(deviation_items["I.DEVIATION.evidence"])[0].startswith("R-")
    assert "I.DEVIATION.detail" not in deviation_items
    assert masked.find(".//odm:ReasonForChange", NS) is None
    # The scores are kept as they are.
    assert [e.get("Value") for e in masked.iterfind(".//odm:ItemData", NS)
            if e.get("ItemOID") == "I.VISIT.bpi_sf.worst"] == ["6", "7"]


def test_without_contact_rights_the_odm_export_leaves_out_contact_details(isolated,
                                                                         odm_schema):
    ids = _record_with_a_correction(isolated)
    root = etree.fromstring("".join(odm_document(isolated, contact=False)).encode())
    assert odm_schema.validate(root), odm_schema.error_log
    assert root.find(f".//odm:SubjectData[@SubjectKey='{ids['pid']}']", NS) is not None
    oids = _referenced(root, "ItemData", "ItemOID")
    assert "I.SCREENING.email" not in oids and "I.SCREENING.birth_date" not in oids
    text = etree.tostring(root, encoding="unicode")
    assert "participants.example" not in text
    assert "I.VISIT.bpi_sf.worst" in oids
    # nor the id of the command that carried them (sent again with guessed details, its
    # answer would tell whether they were right); other commands' ids are there
    screening_command = history(isolated.service, ids["pid"], veil=isolated.veil_digest)[0]
    assert screening_command["type"] == "ParticipantScreened"
    assert screening_command["command_id"] not in text
    assert ids["visit_command"] in text
    with_contact = "".join(odm_document(isolated))
    assert screening_command["command_id"] in with_contact


def _participant_in_each_status(t) -> dict[str, str]:
    """Participant id -> our status, one participant per status the protocol reaches."""
    made = {}
    screened = new_participant_id()
    send(t, c.ScreenParticipant(screened, screening()))
    made[screened] = "screened"
    failed = new_participant_id()
    send(t, c.ScreenParticipant(failed, screening(stage="IV")))
    made[failed] = "screen_failed"
    consented = new_participant_id()
    send(t, c.ScreenParticipant(consented, screening()))
    send(t, c.RecordConsent(consented, consent()))
    made[consented] = "consented"
    for _ in range(4):  # both arms appear among four allocations
        made[enrol(t)] = "randomized"
    off = enrol(t)
    send(t, c.WithdrawParticipant(off, {"withdrawn_on": REGISTERED + timedelta(days=3),
                                        "scope": "treatment", "reason_code": "toxicity"}))
    made[off] = "off_treatment"
    gone = enrol(t, site="METRO")
    send(t, c.WithdrawParticipant(gone, {"withdrawn_on": REGISTERED + timedelta(days=3),
                                         "scope": "study", "reason_code": "moved"}))
    made[gone] = "withdrawn"
    TrialProjection(t).catch_up()
    return made


@pytest.mark.parametrize("deidentify", [False, True])
def test_every_fhir_resource_parses_as_r4_research_subject(isolated, deidentify):
    made = _participant_in_each_status(isolated)
    lines = "".join(exports.document(isolated, "fhir", deidentify)).splitlines()
    assert len(lines) == len(made)
    subjects = [ResearchSubject.model_validate_json(line) for line in lines]
    assert {s.status for s in subjects} <= R4_SUBJECT_STATUSES
    assert all(s.study.reference == "ResearchStudy/NCT04205786" for s in subjects)
    values = {s.identifier[0].value for s in subjects}
    assert (values == set(made)) != deidentify
    assert all(v.startswith("P-") for v in values) == deidentify


def test_deidentified_exports_list_participants_by_pseudonym_without_allocation_order(
        isolated, odm_schema, monkeypatch):
    """In the real ids' order (or the streams', derived from them) a de-identified export
    would show each site's order of enrolment, and the allocation index the order of
    randomization."""
    monkeypatch.setattr(exports, "ID_CHUNK", 2)  # participants of several visits a chunk
    made = _participant_in_each_status(isolated)
    masker = exports.Deidentifier(isolated.settings.pseudonym_key)
    pseudonyms = sorted(masker.pseudonym(pid) for pid in made)
    assert pseudonyms != [masker.pseudonym(pid) for pid in sorted(made)]  # or no test

    fhir = [json.loads(line)["identifier"][0]["value"]
            for line in "".join(exports.document(isolated, "fhir", True)).splitlines()]
    assert fhir == pseudonyms
    plain, masked = _csv(isolated), _csv(isolated, deidentify=True)
    listed = list(dict.fromkeys(row["participant_id"] for row in masked))
    assert listed == sorted({masker.pseudonym(row["participant_id"]) for row in plain})
    assert len(listed) > 2  # those with visits
    # each participant's rows together, its visits in the protocol's order
    by_pseudonym = sorted(((masker.pseudonym(row["participant_id"]), row["visit"])
                           for row in plain), key=lambda row: row[0])
    assert [(row["participant_id"], row["visit"]) for row in masked] == by_pseudonym

    root = _export(isolated, deidentify=True)
    assert odm_schema.validate(root), odm_schema.error_log
    keys = [e.get("SubjectKey") for e in root.iterfind(
        ".//odm:ClinicalData/odm:SubjectData[@TransactionType='Insert']", NS)]
    assert keys == pseudonyms
    assert root.find(".//odm:ItemData[@ItemOID='I.RANDOMIZATION.allocation_index']",
                     NS) is None
    assert _export(isolated).find(
        ".//odm:ItemData[@ItemOID='I.RANDOMIZATION.allocation_index']", NS) is not None


def test_fhir_statuses_and_arms_follow_the_participants_state(isolated):
    made = _participant_in_each_status(isolated)
    expected = {"screened": "eligible", "screen_failed": "ineligible",
                "consented": "pending-on-study", "off_treatment": "follow-up",
                "withdrawn": "withdrawn"}
    for resource in research_subjects(isolated):
        pid = resource["identifier"][0]["value"]
        arm = resource.get("assignedArm")
        if made[pid] == "randomized":
            assert resource["status"] == {"b12": "on-study-intervention",
                                          "control": "on-study-observation"}[arm]
        else:
            assert resource["status"] == expected[made[pid]]
        randomized = made[pid] in ("randomized", "off_treatment", "withdrawn")
        assert (arm in ("b12", "control")) == randomized
        assert resource.get("actualArm") == arm
        json.dumps(resource)  # plain JSON


def test_shifting_a_date_never_goes_before_year_one():
    # Dates near year 1 are accepted by the API; shifting them back must not fail.
    from datetime import UTC, date, datetime

    from infrastructure.audit.exports import Deidentifier

    masker = Deidentifier(b"key")
    assert masker.shift("P", date(1, 1, 2)) == date.min
    assert masker.shift_datetime("P", datetime(1, 1, 2, tzinfo=UTC)) == datetime.min.replace(
        tzinfo=UTC)
    days = masker.offset("P").days
    assert masker.shift("P", date(2026, 3, 4)) == date(2026, 3, 4) - timedelta(days=days)


# --- data management: queries, source verification, signatures, locks ----------------------

VISIT_MEANING = "I approve the data of this visit"
CASEBOOK_MEANING = "I approve this casebook"
SIGNER = {"signer": "dr-okafor", "printed_name": "Adaeze Okafor"}


def _sign(t, pid: str, command, **data) -> None:
    send(t, command(pid, {**data, **SIGNER}), actor=SIGNER["signer"])


def _visit_event(t, pid: str) -> str:
    return t.service.get_participant(pid).completed_visits()["baseline"]["event_id"]


def _managed_record(t) -> dict[str, str]:
    """A participant whose baseline visit had a query raised, answered and closed and one
    on an item raised, answered, reopened and cancelled, was verified and signed, then
    withdrawn and the casebook signed."""
    pid = enrol(t)
    send(t, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": REGISTERED,
                                  "bpi_sf": {"worst": 6, "least": 2, "average": 4, "now": 3}}),
         actor="site-coordinator")
    on_visit, on_item = str(uuid.uuid4()), str(uuid.uuid4())
    send(t, c.RaiseQuery(pid, {"query_id": on_visit, "visit": "baseline",
                               "text": "Worst pain 6: please check the diary"}), actor="cra-1")
    send(t, c.RespondToQuery(pid, {"query_id": on_visit, "text": "Checked: the diary says 6"}),
         actor="site-coordinator")
    send(t, c.CloseQuery(pid, {"query_id": on_visit, "text": None}), actor="cra-1")
    send(t, c.RaiseQuery(pid, {"query_id": on_item, "event_id": _visit_event(t, pid),
                               "field": "bpi_sf.least", "text": "Least pain 2?"}),
         actor="cra-1")
    send(t, c.RespondToQuery(pid, {"query_id": on_item, "text": "2 is right"}),
         actor="site-coordinator")
    send(t, c.ReopenQuery(pid, {"query_id": on_item}), actor="cra-1",
         reason="the diary says 3")
    send(t, c.CancelQuery(pid, {"query_id": on_item, "text": "raised by mistake"}),
         actor="cra-1")
    send(t, c.VerifySource(pid, {"visit": "baseline"}), actor="cra-1")
    _sign(t, pid, c.SignVisit, visit="baseline", meaning=VISIT_MEANING)
    send(t, c.WithdrawParticipant(pid, {"withdrawn_on": REGISTERED + timedelta(days=3),
                                        "scope": "study", "reason_code": "moved"}))
    _sign(t, pid, c.SignCasebook, meaning=CASEBOOK_MEANING)
    TrialProjection(t).catch_up()
    return {"pid": pid, "on_visit": on_visit, "on_item": on_item}


def _query_steps(root, query_ref: str) -> list[etree._Element]:
    """The annotations of one query, in document order."""
    return [flag.getparent() for flag in root.iterfind(".//odm:Flag", NS)
            if flag.findtext("odm:FlagType", namespaces=NS) == "QUERY_ID"
            and flag.findtext("odm:FlagValue", namespaces=NS) == query_ref]


def _flags(annotation) -> dict[str, str]:
    return {f.findtext("odm:FlagType", namespaces=NS): f.findtext("odm:FlagValue",
                                                                  namespaces=NS)
            for f in annotation.iterfind("odm:Flag", NS)}


def _signature_def(root, signature) -> etree._Element:
    oid = signature.find("odm:SignatureRef", NS).get("SignatureOID")
    return root.find(f"odm:AdminData/odm:SignatureDef[@OID='{oid}']", NS)


def test_the_odm_export_carries_queries_verification_and_signatures(isolated, odm_schema):
    ids = _managed_record(isolated)
    root = _export(isolated)
    assert odm_schema.validate(root), odm_schema.error_log
    assert _referenced(root, "UserRef", "UserOID") == _defined(root, "User")
    assert _referenced(root, "SignatureRef", "SignatureOID") == _defined(root, "SignatureDef")
    assert (_referenced(root, "FlagValue", "CodeListOID")
            | _referenced(root, "FlagType", "CodeListOID")) <= _defined(root, "CodeList")
    subject = root.find(f"odm:ClinicalData/odm:SubjectData[@SubjectKey='{ids['pid']}']", NS)
    baseline = "odm:StudyEventData[@StudyEventOID='SE.BASELINE'][@TransactionType='Context']"

    # Each step of a query: an Annotation where it points, with its own AuditRecord.
    steps = _query_steps(root, ids["on_visit"])
    assert [(a.get("SeqNum"), _flags(a)["QUERY_STATUS"], a.findtext("odm:Comment", None, NS))
            for a in steps] == [("1", "open", "Worst pain 6: please check the diary"),
                                ("2", "answered", "Checked: the diary says 6"),
                                ("3", "closed", None)]
    assert [a.find("odm:Comment", NS).get("SponsorOrSite") for a in steps[:2]] == [
        "Sponsor", "Site"]
    assert all(a.getparent() in subject.findall(baseline, NS) for a in steps)
    assert [a.getparent().find("odm:AuditRecord/odm:UserRef", NS).get("UserOID")
            for a in steps] == ["USR.cra-1", "USR.site-coordinator", "USR.cra-1"]
    on_item = _query_steps(root, ids["on_item"])
    assert [(_flags(a)["QUERY_STATUS"], a.findtext("odm:Comment", None, NS))
            for a in on_item] == [("open", "Least pain 2?"), ("answered", "2 is right"),
                                  ("open", "the diary says 3"),
                                  ("cancelled", "raised by mistake")]
    assert on_item[2].getparent().findtext("odm:AuditRecord/odm:ReasonForChange",
                                           namespaces=NS) == "the diary says 3"
    item = on_item[0].getparent()
    assert (item.tag, item.get("ItemOID"), item.get("TransactionType")) == (
        f"{{{NS['odm']}}}ItemData", "I.VISIT.bpi_sf.least", "Context")
    assert item.getparent().getparent().get("FormOID") == "F.VISIT"

    # Source verification: an SDV flag on the visit.
    sdv = [a for a in subject.iterfind(f"{baseline}/odm:Annotation", NS) if "SDV" in _flags(a)]
    assert [_flags(a)["SDV"] for a in sdv] == ["verified"]

    # The visit's signature on its study event, the casebook's on the subject.
    visit_signature = subject.find(f"{baseline}/odm:Signature", NS)
    assert visit_signature.find("odm:UserRef", NS).get("UserOID") == "USR.dr-okafor"
    assert visit_signature.find("odm:LocationRef", NS).get("LocationOID") == "LOC.CASE"
    assert datetime.fromisoformat(visit_signature.findtext("odm:DateTimeStamp",
                                                           namespaces=NS)).tzinfo
    definition = _signature_def(root, visit_signature)
    assert definition.get("Methodology") == "Electronic"
    assert definition.findtext("odm:Meaning", namespaces=NS) == VISIT_MEANING
    assert definition.findtext("odm:LegalReason", namespaces=NS)
    casebook = root.findall(f"odm:ClinicalData/odm:SubjectData[@SubjectKey='{ids['pid']}']"
                            "[@TransactionType='Context']", NS)
    assert [s.get("TransactionType") for s in casebook] == ["Context"]
    casebook_signature = casebook[0].find("odm:Signature", NS)
    assert casebook_signature.find("odm:UserRef", NS).get("UserOID") == "USR.dr-okafor"
    assert _signature_def(root, casebook_signature).findtext(
        "odm:Meaning", namespaces=NS) == CASEBOOK_MEANING
    signer = root.find("odm:AdminData/odm:User[@OID='USR.dr-okafor']", NS)
    assert signer.findtext("odm:LoginName", namespaces=NS) == "dr-okafor"
    assert signer.findtext("odm:FullName", namespaces=NS) == "Adaeze Okafor"
    assert root.find("odm:AdminData/odm:User[@OID='USR.cra-1']/odm:FullName", NS) is None


def test_a_character_no_xml_may_hold_is_written_as_a_replacement_character(isolated,
                                                                          odm_schema):
    """A query's text holding U+FFFF (taken before the commands refused it) made the ODM
    export malformed XML, served with 200 and written by the CLI with exit code 0."""
    t = isolated
    pid, query = enrol(t), str(uuid.uuid4())
    send(t, c.RaiseQuery(pid, {"query_id": query, "text": "odd \uffff\ufffe\x01 text",
                               "visit": "baseline"}), actor="monitor")
    root = _export(t)
    assert odm_schema.validate(root), odm_schema.error_log
    [raised] = _query_steps(root, query)
    assert raised.findtext("odm:Comment", None, NS) == "odd \ufffd\ufffd\ufffd text"


def test_carriage_returns_in_the_odm_export_s_texts_are_kept(isolated, odm_schema):
    """A reader of XML turns a raw carriage return in an element's text into a line feed:
    a query's text and a correction's reason written with CRLF or a lone CR were read
    back otherwise than recorded (attributes kept theirs, as character references)."""
    pid = enrol(isolated)
    send(isolated, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": REGISTERED,
                                         "bpi_sf": {"worst": 6}}))
    query, text, reason = str(uuid.uuid4()), "line1\r\nline2\rend", "the diary\r\nsays 5\r"
    send(isolated, c.RaiseQuery(pid, {"query_id": query, "visit": "baseline", "text": text}))
    visit = next(e for e, _ in isolated.service.get_participant(pid).records_of(
        "VisitCompleted"))
    send(isolated, c.CorrectData(pid, {"event_id": visit, "field": "bpi_sf.worst",
                                       "value": 5}), reason=reason)
    root = _export(isolated)
    assert odm_schema.validate(root), odm_schema.error_log
    assert [a.findtext("odm:Comment", None, NS) for a in _query_steps(root, query)] == [text]
    assert reason in [e.text for e in root.iterfind(".//odm:ReasonForChange", NS)]


def test_the_deidentified_odm_export_keeps_signatures_but_not_query_texts(isolated,
                                                                          odm_schema):
    ids = _managed_record(isolated)
    plain, masked = _export(isolated), _export(isolated, deidentify=True)
    assert odm_schema.validate(masked), odm_schema.error_log
    text = etree.tostring(masked, encoding="unicode")
    for secret in (ids["pid"], ids["on_visit"], ids["on_item"], "Worst pain", "Least pain",
                   "is right", "by mistake", "the diary says"):
        assert secret not in text
    assert plain.find(".//odm:Annotation/odm:Comment", NS) is not None
    assert masked.find(".//odm:Annotation/odm:Comment", NS) is None  # free text
    queries = {_flags(a)["QUERY_ID"] for a in masked.iterfind(".//odm:Annotation", NS)
               if "QUERY_ID" in _flags(a)}
    assert len(queries) == 2 and all(q.startswith("Q-") for q in queries)
    # Staff are not participants: the signer's printed name stays; the times move back.
    assert masked.findtext(".//odm:User/odm:FullName", namespaces=NS) == "Adaeze Okafor"

    def stamps(root):
        return [datetime.fromisoformat(e.text)
                for e in root.iterfind(".//odm:Signature/odm:DateTimeStamp", NS)]
    shifts = {(a - b).days for a, b in zip(stamps(plain), stamps(masked), strict=True)}
    assert len(shifts) == 1 and 1 <= shifts.pop() <= 365


def test_a_correction_after_verification_and_signing_shows_in_both_exports(isolated,
                                                                          odm_schema):
    pid = enrol(isolated)
    send(isolated, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": REGISTERED,
                                         "bpi_sf": {"worst": 6, "least": 2, "average": 4,
                                                    "now": 3}}))
    send(isolated, c.VerifySource(pid, {"visit": "baseline"}), actor="cra-1")
    _sign(isolated, pid, c.SignVisit, visit="baseline", meaning=VISIT_MEANING)
    send(isolated, c.CorrectData(pid, {"event_id": _visit_event(isolated, pid),
                                       "field": "bpi_sf.worst", "value": 7}),
         actor="data-manager", reason="transcription error")
    send(isolated, c.LockVisit(pid, {"visit": "baseline"}), actor="data-manager")
    TrialProjection(isolated).catch_up()

    root = _export(isolated)
    assert odm_schema.validate(root), odm_schema.error_log
    notes = list(root.iterfind(
        ".//odm:StudyEventData[@StudyEventOID='SE.BASELINE']/odm:Annotation", NS))
    assert [_flags(a) for a in notes] == [
        {"SDV": "verified"}, {"SDV": "changed_since_verified"},
        {"SIGNATURE_STATUS": "invalidated"}, {"LOCK": "locked"}]
    invalidated = notes[2]
    assert invalidated.findtext("odm:Comment", namespaces=NS) == "corrected"
    reason = invalidated.getparent().findtext("odm:AuditRecord/odm:ReasonForChange",
                                              namespaces=NS)
    assert reason == "transcription error"

    rows = {row["visit"]: row for row in _csv(isolated) if row["participant_id"] == pid}
    assert (rows["baseline"]["sdv"], rows["baseline"]["signed"]) == (
        "changed_since_verified", "false")


def _updates(root, pid: str) -> dict[str, str | None]:
    """The last Update of each item in one subject's data: its value, or None for null."""
    subject = next(s for s in root.iterfind(".//odm:SubjectData", NS)
                   if s.get("SubjectKey") == pid)
    return {item.get("ItemOID"): None if item.get("IsNull") == "Yes" else item.get("Value")
            for item in subject.iterfind(".//odm:ItemData[@TransactionType='Update']", NS)}


def test_a_whole_group_corrected_updates_every_item_under_it(isolated, odm_schema):
    """null for a group (the whole bpi_sf), or a group given again with fewer answers,
    reads in the ODM as in the record: each item under it updated, null where the new
    value leaves it out, and no item for the group itself (it has no ItemDef)."""
    pid = enrol(isolated)
    send(isolated, c.CompleteVisit(pid, {
        "visit": "baseline", "completed_on": REGISTERED,
        "bpi_sf": {"worst": 6, "least": 2, "average": 4, "now": 3},
        "fact_es": {f"GP{i}": 1 for i in range(1, 8)}}))
    visit = _visit_event(isolated, pid)
    for field, value in (("bpi_sf", None), ("fact_es", {"GP1": 3})):
        send(isolated, c.CorrectData(pid, {"event_id": visit, "field": field, "value": value}),
             actor="data-manager", reason="taken back")

    root = _export(isolated)
    assert odm_schema.validate(root), odm_schema.error_log
    assert _referenced(root, "ItemData", "ItemOID") <= _defined(root, "ItemDef")
    updates = _updates(root, pid)
    assert all(updates[f"I.VISIT.bpi_sf.{item}"] is None
               for item in ("worst", "least", "average", "now"))
    assert updates["I.VISIT.fact_es.GP1"] == "3"
    assert all(updates[f"I.VISIT.fact_es.GP{i}"] is None for i in range(2, 8))


def test_a_correction_inserts_an_item_the_form_never_held_and_updates_one_it_held(
        isolated, odm_schema):
    """ODM's Update is for an item the file already holds (a null is a value it holds): an
    answer left out at first and given by a correction is an Insert, and a null for an
    item never held says nothing."""
    pid = enrol(isolated)
    send(isolated, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": REGISTERED,
                                         "bpi_sf": {"worst": 6}}))
    visit = _visit_event(isolated, pid)
    for field, value in (("bpi_sf.least", 2), ("bpi_sf", {"worst": 5}), ("bpi_sf.least", 3)):
        send(isolated, c.CorrectData(pid, {"event_id": visit, "field": field, "value": value}),
             actor="data-manager", reason="from the source document")

    root = _export(isolated)
    assert odm_schema.validate(root), odm_schema.error_log
    subject = next(s for s in root.iterfind(".//odm:SubjectData", NS)
                   if s.get("SubjectKey") == pid)
    steps = [(item.get("ItemOID"), item.get("TransactionType"),
              "null" if item.get("IsNull") == "Yes" else item.get("Value"))
             for item in subject.iterfind(".//odm:ItemData", NS)
             if item.get("ItemOID").startswith("I.VISIT.bpi_sf.")]
    assert steps == [("I.VISIT.bpi_sf.worst", "Insert", "6"),
                     ("I.VISIT.bpi_sf.least", "Insert", "2"),
                     ("I.VISIT.bpi_sf.least", "Update", "null"),
                     ("I.VISIT.bpi_sf.worst", "Update", "5"),
                     ("I.VISIT.bpi_sf.least", "Update", "3")]  # set to null, still held


def test_a_blood_sample_moved_to_another_visit_changes_both_in_the_odm(isolated, odm_schema):
    """As the participant's state: both visits changed since verification."""
    pid = enrol(isolated)
    send(isolated, c.RecordBloodSample(pid, {"timepoint": "baseline",
                                             "collected_at": datetime(2026, 3, 4, 8, 30)}))
    for code, day in (("baseline", 0), ("week6", 42)):
        send(isolated, c.CompleteVisit(pid, {"visit": code,
                                             "completed_on": REGISTERED + timedelta(day)}))
        send(isolated, c.VerifySource(pid, {"visit": code}), actor="cra-1")
    sample = next(e for e, _ in isolated.service.get_participant(pid)
                  .records_of("BloodSampleCollected"))
    send(isolated, c.CorrectData(pid, {"event_id": sample, "field": "timepoint",
                                       "value": "week6"}), actor="dm", reason="wrong visit")

    participant = isolated.service.get_participant(pid)
    assert {code: participant.sdv_status(code) for code in ("baseline", "week6")} == {
        "baseline": "changed_since_verified", "week6": "changed_since_verified"}
    root = _export(isolated)
    assert odm_schema.validate(root), odm_schema.error_log
    for oid in ("SE.BASELINE", "SE.WEEK6"):
        notes = [_flags(a) for a in root.iterfind(
            f".//odm:StudyEventData[@StudyEventOID='{oid}']/odm:Annotation", NS)]
        assert notes[-1] == {"SDV": "changed_since_verified"}, (oid, notes)
    subject = root.find(f".//odm:SubjectData[@SubjectKey='{pid}']", NS)
    assert [(event.get("StudyEventOID"), form.get("TransactionType"))
            for event in subject.iterfind("odm:StudyEventData", NS)
            for form in event.iterfind("odm:FormData[@FormOID='F.BLOOD']", NS)] == [
        ("SE.BASELINE", "Insert"), ("SE.BASELINE", "Remove"), ("SE.WEEK6", "Insert")]


def test_a_new_sample_of_a_verified_visit_changes_it_in_the_state_and_both_exports(
        isolated, odm_schema):
    """New data of a verified visit is data no one has verified: as a correction of it,
    and as a signature sees it ("new data")."""
    pid = enrol(isolated)
    send(isolated, c.CompleteVisit(pid, {"visit": "baseline", "completed_on": REGISTERED}))
    send(isolated, c.VerifySource(pid, {"visit": "baseline"}), actor="cra-1")
    send(isolated, c.RecordBloodSample(pid, {"timepoint": "baseline",
                                             "collected_at": datetime(2026, 3, 4, 8, 30),
                                             "results": {"crp_mg_l": 99.0}}))
    TrialProjection(isolated).catch_up()

    assert isolated.service.get_participant(pid).sdv_status("baseline") == \
        "changed_since_verified"
    root = _export(isolated)
    assert odm_schema.validate(root), odm_schema.error_log
    notes = [_flags(a) for a in root.iterfind(
        ".//odm:StudyEventData[@StudyEventOID='SE.BASELINE']/odm:Annotation", NS)]
    assert notes == [{"SDV": "verified"}, {"SDV": "changed_since_verified"}]
    rows = {row["visit"]: row for row in _csv(isolated) if row["participant_id"] == pid}
    assert rows["baseline"]["sdv"] == "changed_since_verified"


def _csv(t, deidentify=False) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO("".join(exports.document(t, "csv", deidentify)))))


@pytest.mark.parametrize("deidentify", [False, True])
def test_the_csv_ends_with_each_visits_verification_and_signature(isolated, deidentify):
    _managed_record(isolated)
    header = "".join(exports.document(isolated, "csv")).splitlines()[0].split(",")
    assert header == list(exports.CSV_COLUMNS) and header[-2:] == ["sdv", "signed"]
    rows = _csv(isolated, deidentify)
    assert {(r["visit"], r["sdv"], r["signed"]) for r in rows if r["visit"] == "baseline"} == {
        ("baseline", "verified", "true")}
    assert {(r["sdv"], r["signed"]) for r in rows if r["visit"] != "baseline"} == {
        ("not_verified", "false")}


def test_the_odm_updates_the_screening_outcome_a_correction_changed(isolated, odm_schema):
    """Stage typed IV, corrected to II: the SCREENING form said `eligible` false and
    named `stage` for good."""
    pid = new_participant_id()
    send(isolated, c.ScreenParticipant(pid, screening(stage="IV")))
    screened = isolated.service.get_participant(pid).screening_event
    send(isolated, c.CorrectData(pid, {"event_id": screened, "field": "eligibility.stage",
                                       "value": "II"}),
         actor="data-manager", reason="transcription error")
    root = _export(isolated)
    assert odm_schema.validate(root), odm_schema.error_log
    subject = root.find(f".//odm:SubjectData[@SubjectKey='{pid}']", NS)
    updates = {item.get("ItemOID"): item.get("Value") for item in subject.iterfind(
        ".//odm:FormData[@FormOID='F.SCREENING']//odm:ItemData[@TransactionType='Update']",
        NS)}
    assert updates["I.SCREENING.eligible"] == "true"
    assert updates["I.SCREENING.failed_criteria"] == "[]"


def test_the_odm_updates_the_screening_outcome_a_correction_changed_after_consent(
        isolated, odm_schema):
    """After a consent no event records the outcome again (the state evaluates it): a
    randomized participant found ineligible by a correction kept `eligible` true in the
    ODM export while its state said false, failing `zubrod`."""
    pid = enrol(isolated)
    screened = isolated.service.get_participant(pid).screening_event
    send(isolated, c.CorrectData(pid, {"event_id": screened, "field": "eligibility.zubrod",
                                       "value": 3}),
         actor="data-manager", reason="transcription error")
    assert isolated.service.get_participant(pid).eligibility_now(isolated.protocol) == (
        False, ["zubrod"])
    root = _export(isolated)
    assert odm_schema.validate(root), odm_schema.error_log
    subject = root.find(f".//odm:SubjectData[@SubjectKey='{pid}']", NS)
    updates = [(item.get("ItemOID"), item.get("Value"),
                item.find("odm:AuditRecord/odm:ReasonForChange", NS).text)
               for item in subject.iterfind(".//odm:FormData[@FormOID='F.SCREENING']"
                                            "//odm:ItemData[@TransactionType='Update']", NS)]
    assert updates == [("I.SCREENING.eligibility.zubrod", "3", "transcription error"),
                       ("I.SCREENING.eligible", "false", "transcription error"),
                       ("I.SCREENING.failed_criteria", '["zubrod"]', "transcription error")]


def test_the_odm_carries_a_visit_moved_to_its_right_code(isolated, odm_schema):
    """Week 6's data keyed as follow_up, then corrected: the form is removed from the
    follow-up and inserted in week 6 with its data (it stayed in the follow-up, its
    `visit` item updated, completing the study), and it no longer completes the study."""
    pid = enrol(isolated)
    send(isolated, c.CompleteVisit(pid, {"visit": "follow_up",
                                         "completed_on": REGISTERED + timedelta(days=42)}))
    keyed = isolated.service.get_participant(pid).completed_visits()["follow_up"]["event_id"]
    send(isolated, c.CorrectData(pid, {"event_id": keyed, "field": "visit", "value": "week6"}),
         actor="data-manager", reason="keyed under the wrong visit")
    participant = isolated.service.get_participant(pid)
    assert (participant.status, list(participant.completed_visits())) == ("randomized",
                                                                         ["week6"])
    root = _export(isolated)
    assert odm_schema.validate(root), odm_schema.error_log
    subject = root.find(f".//odm:SubjectData[@SubjectKey='{pid}']", NS)
    steps = [(event.get("StudyEventOID"), form.get("TransactionType"))
             for event in subject.iterfind("odm:StudyEventData", NS)
             for form in event.iterfind("odm:FormData[@FormOID='F.VISIT']", NS)]
    assert steps == [("SE.FOLLOW_UP", "Insert"), ("SE.FOLLOW_UP", "Remove"),
                     ("SE.WEEK6", "Insert"), ("SE.WEEK6", "Context")]
    inserted = subject.findall(".//odm:StudyEventData[@StudyEventOID='SE.WEEK6']/odm:FormData"
                               "[@TransactionType='Insert']//odm:ItemData", NS)
    values = {item.get("ItemOID"): item.get("Value") for item in inserted}
    assert values["I.VISIT.visit"] == "week6"
    assert values["I.VISIT.completed_on"] == (REGISTERED + timedelta(days=42)).isoformat()
    completion = subject.find(".//odm:ItemData[@ItemOID='I.VISIT.completes_study']"
                              "[@TransactionType='Update']", NS)
    assert completion.get("Value") == "false"  # the study is not completed by week 6


def test_a_query_s_later_steps_follow_its_form_to_the_visit_it_was_moved_to(isolated,
                                                                            odm_schema):
    """A query on an item of week 6's form, the form then moved to the end of treatment:
    the reply was written on the form removed from week 6, where a system applying the
    file finds nothing."""
    pid = enrol(isolated)
    send(isolated, c.CompleteVisit(pid, {"visit": "week6", "bpi_sf": {"worst": 5},
                                         "completed_on": REGISTERED + timedelta(days=42)}))
    keyed = isolated.service.get_participant(pid).completed_visits()["week6"]["event_id"]
    query = str(uuid.uuid4())
    send(isolated, c.RaiseQuery(pid, {"query_id": query, "event_id": keyed,
                                      "field": "bpi_sf.worst", "text": "5?"}), actor="cra-1")
    send(isolated, c.CorrectData(pid, {"event_id": keyed, "field": "visit",
                                       "value": "end_of_treatment"}),
         actor="dm", reason="keyed under the wrong visit")
    send(isolated, c.RespondToQuery(pid, {"query_id": query, "text": "5 is right"}),
         actor="site-1")
    root = _export(isolated)
    assert odm_schema.validate(root), odm_schema.error_log
    subject = root.find(f".//odm:SubjectData[@SubjectKey='{pid}']", NS)
    places = [event.get("StudyEventOID") for event in subject.iterfind("odm:StudyEventData", NS)
              if event.find(".//odm:Annotation", NS) is not None
              and any(_flags(a).get("QUERY_STATUS") for a in event.iterfind(
                  ".//odm:Annotation", NS))]
    assert places == ["SE.WEEK6", "SE.END_OF_TREATMENT"]  # raised there, answered here


def test_an_unreadable_event_stops_neither_the_odm_export_nor_its_subject(isolated,
                                                                         odm_schema):
    """One damaged row made the whole export fail, every participant's with it."""
    from tests.integration.test_quarantine import _flip_state

    damaged, whole, first_lost = enrol(isolated), enrol(isolated), enrol(isolated)
    _flip_state(isolated, damaged, 2)  # its consent
    _flip_state(isolated, first_lost, 1)  # its screening: whose, at which site?

    root = _export(isolated)
    assert odm_schema.validate(root), odm_schema.error_log
    subjects = {s.get("SubjectKey"): s for s in root.iterfind(".//odm:SubjectData", NS)}
    assert {damaged, whole} <= subjects.keys() and first_lost not in subjects
    left_out = [c.text for c in root.find("odm:ClinicalData", NS)
                if isinstance(c, etree._Comment)]
    assert left_out == [(" a subject whose screening can't be read from the store is left "
                         "out: trialog audit verify names it ")]
    said = [c.text for c in subjects[damaged] if isinstance(c, etree._Comment)]
    assert said == [(" event 2 of this subject can't be read from the store: trialog audit "
                     "verify names the fault ")]
    events = {e.get("StudyEventOID") for e in subjects[damaged].iterfind(
        "odm:StudyEventData", NS)}
    assert events == {e.get("StudyEventOID") for e in subjects[whole].iterfind(
        "odm:StudyEventData", NS)}  # its screening and randomization, as recorded
