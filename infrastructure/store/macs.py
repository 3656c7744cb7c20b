"""Keyed MACs of the rows kept beside the store (rm_feed's, the access tables'): BLAKE2b
in its keyed mode, one hasher keyed once per kind of text under its own personalisation,
each MAC a copy of it fed the text (a third of the time of keying each)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

SEAL = 16  # bytes of each MAC


class KeyedMacs:
    def __init__(self, key: bytes, person: bytes, kinds: Iterable[bytes]) -> None:
        self._keyed = {kind: hashlib.blake2b(key=key, digest_size=SEAL,
                                             person=person + kind) for kind in kinds}

    def mac(self, kind: bytes, message: bytes) -> bytes:
        mac = self._keyed[kind].copy()
        mac.update(message)
        return mac.digest()


def same_seal(seal: bytes | memoryview | None, expected: bytes) -> bool:
    """Whether a stored seal is the one expected (none is none), in constant time."""
    return seal is not None and hmac.compare_digest(bytes(seal), expected)
