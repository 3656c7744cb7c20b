"""What a required text must hold: a character a reader sees."""

from __future__ import annotations

import pytest
from marshmallow import ValidationError

from infrastructure.store.schemas import NotBlank, says_something, text


@pytest.mark.parametrize("seen", [
    "a", " x ", ".", "1", "é", "e\u0301", "日本", "—", "\U0001fae8",  # an emoji newer than
    "\ue000",  # the interpreter's tables; a private-use glyph
    "\u0e01\u0e34", "\u0915\u094d\u0937", "\u05e9\u05dc\u05d5\u05dd", "\u2764\ufe0f",
])
def test_a_text_with_a_character_a_reader_sees_says_something(seen):
    assert says_something(seen)


@pytest.mark.parametrize("unseen", [
    "", "   ", "\t\n", "\u3000", "\u200b", "\u2060\u00ad", " \u3164 ", "\u115f\u1160",
    "\uffa0", "\u2800", "\u200e\u0301", "\u202e", "\ufe0f", "\x00\x7f",
    # unassigned, but reserved by Unicode to be shown as nothing, and noncharacters
    "\u2065", "\ufff0\ufff8", "\U000e0080", "\U000e0fff", "\ufdd0", "\uffff", "\U0010fffe",
])
def test_white_space_and_invisible_characters_alone_say_nothing(unseen):
    assert not says_something(unseen)


def test_a_text_past_its_length_is_not_read_through_for_something_seen():
    """marshmallow runs every validator even once the length's has failed: 8 MiB of
    zero-width spaces in a 100-character field was read character by character."""
    field = text(1, 100)
    huge = "\u200b" * 3_000_000
    with pytest.raises(ValidationError) as refused:
        field.deserialize(huge)
    assert refused.value.messages == ["Length must be between 1 and 100."]
    with pytest.raises(ValidationError, match="must not be blank"):
        NotBlank(100)("\u200b" * 100)
