"""Sites: outside a caller's scope a participant does not exist. The service's in-memory
event store (no I/O) shows each refusal is the one an unknown id gets."""

import pytest

from domain import commands as c
from domain.access import EVERY_SITE, Scope
from domain.errors import (
    ParticipantIdUnavailable,
    ParticipantNotFound,
    ProtocolError,
    SiteNotAllowed,
    ValidationFailed,
    VersionConflict,
)
from domain.protocol import protocol_from_mapping
from domain.service import TrialService
from tests.factories import audit, consent, protocol, protocol_data, screening

CASE, METRO = Scope.of(["CASE"]), Scope.of(["METRO"])


@pytest.fixture
def service():
    service = TrialService(protocol(), b"unit-seed")
    yield service
    service.close()


def refusal(service, command, scope, expected_version=None):
    with pytest.raises(Exception) as raised:
        service.decide(command, audit(), expected_version, scope)
    return type(raised.value), str(raised.value)


def test_a_participant_of_another_site_is_refused_exactly_as_an_unknown_one(service):
    service.execute(c.ScreenParticipant("CASE-0001", screening("CASE")), audit(), None, CASE)
    hidden = refusal(service, c.RecordConsent("CASE-0001", consent()), METRO)
    unknown = refusal(service, c.RecordConsent("CASE-0002", consent()), METRO)
    assert hidden[0] is unknown[0] is ParticipantNotFound
    assert hidden[1] == unknown[1].replace("CASE-0002", "CASE-0001")
    # The scope is checked before the version: a conflict would tell the version.
    assert refusal(service, c.RecordConsent("CASE-0001", consent()), METRO, 7)[0] \
        is ParticipantNotFound
    assert refusal(service, c.RecordConsent("CASE-0001", consent()), CASE, 7)[0] \
        is VersionConflict
    service.execute(c.RecordConsent("CASE-0001", consent()), audit(), None, CASE)
    service.execute(c.RecordConsent("CASE-0001", consent()), audit(), None, EVERY_SITE)


def test_screening_at_a_site_outside_the_scope_is_site_not_allowed(service):
    assert refusal(service, c.ScreenParticipant("CASE-0009", screening("CASE")), METRO) == (
        SiteNotAllowed, "site CASE is outside the caller's sites")
    # The same answer when the id exists: nothing depends on what is stored.
    service.execute(c.ScreenParticipant("CASE-0009", screening("CASE")), audit())
    assert refusal(service, c.ScreenParticipant("CASE-0009", screening("CASE")), METRO)[0] \
        is SiteNotAllowed


def test_an_id_must_carry_its_sites_prefix_whether_or_not_it_exists(service):
    service.execute(c.ScreenParticipant("CASE-0003", screening("CASE")), audit())
    taken = refusal(service, c.ScreenParticipant("CASE-0003", screening("METRO")), METRO)
    free = refusal(service, c.ScreenParticipant("CASE-0004", screening("METRO")), METRO)
    assert taken[0] is free[0] is ValidationFailed
    assert taken[1] == free[1] == "participant_id: must start with 'METRO-' at site METRO"
    unknown_site = refusal(service, c.ScreenParticipant("X-1", screening("NOPE")), METRO)
    assert unknown_site == (ValidationFailed, "data.site_id: must be one of: CASE, METRO")


def test_without_prefixes_a_taken_id_says_only_that_it_is_taken():
    data = protocol_data()
    for site in data["sites"]:
        site.pop("participant_prefix")
    service = TrialService(protocol_from_mapping(data), b"unit-seed")
    service.execute(c.ScreenParticipant("P-1", screening("CASE")), audit())
    assert refusal(service, c.ScreenParticipant("P-1", screening("METRO")), METRO) == (
        ParticipantIdUnavailable, "participant_id P-1 is already in use; choose another")
    service.close()


def test_prefixes_are_given_to_every_site_or_none_and_name_one_site():
    data = protocol_data()
    data["sites"][1].pop("participant_prefix")
    with pytest.raises(ProtocolError, match="every site a participant_prefix, or none"):
        protocol_from_mapping(data)
    data["sites"][1]["participant_prefix"] = "CASE-2"
    with pytest.raises(ProtocolError, match="'CASE-' starts 'CASE-2'"):
        protocol_from_mapping(data)


def test_a_scope_admits_its_sites_only():
    assert CASE.admits("CASE") and not CASE.admits("METRO")
    assert EVERY_SITE.admits("ANY") and EVERY_SITE.as_list() is None
    assert Scope.of(["METRO", "CASE"]).as_list() == ["CASE", "METRO"]
