"""Each stored event's topic is sealed in its encrypted state and checked on every read."""

from __future__ import annotations

from uuid import uuid4

import pytest
from eventsourcing.cryptography import AESCipher
from eventsourcing.persistence import Mapper, StoredEvent
from eventsourcing.utils import Environment

from domain.chain import ChainedAggregate
from domain.sealing import MARK, SealingMapper, TopicAltered, seal, unseal
from domain.service import TrialService
from tests.factories import protocol


class Thing(ChainedAggregate):
    class Noted(ChainedAggregate.Event):
        note: str

    class Dropped(ChainedAggregate.Event):
        note: str


def service(env: dict[str, str] | None = None) -> TrialService:
    return TrialService(protocol(), b"unit-seed", env)


def mappers() -> tuple[SealingMapper, Mapper]:
    key = AESCipher.create_key(16)
    transcoder = service().mapper.transcoder
    cipher = AESCipher(Environment(env={"CIPHER_KEY": key}))
    return SealingMapper(transcoder, cipher=cipher), Mapper(transcoder, cipher=cipher)


def noted() -> Thing.Noted:
    return Thing.Noted(originator_id=uuid4(), originator_version=2,
                       timestamp=Thing.Event.create_timestamp(), note="seen on 2026-03-02",
                       command_id="c-1", actor="someone")


def test_a_sealed_event_reads_back_as_it_was() -> None:
    sealing, _ = mappers()
    event = noted()
    stored = sealing.to_stored_event(event)
    assert unseal(sealing.cipher.decrypt(stored.state))[0] == stored.topic
    assert vars(sealing.to_domain_event(stored)) == vars(event)


def test_a_relabelled_row_is_refused_naming_both_topics() -> None:
    sealing, _ = mappers()
    stored = sealing.to_stored_event(noted())
    relabelled = StoredEvent(stored.originator_id, stored.originator_version,
                             stored.topic.replace("Noted", "Dropped"), stored.state)
    with pytest.raises(TopicAltered) as refused:
        sealing.to_domain_event(relabelled)
    assert (refused.value.stored, refused.value.sealed) == (relabelled.topic, stored.topic)


def test_a_row_written_without_a_seal_reads_as_before() -> None:
    sealing, library = mappers()
    event = noted()
    assert vars(sealing.to_domain_event(library.to_stored_event(event))) == vars(event)


def test_without_a_cipher_nothing_is_sealed() -> None:
    transcoder = service().mapper.transcoder
    event = noted()
    stored = SealingMapper(transcoder).to_stored_event(event)
    assert stored.state == Mapper(transcoder).to_stored_event(event).state


def test_the_seal_never_starts_a_state_the_library_writes() -> None:
    # The transcoder writes a JSON object, a compressor its own header: neither begins
    # with the mark, so rows from before the seal are told apart by their first byte.
    assert unseal(b'{"a":1}') == (None, b'{"a":1}')
    assert unseal(seal("m:C.E", b"\x00x")) == ("m:C.E", b"\x00x")
    assert MARK not in b"{x\x9c"


def test_the_service_seals_what_it_stores() -> None:
    key = AESCipher.create_key(16)
    sealing = service({"CIPHER_TOPIC": "eventsourcing.cryptography:AESCipher",
                       "CIPHER_KEY": key, "IS_SNAPSHOTTING_ENABLED": "y"})
    assert isinstance(sealing.mapper, SealingMapper)
    assert isinstance(sealing.snapshots.mapper, SealingMapper)
