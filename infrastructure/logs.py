"""Structured logs: one JSON object per line on standard error."""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from datetime import UTC, datetime
from typing import Any

import orjson

# Attributes every LogRecord has; anything else was passed in ``extra`` and is logged.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(entry, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        except orjson.JSONEncodeError:  # an integer past 64 bits, a lone surrogate
            return json.dumps(entry, default=str, ensure_ascii=False, separators=(",", ":"))


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("trialog")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


# Contact details stay out of logs and operational tables: an address is shown as its
# first character and its domain. Anything that looks like an address inside a text (an
# SMTP server's reply, an exception) is masked the same way.
_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_ADDRESS_IN_TEXT = re.compile(r"[^\s@<>()\[\]{},;:\"'=]+@[A-Za-z0-9.-]+")


def mask_email(address: str) -> str:
    """``jane@example.org`` as ``j***@example.org``; ``***`` for what is not one address."""
    local, at, domain = address.rpartition("@")
    if not at or not local or any(ch.isspace() for ch in local) or not _DOMAIN.fullmatch(domain):
        return "***"
    first = local[0] if local[0].isalnum() else ""
    return f"{first}***@{domain}"


def mask_emails_in(text: str) -> str:
    """``text`` with every address in it masked (see ``mask_email``)."""
    return _ADDRESS_IN_TEXT.sub(lambda m: mask_email(m.group()), text)


# An address quoted in a free text the trial's people wrote (a query's message, a reason):
# a mailbox (quoted, or any characters an email field takes before its '@') at a domain
# of dotted labels of the characters an email field takes (any beyond ASCII), whose last
# starts with a letter and has two characters or more (an "xn--" one too), or at
# localhost or an address literal; so that what a log masks to be safe, "120/80@10.30",
# "1000mcg@day", "1 tab@b.i.d" or "500mg@08.00hrs", is shown as it was written. A match
# starts only where a word does (no scan from inside one: linear in the text's length).
_DOMAIN_CHAR = "A-Za-z0-9\u00a1-\uffff"
_LABEL = rf"[{_DOMAIN_CHAR}](?:[{_DOMAIN_CHAR}-]*[{_DOMAIN_CHAR}])?"
_LAST_LABEL = rf"[A-Za-z\u00a1-\uffff][{_DOMAIN_CHAR}-]+"
_ADDRESS_QUOTED = re.compile(
    r'(?<![^\s@<>()\[\],;:"])(?:"(?:[^"\\\r\n]|\\.)*"|[^\s@<>()\[\],;:"]+)@'
    rf"(?:(?:(?:{_LABEL}\.)+{_LAST_LABEL}|localhost)(?![{_DOMAIN_CHAR}-])"
    r"|\[[0-9A-Fa-f:.]+\])")


def maskable_address(address: str) -> bool:
    """Whether an address is one a free text quoting it would be found to quote."""
    return _ADDRESS_QUOTED.fullmatch(address) is not None


def quotes_an_address(text: str) -> bool:
    return "@" in text and _ADDRESS_QUOTED.search(text) is not None


def mask_quoted_addresses(text: str) -> str:
    """A free text with each address quoted in it masked (see ``_ADDRESS_QUOTED``)."""
    return _ADDRESS_QUOTED.sub(lambda m: mask_email(m.group()), text)


# A fault of the program (an exception no rule raised) is described by its kind and where it
# happened, never by its text: that may quote the data it failed on (a birth date, an email).
def fault_at(error: BaseException) -> str:
    """``RuntimeError at domain/participant.py:170 (absorb)``: the kind and innermost frame."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return type(error).__name__
    last = frames[-1]
    return f"{type(error).__name__} at {_short(last.filename)}:{last.lineno} ({last.name})"


def fault_trace(error: BaseException) -> str:
    """The frames that led to the fault, and its kind (for a log; without its text)."""
    frames = traceback.extract_tb(error.__traceback__)
    return "".join(f"{_short(f.filename)}:{f.lineno} in {f.name}\n" for f in frames) + \
        type(error).__name__


_LIBRARY = re.compile(r".*/(?:site-packages|lib/python3\.\d+)/")
_PROJECT = re.compile(r".*/(?=(?:domain|infrastructure|workers)/)")


def _short(path: str) -> str:
    """A source file's path from the project's root, or from its library's."""
    return _LIBRARY.sub("", _PROJECT.sub("", path, count=1), count=1)
