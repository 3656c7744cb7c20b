"""The reminder's message as a mail client reads it: non-ASCII subject, sender name and
bodies survive, a line break in a subject never becomes a header of its own, and the bytes
written out directly read as the standard library's own build of the same message."""

from email import message_from_bytes, policy
from email.header import Header
from email.message import EmailMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest

from infrastructure.jobs.reminders import Email, Mailer

SPANISH = Email(("ana@example.org", "site@example.org"), "Recordatorio: visita de la "
                "semana 6 — ¡mañana!", "Hola Ana,\nsu visita es mañana.\n",
                "<p>Hola Ana, su visita es <b>mañana</b>.</p>\n")


def _read(message):
    raw = message if isinstance(message, bytes) else message.as_bytes()
    return message_from_bytes(raw, policy=policy.default)


def _as_read(read):
    """What a mail client shows of a message."""
    return {"from": str(read["From"]), "to": [a.addr_spec for a in read["To"].addresses],
            "subject": str(read["Subject"]),
            "text": read.get_body(("plain",)).get_content(),
            "html": read.get_body(("html",)).get_content(),
            "parts": [(p.get_content_type(), p.get_content_charset())
                      for p in read.iter_parts()]}


def test_non_ascii_text_survives_in_both_parts_and_the_headers():
    mailer = Mailer("smtp://127.0.0.1:1025", "Ensayo Vitamina B₁₂ <noreply@trialog.example>")
    read = _read(mailer.message(SPANISH))
    assert read["Subject"] == SPANISH.subject
    assert read["From"].addresses[0].display_name == "Ensayo Vitamina B₁₂"
    assert read["From"].addresses[0].addr_spec == "noreply@trialog.example"
    assert [a.addr_spec for a in read["To"].addresses] == list(SPANISH.to)
    assert read["Message-ID"].endswith("@trialog.example>") and read["Date"]
    assert read.get_body(("plain",)).get_content().strip() == SPANISH.text.strip()
    assert read.get_body(("html",)).get_content().strip() == SPANISH.html.strip()


def test_a_line_break_in_a_subject_injects_no_header():
    mailer = Mailer("smtp://127.0.0.1:1025", "noreply@trialog.example")
    email = Email(("ana@example.org",), "Reminder\r\nBcc: everyone@example.org", "t", "<p>t</p>")
    read = _read(mailer.message(email))
    assert read["Bcc"] is None and read["Subject"] == "Reminder Bcc: everyone@example.org"


def test_a_sender_on_two_lines_is_refused():
    with pytest.raises(ValueError, match="TRIALOG_MAIL_FROM"):
        Mailer("smtp://127.0.0.1:1025", "Trialog <a@b.example>\r\nBcc: everyone@example.org")


LONG = Email(("participant.with.a.long.address@mail.hospital-example.org",
              "coordinator.of.the.site@research.hospital-example.org"),
             "Reminder: your week 6 visit, with a subject long enough to be folded over "
             "more than one line of the header", "Dear participant,\n" + "text " * 60,
             "<p>" + "html &amp; more " * 40 + "</p>")


@pytest.mark.parametrize("email", [SPANISH, LONG], ids=["spanish", "long"])
def test_the_message_reads_as_the_standard_librarys_build_of_it(email):
    mailer = Mailer("smtp://127.0.0.1:1025", "Ensayo Vitamina B₁₂ <noreply@trialog.example>")
    written = mailer.message(email)
    built = MIMEMultipart("alternative")
    built["From"], built["To"] = mailer.from_header, ", ".join(email.to)
    built["Subject"] = Header(email.subject, "utf-8")
    built.attach(MIMEText(email.text, "plain", "utf-8"))
    built.attach(MIMEText(email.html, "html", "utf-8"))
    assert _as_read(_read(written)) == _as_read(_read(built))
    lines = written.split(b"\r\n")
    assert b"\n" not in b"".join(lines) and all(len(line) <= 78 for line in lines)
    assert _read(written).get_content_type() == "multipart/alternative"


def test_an_address_beyond_ascii_goes_as_an_email_message_for_smtputf8():
    mailer = Mailer("smtp://127.0.0.1:1025", "noreply@trialog.example")
    email = Email(("josé@ejemplo.es",), "Recordatorio", "Hola", "<p>Hola</p>")
    message = mailer.message(email)
    assert isinstance(message, EmailMessage) and message["To"] == "josé@ejemplo.es"


def test_a_long_subject_beyond_ascii_keeps_every_space_when_folded():
    mailer = Mailer("smtp://127.0.0.1:1025", "noreply@trialog.example")
    subject = ("Recordatorio: su visita período — extracción analítica de la semana 6, "
               "síntomas musculoesqueléticos y vitamina B₁₂ — ¡mañana!")
    email = Email(("ana@example.org",), subject, "Hola", "<p>Hola</p>")
    written = mailer.message(email)
    assert _read(written)["Subject"] == subject
    assert all(len(line) <= 78 for line in written.split(b"\r\n"))


def test_each_site_has_its_own_day_and_a_scan_spans_them():
    """A site west of UTC is still on the day before in the UTC day's first hours, one east
    of it on the next; a site the protocol doesn't list keeps UTC's; a day named by hand
    is that day everywhere."""
    from dataclasses import replace
    from datetime import UTC, date, datetime

    from infrastructure.jobs.reminders import Today
    from tests.factories import protocol

    trial = protocol()
    east = replace(trial.site("CASE"), id="TOKYO", time_zone="Asia/Tokyo")
    trial = replace(trial, sites=(*trial.sites, east))
    days = Today(trial, now=datetime(2026, 4, 7, 23, 30, tzinfo=UTC))
    assert (days.at("CASE"), days.at("TOKYO"), days.at("NOWHERE"), days.at(None)) == (
        date(2026, 4, 7), date(2026, 4, 8), date(2026, 4, 7), date(2026, 4, 7))
    assert days.span() == (date(2026, 4, 7), date(2026, 4, 8))
    early = Today(trial, now=datetime(2026, 4, 8, 2, tzinfo=UTC))  # 22:00 in New York
    assert early.span() == (date(2026, 4, 7), date(2026, 4, 8)) and early.at("CASE") == date(
        2026, 4, 7)
    assert Today(trial, day=date(2026, 1, 1)).at("TOKYO") == date(2026, 1, 1)
