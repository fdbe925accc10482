"""Accounts, roles, sign-in, browser sessions and API tokens (core.auth), and the `users` / `tokens` commands."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

import core.cli  # noqa: F401  (registers every command module on the app)
from core import auth
from core.cli_app import app
from core.db import Database, open_database
from core.jobs import cancel_job, enqueue_training
from core.schema import Account, ApiToken, AuditEvent
from core.settings import get_settings
from core.versions import activate_version

pytestmark = pytest.mark.both_databases

runner = CliRunner()
PASSWORD = "correct horse battery"


@pytest.fixture
def signed(data_dir: object, monkeypatch: pytest.MonkeyPatch) -> Iterator[Database]:
    """A catalogue with sign-in on and one account per role: ada (admin), tim (trainer), lea (labeller), vic."""
    monkeypatch.setenv("PRODCAT_AUTH", "builtin")
    get_settings.cache_clear()
    db = open_database(get_settings())
    auth.add_account(db, "ada", "admin", PASSWORD, actor="")
    for name, role in (("tim", "trainer"), ("lea", "labeller"), ("vic", "viewer")):
        auth.add_account(db, name, role, PASSWORD, actor="ada")
    yield db


def test_passwords_are_stored_as_argon2id_hashes_never_as_text(signed: Database) -> None:
    with signed.read() as session:
        stored = session.scalars(select(Account.password_hash).where(Account.name == "lea")).one()
    assert stored is not None and stored.startswith("$argon2id$") and PASSWORD not in stored


def test_only_the_first_admin_is_created_without_an_admin(signed: Database) -> None:
    with pytest.raises(auth.PermissionDenied, match="lea is a labeller and may not manage accounts"):
        auth.add_account(signed, "eve", "admin", PASSWORD, actor="lea")
    with pytest.raises(auth.PermissionDenied, match="not an enabled account"):
        auth.add_account(signed, "eve", "viewer", PASSWORD, actor="nobody")
    assert [a.name for a in auth.list_accounts(signed)] == ["ada", "lea", "tim", "vic"]


def test_each_role_may_do_what_its_rank_allows(signed: Database) -> None:
    allowed = {
        name: {action for action in auth.Action if _may(signed, name, action)} for name in ("vic", "lea", "tim", "ada")
    }
    assert allowed["vic"] == set()
    assert allowed["lea"] == {auth.Action.UPLOAD, auth.Action.LABEL, auth.Action.ADD_CATEGORY}
    assert allowed["tim"] == allowed["lea"] | {auth.Action.TRAIN, auth.Action.ACTIVATE}
    assert allowed["ada"] == set(auth.Action)


def _may(db: Database, actor: str, action: auth.Action) -> bool:
    try:
        auth.authorize(db, actor, action)
    except auth.PermissionDenied:
        return False
    return True


def test_a_labeller_cannot_start_training_or_activate_a_model_through_core(signed: Database) -> None:
    with pytest.raises(auth.PermissionDenied, match="lea is a labeller and may not start or cancel training"):
        enqueue_training(signed, "quick", {}, "lea")
    with pytest.raises(auth.PermissionDenied, match="activate or roll back"):
        activate_version(signed, 1, actor="lea")
    job_id = enqueue_training(signed, "quick", {}, "tim")
    with pytest.raises(auth.PermissionDenied):
        cancel_job(signed, job_id, actor="lea")
    cancel_job(signed, job_id, actor="tim")
    with signed.read() as session:
        rows = session.execute(select(AuditEvent.actor, AuditEvent.subject, AuditEvent.detail)).all()
    assert ("tim", f"training job {job_id}", {"change": "queue", "mode": "quick"}) in rows
    assert ("tim", f"training job {job_id}", {"change": "cancel"}) in rows


def test_sign_in_checks_the_password_and_the_session_ends_when_the_account_is_disabled(signed: Database) -> None:
    with pytest.raises(auth.SignInRefused, match="wrong name or password"):
        auth.sign_in(signed, "lea", "not the password")
    with pytest.raises(auth.SignInRefused, match="wrong name or password"):
        auth.sign_in(signed, "nobody", PASSWORD)
    secret, who = auth.sign_in(signed, "lea", PASSWORD, client="10.0.0.7")
    assert who == auth.Principal("lea", auth.Role.LABELLER)
    assert auth.session_principal(signed, secret) == who
    assert auth.session_principal(signed, secret + "x") is None
    auth.disable_account(signed, "lea", actor="ada")
    assert auth.session_principal(signed, secret) is None
    with pytest.raises(auth.SignInRefused):
        auth.sign_in(signed, "lea", PASSWORD)
    with pytest.raises(auth.PermissionDenied, match="not an enabled account"):
        auth.authorize(signed, "lea", auth.Action.LABEL)


def test_repeated_failures_lock_the_name_out_even_with_the_right_password(signed: Database) -> None:
    for _ in range(signed.settings.login_max_failures):
        with pytest.raises(auth.SignInRefused, match="wrong name or password"):
            auth.sign_in(signed, "tim", "guess", client="10.0.0.9")
    with pytest.raises(auth.SignInRefused, match="too many failed sign-ins for 'tim'"):
        auth.sign_in(signed, "tim", PASSWORD, client="10.0.0.10")
    assert auth.sign_in(signed, "lea", PASSWORD)[1].name == "lea"  # other names are not locked


def test_a_session_expires(signed: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(signed.settings, "session_hours", 1e-9)
    secret, _ = auth.sign_in(signed, "vic", PASSWORD)
    assert auth.session_principal(signed, secret) is None
    auth.end_session(signed, secret)


def test_tokens_are_hashed_scoped_and_revocable(signed: Database) -> None:
    _, secret = auth.create_token(signed, "shop", "labeller", actor="ada")
    with signed.read() as session:
        stored = session.scalars(select(ApiToken.token_hash)).one()
    assert secret not in stored and len(stored) == 64
    who = auth.token_principal(signed, secret)
    assert who == auth.Principal("shop", auth.Role.LABELLER, is_token=True) and who.actor == "token:shop"
    assert auth.list_tokens(signed)[0].last_used_at is not None
    auth.authorize(signed, who.actor, auth.Action.UPLOAD)
    with pytest.raises(auth.PermissionDenied, match="token:shop is a labeller"):
        auth.authorize(signed, who.actor, auth.Action.TRAIN)
    assert auth.token_principal(signed, "pct_made-up") is None
    auth.revoke_token(signed, "shop", actor="ada")
    assert auth.token_principal(signed, secret) is None
    with pytest.raises(auth.PermissionDenied):
        auth.authorize(signed, "token:shop", auth.Action.UPLOAD)
    with pytest.raises(auth.PermissionDenied, match="lea is a labeller and may not manage"):
        auth.create_token(signed, "mine", "admin", actor="lea")


def test_account_and_token_changes_leave_audit_rows_naming_the_admin(signed: Database) -> None:
    auth.set_role(signed, "vic", "labeller", actor="ada")
    auth.create_token(signed, "shop", "viewer", actor="ada")
    with signed.read() as session:
        rows = session.execute(select(AuditEvent.actor, AuditEvent.subject, AuditEvent.detail)).all()
    assert ("ada", "account vic", {"change": "set_role", "role": "labeller"}) in rows
    assert ("ada", "token shop", {"change": "create", "role": "viewer"}) in rows


def test_without_sign_in_every_actor_may_do_everything(db: Database) -> None:
    assert db.settings.auth == "none"
    auth.authorize(db, "anyone", auth.Action.ACCOUNTS)


def test_the_cli_creates_the_first_admin_and_a_token_printed_once_as_the_last_line(
    data_dir: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRODCAT_AUTH", "builtin")
    get_settings.cache_clear()
    added = runner.invoke(app, ["users", "add", "ada", "--role", "admin", "--password-stdin"], input=PASSWORD + "\n")
    assert added.exit_code == 0, added.output
    short = runner.invoke(app, ["users", "add", "bob", "--password-stdin", "--actor", "ada"], input="short\n")
    assert short.exit_code == 1 and "at least 8 characters" in short.output
    refused = runner.invoke(app, ["tokens", "create", "shop", "--role", "labeller", "--actor", "mallory"])
    assert refused.exit_code == 1 and "'mallory' is not an enabled account" in refused.output
    created = runner.invoke(app, ["tokens", "create", "shop", "--role", "labeller", "--actor", "ada"])
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip().splitlines()[-1]
    db = open_database(get_settings())
    assert auth.token_principal(db, secret) == auth.Principal("shop", auth.Role.LABELLER, is_token=True)
    listed = runner.invoke(app, ["tokens", "list"])
    assert "shop\tlabeller\tactive\tby ada" in listed.output and secret not in listed.output
    assert runner.invoke(app, ["tokens", "revoke", "shop", "--actor", "ada"]).exit_code == 0
    assert auth.token_principal(db, secret) is None
    assert "ada\tadmin\tenabled\tpassword" in runner.invoke(app, ["users", "list"]).output


def test_users_setup_without_a_terminal_says_how_to_create_the_first_admin(
    data_dir: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRODCAT_AUTH", "builtin")
    get_settings.cache_clear()
    result = runner.invoke(app, ["users", "setup"])
    assert result.exit_code == 0 and "users add NAME --role admin" in result.output
    assert auth.list_accounts(open_database(get_settings())) == []
