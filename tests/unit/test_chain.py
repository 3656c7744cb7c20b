"""The canonical text digests and fingerprints are taken over: json's, byte for byte, however
it is written (recorded digests and fingerprints must keep matching)."""

from __future__ import annotations

import enum
import json
import sys
import threading
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.chain import LEAVES, _scalar, canonical_bytes, canonical_json
from infrastructure.store.bus import _FINGERPRINTED, _plain


def reference(content: Any, default: Any = _scalar) -> bytes:
    return json.dumps(content, sort_keys=True, separators=(",", ":"),
                      default=default).encode()


class Colour(enum.Enum):
    RED = "red"


class Level(str, enum.Enum):
    HIGH = "high"


_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(),
    st.text(alphabet=st.characters(max_codepoint=127)), st.dates(),
    st.datetimes(timezones=st.sampled_from([None, UTC, timezone(timedelta(hours=-5))])),
    st.uuids(), st.sampled_from([Colour.RED, Level.HIGH]))
_contents = st.dictionaries(
    st.text(), st.recursive(_leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=5), inner, max_size=4)), max_leaves=12),
    max_size=6)


@settings(max_examples=600, deadline=None)
@given(_contents)
def test_the_canonical_text_is_json_s_whatever_the_content(content: dict[str, Any]) -> None:
    try:
        expected = reference(content)
    except TypeError:  # what json refuses (an enum) stays refused
        with pytest.raises(TypeError):
            canonical_bytes(content)
        return
    assert canonical_bytes(content) == expected
    assert canonical_json(content) == expected.decode()


@settings(max_examples=400, deadline=None)
@given(_contents)
def test_a_fingerprint_s_text_is_json_s_and_refuses_what_it_refused(
        content: dict[str, Any]) -> None:
    try:
        expected = reference(content, _plain)
    except TypeError:  # a UUID, an enum
        with pytest.raises(TypeError):
            canonical_bytes(content, _plain, _FINGERPRINTED)
        return
    assert canonical_bytes(content, _plain, _FINGERPRINTED) == expected


@pytest.mark.parametrize("content", [
    {"dose": 1e-05}, {"dose": 1e16}, {"dose": 1.0}, {"dose": float("nan")},
    {"dose": float("-inf")}, {"dose": -0.0}, {"name": "Jos\u00e9"}, {"note": "\x7f"},
    {"emoji": "\U0001f600"}, {"n": 2**64}, {"n": -(2**63) - 1}, {"k": (1, "a")},
    {"b": "x", "a": {"d": date(2026, 3, 1), "c": datetime(2026, 3, 1, 9, 5, 7, 12, UTC)}},
    {"id": UUID("12345678-1234-5678-1234-567812345678"), "z": None, "t": True},
    {"level": Level.HIGH}, {"tab\t": "line\nfeed \"quoted\" back\\slash \x00"},
])
def test_the_contents_whose_json_text_differs_from_orjson_s(content: dict[str, Any]) -> None:
    """Each of these once differed between the two writers (or would, unguarded)."""
    assert canonical_bytes(content) == reference(content)


def test_the_leaves_are_the_types_the_canonical_text_knows() -> None:
    assert {str, int, bool, type(None), date, datetime, UUID} == LEAVES
    assert UUID not in _FINGERPRINTED


def test_content_past_the_walk_s_depth_is_json_s_to_write_or_refuse() -> None:
    circular: dict[str, Any] = {}
    circular["self"] = circular
    with pytest.raises(ValueError, match="Circular reference"):
        canonical_bytes(circular)
    # Nested near the recursion limit, and past it (where json refuses on Python 3.11, and
    # writes from 3.12, whose encoder has a limit of its own): canonical_bytes writes what
    # json writes and refuses what it refuses. In a thread of its own, whose stack beneath
    # is the same however the tests are run (a runner's frames would move the limit's edge).
    limit = sys.getrecursionlimit()
    outcomes: dict[int, tuple[Any, Any]] = {}

    def both(levels: int) -> None:
        deep = inner = {}
        for _ in range(levels):
            inner["a"] = {}
            inner = inner["a"]
        outcomes[levels] = (_text_or_refusal(reference, deep),
                            _text_or_refusal(canonical_bytes, deep))

    for levels in (limit - 100, limit + 100):
        thread = threading.Thread(target=both, args=(levels,))
        thread.start()
        thread.join()
    near, past = outcomes[limit - 100], outcomes[limit + 100]
    assert near[0] == near[1] and near[0].startswith(b'{"a":{"a":')
    assert past[0] == past[1]
    if sys.version_info < (3, 12):
        assert past[0] == "refused"


def _text_or_refusal(write: Any, content: Any) -> Any:
    try:
        return write(content)
    except RecursionError:
        return "refused"


