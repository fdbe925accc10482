"""Browser sign-in for the built-in accounts: a plain HTML form at /auth/login that sets an HttpOnly session cookie,
and /auth/logout. Served by the same Starlette server as the pages (server.py); the pages read the cookie.

A form served by the server (not a Streamlit widget) is what lets the session live in an HttpOnly cookie, survive
reloads and new tabs, and expire on the server. The form is protected against login CSRF by a double-submit token
(a SameSite=Strict cookie that must equal the form field).
"""

from __future__ import annotations

import html
import secrets
from collections.abc import Callable
from urllib.parse import quote, urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from core import auth
from core.db import Database, open_database
from core.settings import get_settings

SESSION_COOKIE = "prodcat_session"
CSRF_COOKIE = "prodcat_login_csrf"
LOGIN_PATH = "/auth/login"
LOGOUT_PATH = "/auth/logout"
MAX_FORM_BYTES = 16 * 1024

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in - prodcat</title>
<style>
body {{ font-family: system-ui, sans-serif; background: #f6f7f9; display: flex; justify-content: center; }}
form {{ background: white; margin-top: 12vh; padding: 2rem 2.5rem; border-radius: 10px; width: 20rem;
        box-shadow: 0 2px 12px rgba(0,0,0,.08); }}
label {{ display: block; margin: 1rem 0 .3rem; font-size: .9rem; }}
input[type=text], input[type=password] {{ width: 100%; padding: .5rem; box-sizing: border-box; font-size: 1rem; }}
button {{ margin-top: 1.4rem; width: 100%; padding: .6rem; font-size: 1rem; background: #ff4b4b; color: white;
          border: 0; border-radius: 6px; cursor: pointer; }}
.error {{ color: #b00020; margin-top: 1rem; }}
.hint {{ color: #555; font-size: .85rem; margin-top: 1.2rem; }}
</style></head>
<body><form method="post" action="{action}">
<h2>Sign in to prodcat</h2>
<label for="name">Name</label><input type="text" id="name" name="name" value="{name}" autocomplete="username"
 autofocus required maxlength="200">
<label for="password">Password</label><input type="password" id="password" name="password"
 autocomplete="current-password" required maxlength="1000">
<input type="hidden" name="csrf" value="{csrf}">
<button type="submit">Sign in</button>
{error}
<p class="hint">No account? Ask an admin: <code>python -m core.cli users add NAME --role labeller</code></p>
</form></body></html>
"""


def _db() -> Database:
    return open_database(get_settings())


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path on this server only (never another host, never a scheme)."""
    if not target:
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _form_page(request: Request, *, name: str = "", error: str = "", status: int = 200) -> Response:
    csrf = secrets.token_urlsafe(24)
    next_path = safe_next(request.query_params.get("next"))
    action = LOGIN_PATH if next_path == "/" else f"{LOGIN_PATH}?next={quote(next_path, safe='/')}"
    body = _PAGE.format(
        action=html.escape(action, quote=True),
        name=html.escape(name, quote=True),
        csrf=csrf,
        error=f'<p class="error" role="alert">{html.escape(error)}</p>' if error else "",
    )
    response = HTMLResponse(body, status_code=status, headers={"Cache-Control": "no-store"})
    response.set_cookie(
        CSRF_COOKIE, csrf, httponly=True, samesite="strict", secure=_secure(request), path=LOGIN_PATH, max_age=3600
    )
    return response


async def login(request: Request) -> Response:
    """GET: the sign-in form. POST: check the name and password (rate-limited) and set the session cookie."""
    if get_settings().auth == "none":
        return RedirectResponse("/", status_code=303)
    if request.method == "GET":
        return _form_page(request)
    if int(request.headers.get("content-length") or 0) > MAX_FORM_BYTES:
        return _form_page(request, error="The form is too large.", status=413)
    form = await request.form(max_files=0, max_fields=10)
    name = str(form.get("name") or "")[: auth.MAX_NAME]
    csrf = str(form.get("csrf") or "")
    if not csrf or not secrets.compare_digest(csrf, request.cookies.get(CSRF_COOKIE, "")):
        return _form_page(request, name=name, error="The form expired: please sign in again.", status=400)
    client = request.client.host if request.client else ""
    try:
        # argon2 takes tens of milliseconds and 64 MiB on purpose: off the event loop that serves every page.
        password = str(form.get("password") or "")
        secret, _ = await run_in_threadpool(auth.sign_in, _db(), name, password, client=client)
    except auth.SignInRefused as exc:
        status = 429 if "too many" in str(exc) else 401
        return _form_page(request, name=name, error=f"Not signed in: {exc}.", status=status)
    response = RedirectResponse(safe_next(request.query_params.get("next")), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        secret,
        max_age=int(get_settings().session_hours * 3600),
        httponly=True,
        samesite="lax",
        secure=_secure(request),
        path="/",
    )
    response.delete_cookie(CSRF_COOKIE, path=LOGIN_PATH)
    return response


async def logout(request: Request) -> Response:
    """End this browser's session (on the server too) and go to the sign-in form."""
    await run_in_threadpool(auth.end_session, _db(), request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse(LOGIN_PATH, status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# Paths that are not pages: Streamlit's own endpoints and assets, the API (bearer tokens), these sign-in routes.
_NOT_PAGES = ("/_stcore/", "/static/", "/media/", "/component/", "/api/", "/auth/", "/favicon")


class SignInRedirect:
    """ASGI middleware: a browser asking for a page without a valid session is sent to the sign-in form first (and
    back to the page it asked for afterwards), so the form opens in the same tab. The pages check the session
    again on every run; this only saves a stranger the app shell. Off when sign-in is off, or while `skip()` says
    so (OIDC configured: its st.login button lives on the app's own sign-in screen)."""

    def __init__(self, app: ASGIApp, skip: Callable[[], bool] = lambda: False) -> None:
        self.app = app
        self.skip = skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and await self._needs_sign_in(Request(scope)):
            request = Request(scope)
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            redirect = RedirectResponse(f"{LOGIN_PATH}?next={quote(target, safe='/')}", status_code=303)
            await redirect(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _needs_sign_in(self, request: Request) -> bool:
        if request.method != "GET" or request.url.path.startswith(_NOT_PAGES):
            return False
        if "text/html" not in request.headers.get("accept", ""):
            return False
        settings = get_settings()
        if settings.auth == "none" or self.skip():
            return False
        secret = request.cookies.get(SESSION_COOKIE)
        return await run_in_threadpool(auth.session_principal, _db(), secret) is None


def routes() -> list[BaseRoute]:
    """The sign-in routes to mount beside the pages."""
    return [Route(LOGIN_PATH, login, methods=["GET", "POST"]), Route(LOGOUT_PATH, logout, methods=["GET", "POST"])]
