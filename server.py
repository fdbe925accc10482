"""What `streamlit run server.py` (and `make run`) serves on one port: the pages (streamlit_app.py), the HTTP API for
other systems under /api/v1 (core/api.py) and the browser sign-in routes (core/web_login.py); strangers are sent to the
sign-in form before any page."""

from __future__ import annotations

import streamlit as st
from starlette.middleware import Middleware
from starlette.routing import Mount

from core import web_login
from core.api import app as api_app
from pages._auth import oidc_configured

app = st.App(
    "streamlit_app.py",
    routes=[Mount("/api/v1", app=api_app), *web_login.routes()],
    middleware=[Middleware(web_login.SignInRedirect, skip=oidc_configured)],
)
