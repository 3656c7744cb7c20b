"""The console's participant page: the first view of each 500-event participant (no cache
of the server's has seen it), by a person signed in through the console's own form, over
HTTP from `trialog serve`; for a role without contact details (a monitor) and for one
with them (a coordinator, whose page also reads the contact details and records the
disclosure)."""

from __future__ import annotations

import re
import secrets
import statistics
import time
import uuid
from typing import Any

import requests

from benchmarks.http import p95_ms
from domain.access import EVERY_SITE
from infrastructure.store.people import create_user


def signed_in(base: str, engine: Any, role: str) -> requests.Session:
    """A console session of a new person of ``role`` (every site)."""
    login, password = f"bench-{role}-{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(18)
    create_user(engine, login, f"Bench {role.title()}", role, EVERY_SITE, password)
    session = requests.Session()
    form = session.get(f"{base}/console/sign-in", timeout=60)
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    if token is None:
        raise RuntimeError("the sign-in form has no CSRF token")
    answer = session.post(f"{base}/console/sign-in", timeout=60, allow_redirects=False,
                          data={"csrf_token": token.group(1), "login": login,
                                "password": password})
    if answer.status_code != 303:
        raise RuntimeError(f"console sign-in answered {answer.status_code}")
    return session


def first_views(base: str, session: requests.Session, participant_ids: list[str],
                events: int) -> dict[str, Any]:
    """p95 and median ms of each participant's page, read once each, in order."""
    samples = []
    for pid in participant_ids:
        start = time.perf_counter()
        answer = session.get(f"{base}/console/participants/{pid}", timeout=60)
        elapsed = time.perf_counter() - start
        if answer.status_code != 200 or f"{events} events, newest first" not in answer.text:
            raise RuntimeError(f"the page of {pid} answered {answer.status_code}")
        samples.append(elapsed)
    return {"p95_ms": round(p95_ms(samples), 2),
            "median_ms": round(statistics.median(samples) * 1000, 2),
            "pages": len(samples), "bytes": len(answer.content)}
