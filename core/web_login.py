"""Browser sign-in for the built-in accounts: a plain HTML form at /auth/login that sets an HttpOnly session cookie,
and /auth/logout. Served by the same Starlette server as the pages (server.py)."""

from __future__ import annotations

from starlette.routing import BaseRoute

SESSION_COOKIE = "prodcat_session"


def routes() -> list[BaseRoute]:
    """The sign-in routes to mount beside the pages."""
    return []
