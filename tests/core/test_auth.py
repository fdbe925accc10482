"""Accounts, roles, sign-in, browser sessions and API tokens (core.auth), and the `users` / `tokens` commands."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

import core.cli  # noqa: F401  (registers every command module on the app)
from core import auth
from core.cli.app import app
from core.db import Database, open_database
from core.jobs.queue import cancel_job, enqueue_training
from core.ml.versions import activate_version
from core.schema import Account, ApiToken, AuditEvent
from core.settings import get_settings
from tests.conftest import ACCOUNT_PASSWORD as PASSWORD

pytestmark = pytest.mark.both_databases

runner = CliRunner()


def test_passwords_are_stored_as_argon2id_hashes_never_as_text(accounts: Database) -> None:
    with accounts.read() as session:
        stored = session.scalars(select(Account.password_hash).where(Account.name == "lea")).one()
    assert stored is not None and stored.startswith("$argon2id$") and PASSWORD not in stored


def test_only_the_first_admin_is_created_without_an_admin(accounts: Database) -> None:
    with pytest.raises(auth.PermissionDenied, match="lea is a labeller and may not manage accounts"):
        auth.add_account(accounts, "eve", "admin", PASSWORD, actor="lea")
    with pytest.raises(auth.PermissionDenied, match="not an enabled account"):
        auth.add_account(accounts, "eve", "viewer", PASSWORD, actor="nobody")
    assert [a.name for a in auth.list_accounts(accounts)] == ["ada", "lea", "tim", "vic"]


def test_each_role_may_do_what_its_rank_allows(accounts: Database) -> None:
    allowed = {
        name: {action for action in auth.Action if _may(accounts, name, action)}
        for name in ("vic", "lea", "tim", "ada")
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


def test_a_labeller_cannot_start_training_or_activate_a_model_through_core(accounts: Database) -> None:
    with pytest.raises(auth.PermissionDenied, match="lea is a labeller and may not start or cancel training"):
        enqueue_training(accounts, "quick", {}, "lea")
    with pytest.raises(auth.PermissionDenied, match="activate or roll back"):
        activate_version(accounts, 1, actor="lea")
    job_id = enqueue_training(accounts, "quick", {}, "tim")
    with pytest.raises(auth.PermissionDenied):
        cancel_job(accounts, job_id, actor="lea")
    cancel_job(accounts, job_id, actor="tim")
    with accounts.read() as session:
        rows = session.execute(select(AuditEvent.actor, AuditEvent.subject, AuditEvent.detail)).all()
    assert ("tim", f"training job {job_id}", {"change": "queue", "mode": "quick"}) in rows
    assert ("tim", f"training job {job_id}", {"change": "cancel"}) in rows


def test_sign_in_checks_the_password_and_the_session_ends_when_the_account_is_disabled(accounts: Database) -> None:
    with pytest.raises(auth.SignInRefused, match="wrong name or password"):
        auth.sign_in(accounts, "lea", "not the password")
    with pytest.raises(auth.SignInRefused, match="wrong name or password"):
        auth.sign_in(accounts, "nobody", PASSWORD)
    secret, who = auth.sign_in(accounts, "lea", PASSWORD, client="10.0.0.7")
    assert who == auth.Principal("lea", auth.Role.LABELLER)
    assert auth.session_principal(accounts, secret) == who
    assert auth.session_principal(accounts, secret + "x") is None
    auth.disable_account(accounts, "lea", actor="ada")
    assert auth.session_principal(accounts, secret) is None
    with pytest.raises(auth.SignInRefused):
        auth.sign_in(accounts, "lea", PASSWORD)
    with pytest.raises(auth.PermissionDenied, match="not an enabled account"):
        auth.authorize(accounts, "lea", auth.Action.LABEL)


def test_a_sign_in_for_an_unknown_name_costs_a_full_password_check_and_signs_nobody_in(accounts: Database) -> None:
    # The written-out hash that unknown names are checked against has the hasher's own parameters (a library whose
    # defaults changed would make unknown names answer faster than real ones), and its password opens nothing.
    assert not auth._HASHER.check_needs_rehash(auth._DUMMY_HASH)
    assert auth._HASHER.verify(auth._DUMMY_HASH, "not-a-password-of-anyone")
    with pytest.raises(auth.SignInRefused, match="wrong name or password"):
        auth.sign_in(accounts, "nobody", "not-a-password-of-anyone")


def test_repeated_failures_lock_the_name_out_even_with_the_right_password(accounts: Database) -> None:
    for _ in range(accounts.settings.login_max_failures):
        with pytest.raises(auth.SignInRefused, match="wrong name or password"):
            auth.sign_in(accounts, "tim", "guess", client="10.0.0.9")
    with pytest.raises(auth.SignInRefused, match="too many failed sign-ins for 'tim'"):
        auth.sign_in(accounts, "tim", PASSWORD, client="10.0.0.10")
    assert auth.sign_in(accounts, "lea", PASSWORD)[1].name == "lea"  # other names are not locked


def test_a_session_expires(accounts: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accounts.settings, "session_hours", 1e-9)
    secret, _ = auth.sign_in(accounts, "vic", PASSWORD)
    assert auth.session_principal(accounts, secret) is None
    auth.end_session(accounts, secret)


def test_tokens_are_hashed_scoped_and_revocable(accounts: Database) -> None:
    _, secret = auth.create_token(accounts, "shop", "labeller", actor="ada")
    with accounts.read() as session:
        stored = session.scalars(select(ApiToken.token_hash)).one()
    assert secret not in stored and len(stored) == 64
    who = auth.token_principal(accounts, secret)
    assert who == auth.Principal("shop", auth.Role.LABELLER, is_token=True) and who.actor == "token:shop"
    assert auth.list_tokens(accounts)[0].last_used_at is not None
    auth.authorize(accounts, who.actor, auth.Action.UPLOAD)
    with pytest.raises(auth.PermissionDenied, match="token:shop is a labeller"):
        auth.authorize(accounts, who.actor, auth.Action.TRAIN)
    assert auth.token_principal(accounts, "pct_made-up") is None
    auth.revoke_token(accounts, "shop", actor="ada")
    assert auth.token_principal(accounts, secret) is None
    with pytest.raises(auth.PermissionDenied):
        auth.authorize(accounts, "token:shop", auth.Action.UPLOAD)
    with pytest.raises(auth.PermissionDenied, match="lea is a labeller and may not manage"):
        auth.create_token(accounts, "mine", "admin", actor="lea")


def test_account_and_token_changes_leave_audit_rows_naming_the_admin(accounts: Database) -> None:
    auth.set_role(accounts, "vic", "labeller", actor="ada")
    auth.create_token(accounts, "shop", "viewer", actor="ada")
    with accounts.read() as session:
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
