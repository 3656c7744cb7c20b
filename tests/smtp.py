"""A real SMTP server in-process (aiosmtpd) that keeps what it receives."""

from __future__ import annotations

import email
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

from aiosmtpd.controller import Controller

from tests.e2e.conftest import free_port

OVERLONG = "250 " + "x" * 9000  # a reply line longer than smtplib reads (8192 bytes)


@dataclass
class Sink:
    messages: list[Message] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)  # (from, to)
    refuse: set[str] = field(default_factory=set)  # addresses answered 550
    defer: set[str] = field(default_factory=set)  # addresses answered 451
    closing: set[str] = field(default_factory=set)  # addresses answered 421 (going away)
    busy_after: int | None = None  # MAILs taken before every next one is answered 451
    defer_data: set[str] = field(default_factory=set)  # a message to these: 451 to its DATA
    mails: int = 0
    holding: bool = False  # the next DATA is left unanswered until release() (or a minute)
    dropping: bool = False  # the next DATA is kept, and its connection closed unanswered
    # Commands (DATA, RCPT, RSET) whose next reply is longer than a client reads (a DATA's
    # message is kept).
    overlong: set[str] = field(default_factory=set)
    released: threading.Event = field(default_factory=threading.Event)
    received: threading.Event = field(default_factory=threading.Event)
    port: int = 0

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: Any) -> str:
        if self.busy_after is not None and self.mails >= self.busy_after:
            return "451 4.3.2 System busy, try again later"
        self.mails += 1
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: Any) -> str:
        if "RCPT" in self.overlong:
            self.overlong.discard("RCPT")
            return OVERLONG
        if address in self.refuse:
            return f"550 5.1.1 <{address}>: mailbox unavailable"
        if address in self.closing:
            return "421 4.3.2 service shutting down, closing the channel"
        if address in self.defer:
            return f"451 4.3.0 <{address}>: try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        import asyncio

        deferred = bool(self.defer_data & set(envelope.rcpt_tos))  # not kept
        if not deferred:
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
            self.messages.append(email.message_from_bytes(envelope.content))
        self.received.set()
        if self.dropping:  # as a connection lost before the server's reply
            self.dropping = False
            server.transport.abort()
            return "421 gone"
        if "DATA" in self.overlong:
            self.overlong.discard("DATA")
            return OVERLONG
        if self.holding:
            self.holding = False
            deadline = time.monotonic() + 60
            while not self.released.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        if deferred:  # as a content filter's "not now"
            return "451 4.7.1 message deferred, try again later"
        return "250 Message accepted"

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        if "RSET" in self.overlong:
            self.overlong.discard("RSET")
            return OVERLONG
        return "250 OK"

    def hold(self) -> None:
        """Leaves the next DATA unanswered until release()."""
        self.released.clear()
        self.holding = True

    def release(self) -> None:
        """Answers the held DATA."""
        self.released.set()

    def wait_for(self, count: int, timeout: float = 30) -> list[Message]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.messages)} emails arrived, not {count}")
            time.sleep(0.05)
        return self.messages


@contextmanager
def smtp_sink(smtputf8: bool = False) -> Iterator[Sink]:
    sink = Sink(port=free_port())
    controller = Controller(sink, hostname="127.0.0.1", port=sink.port,
                            enable_SMTPUTF8=smtputf8)
    controller.start()
    try:
        yield sink
    finally:
        sink.release()  # a test that failed while a DATA was held
        controller.stop()


def text_of(message: Message) -> str:
    part = next(p for p in message.walk() if p.get_content_type() == "text/plain")
    payload = part.get_payload(decode=True)
    return payload.decode(part.get_content_charset() or "utf-8")  # type: ignore[union-attr]
