"""Each stored event's topic sealed inside its encrypted state.

The cipher authenticates a row's state, not the columns beside it. Each stream's first
digest covers its id and the chain links cover the versions, but a topic edited in the
`topic` column would have a row decoded as another kind of event with nothing to say so
short of recomputing its digest. So the topic is also written at the start of the
plaintext the cipher seals: ``MARK``, the topic, ``MARK``, then the state as the library
writes it (compressed when it compresses). A row whose sealed topic is not its column's
is refused wherever it is decoded, and reported by the audit check.

Rows written before this was done hold no seal (their plaintext starts with the
transcoder's ``{`` or a compressor's header, never with ``MARK``): they are read as they
are, and only the deep check, which recomputes each digest over the topic, covers theirs.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.persistence import Mapper, MapperDeserialisationError, StoredEvent

MARK = b"\x00"


class TopicAltered(MapperDeserialisationError):
    """A row's topic column is not the topic sealed in its state."""

    def __init__(self, stored: str, sealed: str) -> None:
        super().__init__(f"the topic column says {stored!r}; the sealed state says "
                         f"{sealed!r}")
        self.stored = stored
        self.sealed = sealed


def seal(topic: str, plain: bytes) -> bytes:
    return MARK + topic.encode() + MARK + plain


def unseal(plain: bytes) -> tuple[str | None, bytes]:
    """The topic sealed in a decrypted state (None when the row holds none), and the state
    without it."""
    if plain[:1] != MARK:
        return None, plain
    end = plain.index(MARK, 1)
    return plain[1:end].decode(), plain[end + 1:]


def check_topic(column: str, sealed: str | None) -> None:
    if sealed is not None and sealed != column:
        raise TopicAltered(column, sealed)


class SealingMapper(Mapper[UUID]):
    """The library's mapper, sealing each event's topic with its state when the store
    encrypts (without a cipher the seal would prove nothing). The library's own steps run
    in a mapper of the same transcoder and compressor without the cipher, so that this one
    is never changed and can be shared by threads."""

    def __init__(self, transcoder: Any, compressor: Any = None, cipher: Any = None) -> None:
        super().__init__(transcoder, compressor=compressor, cipher=cipher)
        self.unsealed: Mapper[UUID] = Mapper(transcoder, compressor=compressor)

    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        if not self.cipher:
            return super().to_stored_event(domain_event)
        stored = self.unsealed.to_stored_event(domain_event)
        return StoredEvent(stored.originator_id, stored.originator_version, stored.topic,
                           self.cipher.encrypt(seal(stored.topic, stored.state)))

    def to_domain_event(self, stored_event: StoredEvent) -> Any:
        if not self.cipher:
            return super().to_domain_event(stored_event)
        try:
            topic, plain = unseal(self.cipher.decrypt(stored_event.state))
        except Exception as error:
            raise MapperDeserialisationError(
                f"Failed to decrypt the state of stored event {stored_event.originator_id} "
                f"v{stored_event.originator_version}: {error}") from error
        check_topic(stored_event.topic, topic)
        return self.unsealed.to_domain_event(StoredEvent(
            stored_event.originator_id, stored_event.originator_version, stored_event.topic,
            plain))
