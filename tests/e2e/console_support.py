"""The console's tests drive a real headless Chromium (Debian's, through Playwright) against
a real `trialog serve` on a database of its own (SQLite or PostgreSQL), so that the
trial's counts are known exactly. People of every role are created in it; machine tokens
set the trial up over the API."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from domain.access import EVERY_SITE, Scope
from infrastructure.store.bootstrap import bootstrap
from infrastructure.store.people import create_user
from infrastructure.store.tokens import ROLES, create_token
from tests.conftest import TEST_SECRETS, settings_for
from tests.databases import PG_SERVER, fresh_postgres_database
from tests.e2e.conftest import TRIALOG, Client, free_port, wait_until_up

PASSWORD = "a console password of some length"
# Screenshots stay after the run for a person to look at (the folder is ignored by git).
SCREENSHOTS = Path(os.environ.get("TRIALOG_SCREENSHOTS",
                                  Path(__file__).resolve().parents[1] / "output" / "console"))
AXE = Path(__file__).resolve().parent / "vendor" / "axe-core-4.14.1.min.js"


@dataclass
class Console:
    url: str
    database: str
    engine: Any
    logins: dict[str, str] = field(default_factory=dict)  # role -> login (CASE or all sites)
    metro_coordinator: str = ""
    admin: Client | None = None  # a machine token of every site, for setting the trial up

    def page_url(self, path: str = "/console/") -> str:
        return self.url + path


def _people(engine: Any, suffix: str) -> tuple[dict[str, str], str]:
    logins = {}
    for role in ROLES:
        login = f"{role}.{suffix}"
        scope = EVERY_SITE if role in ("data_manager", "auditor", "admin") \
            else Scope.of(["CASE"])
        create_user(engine, login, f"{role.replace('_', ' ').title()} {suffix}", role, scope,
                    PASSWORD)
        logins[role] = login
    metro = f"coordinator.metro.{suffix}"
    create_user(engine, metro, f"Metro Coordinator {suffix}", "coordinator",
                Scope.of(["METRO"]), PASSWORD)
    return logins, metro


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def console(request, tmp_path_factory) -> Iterator[Console]:
    """`trialog serve` on a fresh database, with a person of every role."""
    folder = tmp_path_factory.mktemp(f"console-{request.param}")
    with ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{folder / 'trialog.db'}"
        else:
            url = f"{PG_SERVER}/{stack.enter_context(fresh_postgres_database('console'))}"
        trialog = bootstrap(settings_for(url), migrate=True)
        stack.callback(trialog.close)
        logins, metro = _people(trialog.engine, uuid.uuid4().hex[:6])
        token = create_token(trialog.engine, f"setup-{uuid.uuid4().hex[:6]}", "admin")
        port = free_port()
        log = folder / "server.log"
        env = {**os.environ, "TRIALOG_DATABASE_URL": url, **TEST_SECRETS}
        with open(log, "w") as out:
            process = subprocess.Popen([TRIALOG, "serve", "--port", str(port)], env=env,
                                       stdout=out, stderr=subprocess.STDOUT)
        stack.callback(process.wait, 10)
        stack.callback(process.terminate)
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base, process, log)
        yield Console(base, url, trialog.engine, logins, metro, Client(base, token))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright; one per test module (each module
    imports the fixture, and Playwright runs one driver at a time in a thread)."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        raise RuntimeError("Chromium is not installed: `make test` installs it (apt-get "
                           "install chromium)")
    args = ["--no-sandbox"] if os.geteuid() == 0 else []  # root has no user namespace
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=args)
        yield chromium
        chromium.close()


def sign_in(context: Any, console: Console, login: str, password: str = PASSWORD,
            path: str = "/console/") -> Any:
    """A new page of ``context`` signed in as ``login``, at ``path``."""
    page = context.new_page()
    page.goto(console.page_url(path))
    page.get_by_label("Login").fill(login)
    page.get_by_label("Password").fill(password)
    follow(page.get_by_role("button", name="Sign in"))
    return page


def follow(control: Any) -> None:
    """Click a link or a form's button and wait until the page it leads to has loaded: the
    console's pages are plain navigations, and an assertion made before the next page is in
    would read the previous one (or miss a dialog that has not arrived yet)."""
    with control.page.expect_navigation():
        control.click()


def form_session(console: Console, login: str, password: str = PASSWORD
                 ) -> requests.Session:
    """A signed-in console session without a browser (for what a browser would hide:
    cookies' attributes, forged posts)."""
    session = requests.Session()
    page = session.get(console.page_url("/console/sign-in"), timeout=30)
    answer = session.post(console.page_url("/console/sign-in"), timeout=30,
                          data={"csrf_token": csrf_of(page.text), "login": login,
                                "password": password, "next": "/console/"},
                          allow_redirects=False)
    assert answer.status_code == 303, answer.text
    return session


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "the page has no CSRF token"
    return found.group(1)


def screenshot(page: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def serious_violations(page: Any) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on the page (WCAG 2.x A and AA)."""
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.add_script_tag(content=AXE.read_text())
    result = page.evaluate("""async () => {
        const r = await axe.run(document, {runOnly: {type: 'tag',
            values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice']}});
        return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                                       nodes: v.nodes.map(n => n.target.join(' '))}));
    }""")
    return [v for v in result if v["impact"] in ("serious", "critical")]
