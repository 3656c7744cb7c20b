"""The benchmarks' plain SMTP sink speaks enough SMTP for smtplib: messages over one
connection, each answered once its content has ended, and nothing of the content read as a
command."""

from __future__ import annotations

import smtplib
import socket
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
        assert smtp.sock is not None and smtp.file is not None
        smtp.sock.setblocking(False)
        assert smtp.file.peek(1) == b""  # no reply left over
        smtp.sock.settimeout(10)
        assert smtp.rset()[0] == 250


def _replies(connection: socket.socket, n: int) -> list[bytes]:
    """The next ``n`` reply lines (of one line each)."""
    received = b""
    while received.count(b"\r\n") < n:
        data = connection.recv(65536)
        assert data, f"closed after {received!r}"
        received += data
    lines = received.split(b"\r\n")
    assert len(lines) == n + 1 and lines[-1] == b"", received  # nothing more than asked
    return lines[:-1]


@pytest.mark.parametrize("pieces", [
    [b".\r\n"],  # an empty message: its end right after the 354
    [b"abc\r\n.", b"\r\n"], [b"abc\r", b"\n.\r\n"], [b"abc\r\n.\r", b"\n"],
    [b"abc\r\n", b".\r\n"]])  # the end cut across two reads
def test_the_plain_sink_finds_the_end_of_content_however_it_arrives(
        sink_port: int, pieces: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", sink_port), timeout=5) as connection:
        assert _replies(connection, 1)[0].startswith(b"220")
        connection.sendall(b"mail FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        assert [r[:3] for r in _replies(connection, 3)] == [b"250", b"250", b"354"]
        for piece in pieces:
            connection.sendall(piece)
            time.sleep(0.05)  # each piece in a read of its own
        assert _replies(connection, 1) == [b"250 Queued"]


def test_the_plain_sink_answers_commands_in_order_however_they_arrive(sink_port: int) -> None:
    with socket.create_connection(("127.0.0.1", sink_port), timeout=5) as connection:
        _replies(connection, 1)
        # A command cut across reads; then a message's content with the next commands in
        # the same read as its end.
        for piece in (b"NO", b"OP\r", b"\n"):
            connection.sendall(piece)
            time.sleep(0.05)
        assert _replies(connection, 1) == [b"250 OK"]
        connection.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        assert [r[:3] for r in _replies(connection, 3)] == [b"250", b"250", b"354"]
        connection.sendall(b"Subject: x\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n")
        assert _replies(connection, 3) == [b"250 Queued", b"250 OK", b"221 Bye"]
        assert connection.recv(1) == b""  # closed after QUIT
