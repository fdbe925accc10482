"""Who is signed in to this browser, the sign-in screen, and what each role may do on the pages.

The session lives in an HttpOnly cookie set by the server's /auth/login form (core.web_login), or comes from an
OIDC provider through `st.login` when `.streamlit/secrets.toml` has an `[auth]` section. Each run re-reads the
account, so a changed role or a disabled account takes effect at the next click. Pages only hide what a role
cannot do; core refuses it anyway.
"""

from __future__ import annotations

import html
from urllib.parse import quote, urlencode

import streamlit as st
from streamlit.errors import StreamlitSecretNotFoundError

from core import auth
from core.auth import Action, Principal, Role
from core.db import Database
from core.web_login import LOGIN_PATH, LOGOUT_PATH, SESSION_COOKIE
from pages._text import md_escape

# The account name of this session when neither a cookie nor OIDC provides one (with sign-in off: instead of the
# default actor): set only by tests, as AppTest has no cookies. A browser cannot write session state except through
# widgets, and no widget has this key.
ACCOUNT_KEY = "signed_in_account"
_PRINCIPAL_KEY = "_principal"


def oidc_configured() -> bool:
    """True when secrets.toml configures an OIDC provider for st.login."""
    try:
        return "auth" in st.secrets
    except StreamlitSecretNotFoundError:  # no secrets.toml at all
        return False


def _signed_in_name(db: Database) -> str | None:
    secret = st.context.cookies.get(SESSION_COOKIE)
    if isinstance(secret, str) and secret:  # AppTest's context hands back a stand-in object
        found = auth.session_principal(db, secret)
        if found is not None:
            return found.name
    if oidc_configured() and st.user.is_logged_in:
        email = st.user.get("email")
        return str(email) if email else None
    name = st.session_state.get(ACCOUNT_KEY)
    return str(name) if name else None


def resolve(db: Database) -> Principal | None:
    """Who this session acts as (an admin named by the default actor when sign-in is off), or None."""
    if not auth.auth_enabled(db):
        name = st.session_state.get(ACCOUNT_KEY) or db.settings.default_actor
        principal: Principal | None = Principal(str(name), Role.ADMIN)
    else:
        name = _signed_in_name(db)
        with db.read() as session:
            principal = auth.principal_of(session, name) if name else None
    st.session_state[_PRINCIPAL_KEY] = principal
    return principal


def current() -> Principal:
    """The principal this page run resolved (the shell resolves it before any page runs)."""
    principal = st.session_state.get(_PRINCIPAL_KEY)
    if principal is None:
        raise auth.PermissionDenied("not signed in: reload the page and sign in")
    return principal


def may(action: Action) -> bool:
    principal = st.session_state.get(_PRINCIPAL_KEY)
    return principal is not None and principal.may(action)


def require(action: Action) -> None:
    """Stop a page that this role cannot use, saying why (core would refuse its actions anyway)."""
    if not may(action):
        role = current().role.value if st.session_state.get(_PRINCIPAL_KEY) else "signed-out"
        st.info(f"This page is for accounts that may {action.text} ({action.role.value} or higher); yours is {role}.")
        st.stop()


def same_tab_link(label: str, url: str) -> None:
    """A link that opens in this tab (st.link_button and Markdown links open a new one): the sign-in form and
    sign-out are server routes that set or clear the session cookie for the tab the person is in."""
    st.html(f'<a href="{html.escape(url, quote=True)}" class="prodcat-auth-link">{html.escape(label)}</a>')


def sign_in_screen(db: Database) -> None:
    """Shown instead of every page until someone signs in; stops the run."""
    st.title("prodcat")
    here = st.context.url if isinstance(st.context.url, str) else "/"
    path = "/" + here.split("://", 1)[-1].partition("/")[2].partition("?")[0] if "://" in here else "/"
    query = urlencode(st.query_params.to_dict())
    back = f"{path}?{query}" if query else path
    same_tab_link("Sign in", f"{LOGIN_PATH}?next={quote(back, safe='/')}")
    if oidc_configured():
        if st.user.is_logged_in:
            st.error(
                md_escape(
                    f"{st.user.get('email') or 'This identity'} has no enabled account here: ask an admin to add it "
                    "(python -m core.cli users add EMAIL --role labeller --no-password)."
                )
            )
            st.button("Sign out of the provider", on_click=st.logout)
        else:
            st.button("Sign in with your organisation", on_click=st.login)
    if not auth.has_admin(db):
        st.warning(
            "No admin account exists yet. On the server, create the first one: "
            "python -m core.cli users add NAME --role admin (make run offers to do it)."
        )
    st.caption("No account yet? An admin adds one: python -m core.cli users add NAME --role labeller")
    st.stop()


def sidebar_identity(db: Database) -> None:
    """Who is signed in, with a sign-out link; or the warning that sign-in is off."""
    principal = current()
    if not auth.auth_enabled(db):
        st.warning("Sign-in is off (PRODCAT_AUTH=none): anyone who can open this address can change everything.")
        return
    st.text(f"Signed in as {principal.name} ({principal.role.value})")
    if oidc_configured() and st.user.is_logged_in:
        st.button("Sign out", on_click=st.logout)
    else:
        same_tab_link("Sign out", LOGOUT_PATH)
