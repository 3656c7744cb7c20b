from collections import Counter

from domain.participant import Participant
from domain.randomization import AllocationSequence, allocation_at, allocation_block
from tests.factories import audit, consent, protocol, screening

PROTOCOL = protocol()
R = PROTOCOL.randomization


def blocks(seed: bytes, stratum: str, n: int) -> list[tuple[str, ...]]:
    return [allocation_block(seed, stratum, k, R) for k in range(n)]


def test_every_block_is_balanced_one_to_one_with_a_size_from_the_protocol():
    for block in blocks(b"seed", "CASE", 500):
        assert len(block) in R.block_sizes
        counts = Counter(block)
        assert counts["b12"] == counts["control"] == len(block) // 2


def test_block_sizes_vary():
    sizes = Counter(len(b) for b in blocks(b"seed", "CASE", 300))
    assert set(sizes) == set(R.block_sizes)


def test_the_sequence_is_the_concatenation_of_its_blocks():
    flat = [arm for block in blocks(b"seed", "METRO", 20) for arm in block]
    assert [allocation_at(b"seed", "METRO", i, R) for i in range(len(flat))] == flat


def test_strata_have_independent_sequences():
    case = [allocation_at(b"seed", "CASE", i, R) for i in range(200)]
    metro = [allocation_at(b"seed", "METRO", i, R) for i in range(200)]
    assert case != metro
    # Drawing in one stratum does not move the other.
    case_seq = AllocationSequence.open(PROTOCOL.study_id, "CASE", audit())
    metro_seq = AllocationSequence.open(PROTOCOL.study_id, "METRO", audit())
    drawn = []
    for i in range(30):
        metro_seq.draw(f"METRO-{i}", b"seed", R, audit())
        drawn.append(case_seq.draw(f"CASE-{i}", b"seed", R, audit())[1])
    assert drawn == case[:30]


def test_the_sequence_depends_on_the_secret_seed():
    one = [allocation_at(b"seed-one", "CASE", i, R) for i in range(100)]
    two = [allocation_at(b"seed-two", "CASE", i, R) for i in range(100)]
    assert one != two


def test_the_randomization_event_reveals_only_the_arm_and_the_draw_number():
    p = Participant.screen("CASE-1", screening(), PROTOCOL, audit())
    p.record_consent(consent(), audit())
    sequence = AllocationSequence.open(PROTOCOL.study_id, "CASE", audit())
    from datetime import date
    p.randomize({"registered_on": date(2026, 3, 4)}, sequence, b"secret", PROTOCOL, audit())
    event = p.collect_events()[-1]
    payload = {k for k in vars(event)} - {
        "originator_id", "originator_version", "timestamp", "command_id", "actor", "reason",
        "previous_digest", "digest"}
    assert payload == {"data", "arm", "allocation_index"}
    assert b"secret".hex() not in repr(vars(event))
