"""Structured logs: one JSON object per line on standard error."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

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
        return json.dumps(entry, default=str, ensure_ascii=False)


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
