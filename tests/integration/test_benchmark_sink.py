"""The benchmarks' plain SMTP sink speaks enough SMTP for smtplib: messages over one
connection, each answered once its content has ended, and nothing of the content read as a
command."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator

import pytest

from benchmarks.reminders import smtp_sink_process
from tests.e2e.conftest import free_port


@pytest.fixture
def sink_port() -> Iterator[int]:
    port = free_port()
    process = smtp_sink_process(port)
    yield port
    process.terminate()
    process.join(10)


def test_the_plain_sink_takes_messages_one_after_another(sink_port: int) -> None:
    # Lines that begin with a dot (smtplib doubles it), content long enough to arrive in
    # several reads, and an empty body.
    bodies = [b"Subject: a\r\n\r\n.starts with a dot\r\n.\r\nDATA\r\nend\r\n",
              b"Subject: b\r\n\r\n" + (b"x" * 998 + b"\r\n") * 200 + b"y" * 70_000,
              b""]
    with smtplib.SMTP("127.0.0.1", sink_port, timeout=10) as smtp:
        assert smtp.ehlo()[0] == 250
        assert smtp.has_extn("smtputf8")
        for body in bodies:
            assert smtp.mail("from@example.org")[0] == 250
            assert smtp.rcpt("a@example.org")[0] == 250
            assert smtp.rcpt("b@example.org")[0] == 250
            assert smtp.data(body) == (250, b"Queued")  # the reply to the content's end
            assert smtp.noop() == (250, b"OK")
        smtp.sock.setblocking(False)
        assert smtp.file is not None and smtp.file.peek(1) == b""  # no reply left over
        smtp.sock.setblocking(True)
        assert smtp.rset()[0] == 250
    # QUIT was answered (smtplib's context manager sends it) and the connection closed.
    with pytest.raises(smtplib.SMTPServerDisconnected):
        smtp.noop()


@pytest.mark.parametrize("pieces", [[b".\r\n"], [b"abc\r\n.", b"\r\n"], [b"abc\r", b"\n.\r\n"]])
def test_the_plain_sink_finds_the_end_of_content_however_it_arrives(
        sink_port: int, pieces: list[bytes]) -> None:
    # A client's own DATA: an empty message (its end right after the 354), or an end cut
    # across two reads.
    with smtplib.SMTP("127.0.0.1", sink_port, timeout=5) as smtp:
        smtp.ehlo()
        smtp.mail("from@example.org")
        smtp.rcpt("a@example.org")
        smtp.putcmd("data")
        assert smtp.getreply()[0] == 354
        for piece in pieces:
            smtp.send(piece)
            time.sleep(0.05)  # each piece in a read of its own
        assert smtp.getreply() == (250, b"Queued")
        assert smtp.noop() == (250, b"OK")
