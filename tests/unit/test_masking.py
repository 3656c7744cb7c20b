"""An address quoted in a free text is masked for readers without contact rights; a
clinical note with an '@' in it that is no address is shown as it was written."""

from __future__ import annotations

import pytest

from infrastructure.audit.history import holds_address, masked_text


@pytest.mark.parametrize("text, shown", [
    ("The source names jane.doe@example.org", "The source names j***@example.org"),
    ("write to j@x.org.", "write to j***@x.org."),
    ("y@mail.example.co.uk, x@localhost", "y***@mail.example.co.uk, x***@localhost"),
    ("z@[10.0.0.1] wrote", "*** wrote"),
    # What an email field takes: any script, "xn--" and hyphened last labels, odd local
    # parts (an address beyond ASCII is masked whole).
    ("maria.lopez@peñalara.es", "***"), ("ivan@почта.рф", "***"),
    ("jane@example.xn--p1ai", "j***@example.xn--p1ai"),
    ("jane@example.co-op", "j***@example.co-op"), ("o'brien@example.org", "o***@example.org"),
    ("jane}@example.org", "j***@example.org"), ('"j"@example.org', "***@example.org"),
    ("see jane@example.org-based", "see j***@example.org-based"),
    ("mailto:jane@example.org", "mailto:j***@example.org"),
    ("jane@ตัวอย่าง.ไทย", "***"), ("jane@می\u200cخواهم.ایران", "***"), ("jane@i❤.ws", "***"),
    ("jane@mu\u0308nchen.de", "***"), ('"jane@home"@example.org', "***@example.org"),
    ('he wrote "jane@example.org"', 'he wrote "j***@example.org"'),
])
def test_an_address_quoted_in_a_text_is_masked(text, shown):
    assert holds_address(text) and masked_text(text) == shown


@pytest.mark.parametrize("text", [
    "BP 120/80@10.30 taken, dose 1000mcg@day",  # 0031 wrote "BP 1***@10.30 ... 1***@day"
    "sample#12@-80C", "2 tabs@bedtime", "temp 37.2@08:15", "1 tab@b.i.d", "a@b.c",
    "BP 120/80@10.30am", "500mg@08.00hrs", "dose 5mg@0.5ml", "no address here",
])
def test_an_at_sign_that_is_no_address_is_left_as_written(text):
    assert not holds_address(text) and masked_text(text) == text


@pytest.mark.parametrize("address, taken", [
    ("jane@example.org", True), ("maria.lopez@peñalara.es", True), ("x@localhost", True),
    ("jane@host.42", False), ("jane@10.30am", False),
])
def test_a_participants_address_is_one_a_text_quoting_it_is_found_to_quote(address, taken):
    """The email field takes only those, so that a reason or a message quoting a
    participant's address always has it masked for readers without contact rights."""
    from marshmallow import ValidationError

    from infrastructure.store.schemas import maskable

    if taken:
        maskable(address)
    else:
        with pytest.raises(ValidationError):
            maskable(address)
