"""Accounts & tokens (admins): who may sign in with which role, API tokens for other systems, recent actions."""

from __future__ import annotations

import streamlit as st

from core import auth
from core.auth import Action, Role
from pages import _auth, _ui

db = _ui.get_db()
_auth.require(Action.ACCOUNTS)
_ui.show_flash()
st.title("Accounts & tokens")
ROLES = [r.value for r in Role]


def _done(ok: bool, message: str) -> None:
    if ok:
        _ui.flash("success", message)
        st.rerun()


# --- accounts -------------------------------------------------------------------------------------------------------
accounts = auth.list_accounts(db)
st.subheader("Accounts")
st.dataframe(
    [
        {
            "name": a.name,
            "role": a.role.value,
            "enabled": not a.disabled,
            "signs in with": "password" if a.has_password else "OIDC only",
            "last sign-in": a.last_login_at,
        }
        for a in accounts
    ],
    hide_index=True,
)
add_tab, role_tab, access_tab = st.tabs(["Add", "Change role", "Disable, enable, reset password"])
with add_tab, st.form("add_account", clear_on_submit=True):
    name = st.text_input("Name (an e-mail address for OIDC sign-in)")
    role = st.selectbox("Role", ROLES, index=1)
    password = st.text_input("Password (empty: signs in only through OIDC)", type="password")
    if st.form_submit_button("Add account"):
        ok, view = _ui.attempt(auth.add_account, db, name, role, password or None, actor=_ui.actor())
        _done(ok, f"Added {name} ({role})")
names = [a.name for a in accounts]
with role_tab, st.form("set_role"):
    who = st.selectbox("Account", names, key="role_account")
    role = st.selectbox("New role", ROLES, key="role_new")
    if st.form_submit_button("Change role"):
        ok, _ = _ui.attempt(auth.set_role, db, who, role, actor=_ui.actor())
        _done(ok, f"{who} is now {role}")
with access_tab, st.form("account_access", clear_on_submit=True):
    who = st.selectbox("Account", names, key="access_account")
    new_password = st.text_input("New password (for Reset password)", type="password")
    left, middle, right = st.columns(3)
    if left.form_submit_button("Disable"):
        ok, _ = _ui.attempt(auth.disable_account, db, who, actor=_ui.actor())
        _done(ok, f"{who} is disabled and signed out everywhere")
    if middle.form_submit_button("Enable"):
        ok, _ = _ui.attempt(auth.enable_account, db, who, actor=_ui.actor())
        _done(ok, f"{who} is enabled")
    if right.form_submit_button("Reset password"):
        ok, _ = _ui.attempt(auth.reset_password, db, who, new_password, actor=_ui.actor())
        _done(ok, f"New password set for {who}")

# --- API tokens -----------------------------------------------------------------------------------------------------
st.subheader("API tokens")
st.caption("Other systems call /api/v1/ with `Authorization: Bearer <token>`; a token is shown once, when created.")
tokens = auth.list_tokens(db)
if tokens:
    st.dataframe(
        [
            {
                "name": t.name,
                "role": t.role.value,
                "state": "revoked" if t.revoked else "active",
                "created by": t.created_by,
                "created": t.created_at,
                "last used": t.last_used_at,
            }
            for t in tokens
        ],
        hide_index=True,
    )
create_tab, revoke_tab = st.tabs(["Create", "Revoke"])
with create_tab, st.form("create_token", clear_on_submit=True):
    token_name = st.text_input("What the token is for (e.g. shop-upload-pipeline)")
    token_role = st.selectbox("Role", ROLES, key="token_role")
    if st.form_submit_button("Create token"):
        ok, made = _ui.attempt(auth.create_token, db, token_name, token_role, actor=_ui.actor())
        if ok:
            shown = _ui.md_escape(f"Token {made[0].name} ({made[0].role.value})")
            st.success(f"{shown} created. Copy it now: it is not shown again.")
            st.code(made[1], language=None)
with revoke_tab, st.form("revoke_token"):
    active = [t.name for t in tokens if not t.revoked]
    pick = st.selectbox("Token", active, key="revoke_pick")
    if st.form_submit_button("Revoke", disabled=not active):
        ok, _ = _ui.attempt(auth.revoke_token, db, pick, actor=_ui.actor())
        _done(ok, f"Token {pick} revoked")

# --- recent actions -------------------------------------------------------------------------------------------------
st.subheader("Recent actions")
st.caption("Every state-changing action besides label changes (those are in each image's history).")
actions = auth.recent_actions(db, limit=200)
if actions:
    st.dataframe(
        [
            {"when": a.at, "who": a.actor, "action": a.action, "what": a.subject, "detail": str(a.detail or "")}
            for a in actions
        ],
        hide_index=True,
    )
else:
    st.text("Nothing recorded yet.")
