"""Randomization: 1:1 permuted blocks of randomly chosen size, stratified by site.

The sequence of each stratum is derived from a secret seed, so it is reproducible by whoever
holds the seed and concealed from everyone else; a position is drawn only when a participant
is randomized, and the draw is recorded in an event.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from uuid import NAMESPACE_URL, UUID, uuid5

from domain.chain import ChainedAggregate
from domain.commands import Audit
from domain.protocol import Randomization


@lru_cache(maxsize=4096)
def allocation_block(
    seed: bytes, stratum: str, block: int, randomization: Randomization
) -> tuple[str, ...]:
    """The arms of one block: its size is drawn from the protocol's block sizes, then the
    arms (in the protocol's ratio) are shuffled, both from a generator keyed by the seed."""
    key = hmac.new(seed, f"{stratum}\x00{block}".encode(), hashlib.sha256).digest()
    rng = random.Random(key)
    size = rng.choice(randomization.block_sizes)
    unit = sum(n for _, n in randomization.ratio)
    arms = [code for code, n in randomization.ratio for _ in range(n * size // unit)]
    rng.shuffle(arms)
    return tuple(arms)


def allocation_at(seed: bytes, stratum: str, index: int, randomization: Randomization) -> str:
    """The arm at 0-based position ``index`` of the stratum's sequence."""
    start, block = 0, 0
    while True:
        arms = allocation_block(seed, stratum, block, randomization)
        if index < start + len(arms):
            return arms[index - start]
        start += len(arms)
        block += 1


def sequence_id(study_id: str, stratum: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"trialog:{study_id}:allocation:{stratum}")


class AllocationSequence(ChainedAggregate):
    """The position reached in one stratum's allocation sequence."""

    class SequenceOpened(ChainedAggregate.Created):
        study_id: str
        stratum: str

        def apply(self, aggregate: Any) -> None:
            aggregate.study_id = self.study_id
            aggregate.stratum = self.stratum
            aggregate.drawn = 0

    class AllocationDrawn(ChainedAggregate.Event):
        index: int
        participant_id: str
        arm: str

        def apply(self, aggregate: Any) -> None:
            aggregate.drawn = self.index + 1

    if TYPE_CHECKING:  # set by the events
        study_id: str
        stratum: str
        drawn: int

    @classmethod
    def open(cls, study_id: str, stratum: str, audit: Audit) -> AllocationSequence:
        return cls._create(
            cls.SequenceOpened, id=sequence_id(study_id, stratum), study_id=study_id,
            stratum=stratum, **audit.event_fields(),
        )

    def draw(
        self, participant_id: str, seed: bytes, randomization: Randomization, audit: Audit
    ) -> tuple[int, str]:
        index = self.drawn
        arm = allocation_at(seed, self.stratum, index, randomization)
        self.trigger_event(
            self.AllocationDrawn, index=index, participant_id=participant_id, arm=arm,
            **audit.event_fields(),
        )
        return index, arm
