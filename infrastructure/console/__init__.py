"""The console: the trial in a browser for the people who run it (/console/). Pages are
rendered on the server from the same queries the API answers; each form issues one of the
contract's commands through the API's own command path, so the console has no rules of its
own."""

from __future__ import annotations

from flask import Flask


def serves(path: str) -> bool:
    """Whether the console answers ``path`` (with its own sign-in, not a bearer token)."""
    from infrastructure.console.auth import is_console

    return is_console(path)


def register(app: Flask) -> None:
    """Serves the console beside the API of ``app`` (made by ``create_app``)."""
    from infrastructure.console import pages, participant  # noqa: F401  (their routes)
    from infrastructure.console.auth import FormCookie
    from infrastructure.console.web import blp

    app.session_interface = FormCookie(app.extensions["trialog"].trialog.engine)
    app.register_blueprint(blp)
