"""Account and token commands: `users add|list|set-role|disable|enable|reset-password`, `tokens create|list|revoke`.

The CLI acts as a named local account (`--actor`, else PRODCAT_DEFAULT_ACTOR, else $USER): with sign-in on, that
account needs the admin role for these commands, except `users add ... --role admin` while no admin exists (set-up).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from core import auth
from core.cli.app import (
    ActorOpt,
    JsonOpt,
    actor_or_default,
    app,
    command_group,
    default_actor,
    fail,
    open_db,
    print_json,
)

users_app = command_group("Accounts that sign in to the pages, with a role each: viewer, labeller, trainer, admin.")
tokens_app = command_group("Bearer tokens for other systems calling the HTTP API (/api/v1/), each scoped to a role.")
app.add_typer(users_app, name="users")
app.add_typer(tokens_app, name="tokens")

NameArg = Annotated[str, typer.Argument(help="Account name (an e-mail address for OIDC sign-in).")]
RoleOpt = Annotated[auth.Role, typer.Option("--role", help="What the account may do.", case_sensitive=False)]
PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from the first line of standard input.")
]
NoPassword = Annotated[
    bool, typer.Option("--no-password", help="No password: the account signs in only through OIDC (st.login).")
]


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    if len(password) < auth.MIN_PASSWORD:
        raise fail(f"a password needs at least {auth.MIN_PASSWORD} characters")
    return password


def _show_account(view: auth.AccountView) -> str:
    state = "disabled" if view.disabled else "enabled"
    login = view.last_login_at.isoformat(timespec="seconds") if view.last_login_at else "never"
    kind = "password" if view.has_password else "OIDC only"
    return f"{view.name}\t{view.role.value}\t{state}\t{kind}\tlast sign-in {login}"


@users_app.command("add")
def users_add(
    name: NameArg,
    role: RoleOpt = auth.Role.LABELLER,
    password_stdin: PasswordStdin = False,
    no_password: NoPassword = False,
    actor: ActorOpt = None,
) -> None:
    """Add an account. The first admin is created this way at set-up (no admin needed yet)."""
    password = None if no_password else _read_password(password_stdin)
    view = auth.add_account(open_db(), name, role, password, actor=actor_or_default(actor))
    typer.echo(f"added {view.name} ({view.role.value})")


@users_app.command("setup")
def users_setup() -> None:
    """First run: with sign-in on and no admin yet, create one (asks for a name, default $USER, and a password).
    Does nothing when an admin exists or sign-in is off; without a terminal it only says what to run."""
    db = open_db()
    if not auth.auth_enabled(db) or auth.has_admin(db):
        return
    if not sys.stdin.isatty():
        typer.echo("No admin account yet: create one with `python -m core.cli users add NAME --role admin`.", err=True)
        return
    typer.echo("No admin account yet: create the first one (it signs in to the pages and adds the others).")
    name = typer.prompt("Name", default=default_actor())
    view = auth.add_account(db, name, auth.Role.ADMIN, _read_password(False), actor=name)
    typer.echo(f"added {view.name} (admin)")


@users_app.command("list")
def users_list(as_json: JsonOpt = False) -> None:
    """Every account: name, role, enabled or disabled, how it signs in, last sign-in."""
    views = auth.list_accounts(open_db())
    if as_json:
        print_json(views)
        return
    for view in views:
        typer.echo(_show_account(view))
    if not views:
        typer.echo("no accounts yet: add the first admin with `python -m core.cli users add NAME --role admin`")


@users_app.command("set-role")
def users_set_role(name: NameArg, role: RoleOpt, actor: ActorOpt = None) -> None:
    """Change an account's role."""
    view = auth.set_role(open_db(), name, role, actor=actor_or_default(actor))
    typer.echo(f"{view.name} is now {view.role.value}")


@users_app.command("disable")
def users_disable(name: NameArg, actor: ActorOpt = None) -> None:
    """Disable an account: it cannot sign in or act, its browser sessions end. Its audit rows stay."""
    view = auth.disable_account(open_db(), name, actor=actor_or_default(actor))
    typer.echo(f"{view.name} is disabled")


@users_app.command("enable")
def users_enable(name: NameArg, actor: ActorOpt = None) -> None:
    """Enable a disabled account again."""
    view = auth.enable_account(open_db(), name, actor=actor_or_default(actor))
    typer.echo(f"{view.name} is enabled")


@users_app.command("reset-password")
def users_reset_password(name: NameArg, password_stdin: PasswordStdin = False, actor: ActorOpt = None) -> None:
    """Set a new password (its browser sessions end)."""
    view = auth.reset_password(open_db(), name, _read_password(password_stdin), actor=actor_or_default(actor))
    typer.echo(f"new password set for {view.name}")


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Argument(help="What the token is for, e.g. shop-upload-pipeline.")],
    role: RoleOpt = auth.Role.VIEWER,
    actor: ActorOpt = None,
) -> None:
    """Create a token and print it once, as the last line: it is stored only as a hash."""
    view, secret = auth.create_token(open_db(), name, role, actor=actor_or_default(actor))
    typer.echo(f"token {view.name} ({view.role.value}) created; it is shown once, keep it now:", err=True)
    typer.echo(secret)


@tokens_app.command("list")
def tokens_list(as_json: JsonOpt = False) -> None:
    """Every token: name, role, who created it, when it was last used, revoked or not (never the secret)."""
    views = auth.list_tokens(open_db())
    if as_json:
        print_json(views)
        return
    for view in views:
        used = view.last_used_at.isoformat(timespec="seconds") if view.last_used_at else "never"
        state = "revoked" if view.revoked else "active"
        typer.echo(f"{view.name}\t{view.role.value}\t{state}\tby {view.created_by}\tlast used {used}")
    if not views:
        typer.echo("no tokens")


@tokens_app.command("revoke")
def tokens_revoke(
    name: Annotated[str, typer.Argument(help="Token name (see `tokens list`).")], actor: ActorOpt = None
) -> None:
    """Revoke a token: requests with it are refused from now on."""
    view = auth.revoke_token(open_db(), name, actor=actor_or_default(actor))
    typer.echo(f"token {view.name} revoked")
