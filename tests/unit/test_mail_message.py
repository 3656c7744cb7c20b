"""The reminder's message as a mail client reads it: non-ASCII subject, sender name and
bodies survive, a line break in a subject never becomes a header of its own."""

from email import message_from_bytes, policy

from infrastructure.jobs.reminders import Email, Mailer


def _read(message):
    return message_from_bytes(message.as_bytes(), policy=policy.default)


def test_non_ascii_text_survives_in_both_parts_and_the_headers():
    mailer = Mailer("smtp://127.0.0.1:1025", "Ensayo Vitamina B₁₂ <noreply@trialog.example>")
    email = Email(("ana@example.org", "site@example.org"), "Recordatorio: visita de la "
                  "semana 6 — ¡mañana!", "Hola Ana,\nsu visita es mañana.",
                  "<p>Hola Ana, su visita es <b>mañana</b>.</p>")
    read = _read(mailer.message(email))
    assert read["Subject"] == email.subject
    assert read["From"].addresses[0].display_name == "Ensayo Vitamina B₁₂"
    assert read["From"].addresses[0].addr_spec == "noreply@trialog.example"
    assert [a.addr_spec for a in read["To"].addresses] == list(email.to)
    assert read["Message-ID"].endswith("@trialog.example>") and read["Date"]
    assert read.get_body(("plain",)).get_content().strip() == email.text
    assert read.get_body(("html",)).get_content().strip() == email.html


def test_a_line_break_in_a_subject_injects_no_header():
    mailer = Mailer("smtp://127.0.0.1:1025", "noreply@trialog.example")
    email = Email(("ana@example.org",), "Reminder\r\nBcc: everyone@example.org", "t", "<p>t</p>")
    read = _read(mailer.message(email))
    assert read["Bcc"] is None and read["Subject"] == "Reminder Bcc: everyone@example.org"
