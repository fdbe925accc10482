"""What each role sees: the sign-in screen until someone signs in, pages a role cannot use say so, and a labeller
sees no Retrain button (core refuses it anyway: tests/core/test_auth.py)."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from core import auth
from core.db import Database
from tests.pages.helpers import APP, TIMEOUT_S, run_page


def test_nobody_signed_in_sees_only_the_sign_in_screen(accounts: Database) -> None:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT_S).run()
    assert not at.exception
    links = [h.proto.body for h in at.get("html")]
    assert len(links) == 1 and links[0].startswith('<a href="/auth/login?next=') and links[0].endswith(">Sign in</a>")
    assert not at.sidebar.text  # no model, no job, no navigation for strangers


def test_a_labeller_sees_who_is_signed_in_and_no_retrain_button(accounts: Database) -> None:
    at = run_page("pages/train.py", session={"signed_in_account": "lea"})
    assert not at.exception
    assert "Signed in as lea (labeller)" in [t.value for t in at.sidebar.text]
    assert not [b for b in at.button if b.label.startswith("Retrain")]
    assert any("Retraining needs a trainer account" in c.value for c in at.caption)


def test_a_trainer_gets_the_retrain_button(accounts: Database) -> None:
    at = run_page("pages/train.py", session={"signed_in_account": "tim"})
    assert [b.label for b in at.button if b.label.startswith("Retrain")] == ["Retrain (quick)"]


@pytest.mark.parametrize(
    ("page", "name", "refused"),
    [
        ("pages/upload.py", "vic", True),
        ("pages/review.py", "vic", True),
        ("pages/upload.py", "lea", False),
        ("pages/categories.py", "tim", True),
        ("pages/duplicates.py", "lea", True),
        ("pages/categories.py", "ada", False),
    ],
)
def test_pages_a_role_cannot_use_say_so(accounts: Database, page: str, name: str, refused: bool) -> None:
    at = run_page(page, session={"signed_in_account": name})
    assert not at.exception
    said = any("This page is for accounts that may" in i.value for i in at.info)
    assert said is refused


def test_a_disabled_account_is_signed_out_at_its_next_click(accounts: Database) -> None:
    at = run_page("pages/home.py", session={"signed_in_account": "lea"}).run()
    assert "Signed in as lea (labeller)" in [t.value for t in at.sidebar.text]
    auth.disable_account(accounts, "lea", actor="ada")
    at.run()
    assert [h.proto.body.rsplit(">", 2)[1] for h in at.get("html")] == ["Sign in</a"]


def test_an_admin_adds_an_account_and_creates_a_token_shown_once(accounts: Database) -> None:
    at = run_page("pages/accounts.py", session={"signed_in_account": "ada"})
    assert not at.exception
    at.text_input[0].input("[bo](evil.example)")
    at.selectbox[0].select("trainer")
    at.text_input[1].input("a long password")
    at.button[0].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert ("[bo](evil.example)", auth.Role.TRAINER) in [(a.name, a.role) for a in auth.list_accounts(accounts)]
    at.run()  # AppTest: a click whose handler called st.rerun needs one plain run before the next click
    form = next(t for t in at.text_input if "What the token is for" in t.label)
    form.input("shop")
    next(b for b in at.button if b.label == "Create token").click().run()
    secret = at.code[0].value
    assert auth.token_principal(accounts, secret) == auth.Principal("shop", auth.Role.VIEWER, is_token=True)
    at.run()
    assert not at.code  # shown once
    with accounts.read() as session:
        assert auth.principal_of(session, "token:shop") is not None
    assert {(a.actor, a.subject) for a in auth.recent_actions(accounts)} >= {("ada", "token shop")}


def test_a_trainer_cannot_manage_accounts(accounts: Database) -> None:
    at = run_page("pages/accounts.py", session={"signed_in_account": "tim"})
    assert any("manage accounts and API tokens (admin or higher)" in i.value for i in at.info)
