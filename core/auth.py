"""Who may do what: accounts with roles, bearer tokens for other systems, browser sessions, rate-limited sign-in,
and `authorize`, which every state-changing core function calls before it changes anything.

An actor is a name: an account's name, or `token:<name>` for an API token. With `PRODCAT_AUTH=none` (a
single-person laptop) every actor may do everything and nothing is looked up; the audit rows still name the actor.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from core.db import Database
from core.errors import NotFound, ProdcatError
from core.schema import Account, ApiToken, AuditEvent, LoginAttempt, WebSession, utcnow

TOKEN_PREFIX = "token:"  # noqa: S105 (a name prefix, not a secret)
MAX_NAME = 200
MIN_PASSWORD = 8
_HASHER = PasswordHasher()  # argon2id with the library's memory-hard defaults (64 MiB, 3 passes)
# Verifying against this keeps a sign-in for an unknown name as slow as one for a real account. Written out, not
# computed when the module is imported: that cost every command and import worker process 0.1 s of CPU. Its
# parameters are the hasher's (tests/core/test_auth.py); no account can have it, and it signs nobody in.
_DUMMY_HASH = "$argon2id$v=19$m=65536,t=3,p=4$oc4gB6GsYTWB2pTggGEFbA$PKwqt4t90iqQ+jqxWxdaxerr31ZcR4F6fz0iYZp8tuc"


class Role(enum.StrEnum):
    """What an account or token may do; each role may do everything the ones before it may."""

    VIEWER = "viewer"  # look at everything
    LABELLER = "labeller"  # upload, label, undo own changes, add a category while labelling
    TRAINER = "trainer"  # retrain, cancel jobs, activate or roll back model versions
    ADMIN = "admin"  # categories, images, users, tokens, exports, server folders, weights

    @property
    def rank(self) -> int:
        return list(Role).index(self)

    def allows(self, action: Action) -> bool:
        return self.rank >= action.role.rank


class Action(enum.Enum):
    """Every state-changing action, the least role that may do it, and how a refusal names it."""

    UPLOAD = ("upload", Role.LABELLER, "upload or import photos")
    LABEL = ("label", Role.LABELLER, "label photos")
    ADD_CATEGORY = ("add_category", Role.LABELLER, "add categories")
    TRAIN = ("train", Role.TRAINER, "start or cancel training")
    ACTIVATE = ("activate", Role.TRAINER, "activate or roll back model versions")
    EDIT_CATEGORIES = ("edit_categories", Role.ADMIN, "rename, merge, archive or delete categories")
    DELETE_IMAGES = ("delete_images", Role.ADMIN, "delete images")
    EXPORT = ("export", Role.ADMIN, "export labels, images or models")
    SERVER_FILES = ("server_files", Role.ADMIN, "read or write the server exchange folder")
    WEIGHTS = ("weights", Role.ADMIN, "change the starting weights")
    ACCOUNTS = ("accounts", Role.ADMIN, "manage accounts and API tokens")

    def __init__(self, key: str, role: Role, text: str) -> None:
        self.key = key
        self.role = role
        self.text = text


class PermissionDenied(ProdcatError):
    """The actor's role may not do this (or the actor is no enabled account)."""


class SignInRefused(ProdcatError):
    """Wrong name or password, a disabled account, or too many failed attempts."""


@dataclass(frozen=True)
class Principal:
    """Who is acting: an account or an API token, with its role. `actor` is the name audit rows record."""

    name: str
    role: Role
    is_token: bool = False

    @property
    def actor(self) -> str:
        return f"{TOKEN_PREFIX}{self.name}" if self.is_token else self.name

    def may(self, action: Action) -> bool:
        return self.role.allows(action)


@dataclass(frozen=True)
class AccountView:
    name: str
    role: Role
    disabled: bool
    has_password: bool
    created_at: datetime
    last_login_at: datetime | None


@dataclass(frozen=True)
class TokenView:
    id: int
    name: str
    role: Role
    created_by: str
    created_at: datetime
    last_used_at: datetime | None
    revoked: bool


def auth_enabled(db: Database) -> bool:
    return db.settings.auth != "none"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _clean_name(name: str) -> str:
    cleaned = " ".join((name or "").split())
    if not cleaned:
        raise ProdcatError("an account or token needs a name")
    if len(cleaned) > MAX_NAME:
        raise ProdcatError(f"the name is {len(cleaned)} characters long; at most {MAX_NAME}")
    if ":" in cleaned:
        raise ProdcatError(f"{cleaned!r}: a name may not contain ':'")
    return cleaned


def _role(role: Role | str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise ProdcatError(f"unknown role {role!r}: one of {', '.join(r.value for r in Role)}") from None


# --- authorization -----------------------------------------------------------------------------------------------


def principal_of(session: Session, actor: str) -> Principal | None:
    """The enabled account or unrevoked token `actor` names, or None."""
    if actor.startswith(TOKEN_PREFIX):
        token = session.scalars(
            select(ApiToken).where(ApiToken.name == actor[len(TOKEN_PREFIX) :], ApiToken.revoked_at.is_(None))
        ).first()
        return Principal(token.name, Role(token.role), is_token=True) if token else None
    account = session.scalars(select(Account).where(Account.name == actor, Account.disabled_at.is_(None))).first()
    return Principal(account.name, Role(account.role)) if account else None


def check(session: Session, settings_auth: str, actor: str, action: Action) -> None:
    """Raise PermissionDenied unless `actor` may do `action` (always allowed when sign-in is off)."""
    if settings_auth == "none":
        return
    principal = principal_of(session, actor)
    if principal is None:
        raise PermissionDenied(f"{actor!r} is not an enabled account or token: sign in, or ask an admin")
    if not principal.may(action):
        needed = action.role.value
        kind = "token" if principal.is_token else "account"
        raise PermissionDenied(
            f"{principal.actor} is a {principal.role.value} and may not {action.text}: that needs a {needed} "
            f"(or higher) {kind}"
        )


def authorize(db: Database, actor: str, action: Action) -> None:
    """The one permission check of core: raise PermissionDenied unless `actor` may do `action`."""
    if not auth_enabled(db):
        return
    with db.read() as session:
        check(session, db.settings.auth, actor, action)


def record(session: Session, actor: str, action: Action, subject: str, **detail: Any) -> None:
    """Append an audit row for an action that is not a label change (those are label_events)."""
    session.add(AuditEvent(actor=actor, action=action.key, subject=subject, detail=detail))


@contextmanager
def authorized_write(db: Database, actor: str, action: Action) -> Iterator[Session]:
    """A write transaction that first checks `actor` may do `action` (inside the same transaction)."""
    with db.write() as session:
        check(session, db.settings.auth, actor, action)
        yield session


# --- accounts ----------------------------------------------------------------------------------------------------


def _hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise ProdcatError(f"a password needs at least {MIN_PASSWORD} characters")
    return _HASHER.hash(password)


def _account_view(account: Account) -> AccountView:
    return AccountView(
        name=account.name,
        role=Role(account.role),
        disabled=account.disabled_at is not None,
        has_password=account.password_hash is not None,
        created_at=account.created_at,
        last_login_at=account.last_login_at,
    )


def _get_account(session: Session, name: str) -> Account:
    account = session.scalars(select(Account).where(Account.name == name)).first()
    if account is None:
        raise NotFound(f"no account named {name!r} (see `users list`)")
    return account


def has_admin(db: Database) -> bool:
    with db.read() as session:
        return bool(
            session.scalar(select(func.count()).where(Account.role == Role.ADMIN.value, Account.disabled_at.is_(None)))
        )


def add_account(db: Database, name: str, role: Role | str, password: str | None, *, actor: str) -> AccountView:
    """Create an account. The very first admin needs no actor with rights (set-up); after that, an admin adds."""
    name, role = _clean_name(name), _role(role)
    password_hash = _hash_password(password) if password is not None else None
    bootstrap = not has_admin(db) and role is Role.ADMIN
    with db.write() as session:
        if not bootstrap:
            check(session, db.settings.auth, actor, Action.ACCOUNTS)
        if session.scalars(select(Account.id).where(Account.name == name)).first() is not None:
            raise ProdcatError(f"an account named {name!r} exists already")
        account = Account(name=name, role=role.value, password_hash=password_hash)
        session.add(account)
        record(session, actor or name, Action.ACCOUNTS, f"account {name}", change="add", role=role.value)
        session.flush()
        return _account_view(account)


def list_accounts(db: Database) -> list[AccountView]:
    with db.read() as session:
        return [_account_view(a) for a in session.scalars(select(Account).order_by(Account.name))]


def _change_account(db: Database, name: str, *, actor: str, change: str, **values: Any) -> AccountView:
    with db.write() as session:
        check(session, db.settings.auth, actor, Action.ACCOUNTS)
        account = _get_account(session, name)
        for key, value in values.items():
            setattr(account, key, value)
        if change in ("disable", "reset_password"):
            session.execute(delete(WebSession).where(WebSession.account_id == account.id))
        shown = {k: v for k, v in values.items() if k == "role"}
        record(session, actor, Action.ACCOUNTS, f"account {name}", change=change, **shown)
        return _account_view(account)


def set_role(db: Database, name: str, role: Role | str, *, actor: str) -> AccountView:
    return _change_account(db, name, actor=actor, change="set_role", role=_role(role).value)


def disable_account(db: Database, name: str, *, actor: str) -> AccountView:
    """Disable an account: it can no longer sign in or act, its browser sessions end; its audit rows stay."""
    return _change_account(db, name, actor=actor, change="disable", disabled_at=utcnow())


def enable_account(db: Database, name: str, *, actor: str) -> AccountView:
    return _change_account(db, name, actor=actor, change="enable", disabled_at=None)


def reset_password(db: Database, name: str, password: str, *, actor: str) -> AccountView:
    return _change_account(db, name, actor=actor, change="reset_password", password_hash=_hash_password(password))


# --- sign-in and browser sessions ----------------------------------------------------------------------------------


def _failures_since(session: Session, column: Any, value: str, since: datetime) -> int:
    return int(
        session.scalar(
            select(func.count()).where(
                column == value, LoginAttempt.created_at >= since, LoginAttempt.succeeded.is_(False)
            )
        )
        or 0
    )


def _check_rate(session: Session, db: Database, name: str, client: str) -> None:
    settings = db.settings
    since = utcnow() - timedelta(minutes=settings.login_lockout_minutes)
    minutes = f"{settings.login_lockout_minutes:g} minutes"
    if _failures_since(session, LoginAttempt.name, name, since) >= settings.login_max_failures:
        raise SignInRefused(f"too many failed sign-ins for {name!r}: wait {minutes}, or ask an admin")
    if client and _failures_since(session, LoginAttempt.client, client, since) >= 4 * settings.login_max_failures:
        raise SignInRefused(f"too many failed sign-ins from this address: wait {minutes}")


def sign_in(db: Database, name: str, password: str, *, client: str = "") -> tuple[str, Principal]:
    """Check a name and password (rate-limited per name and per client address) and start a browser session.
    Returns the session secret for the cookie (shown nowhere else) and who signed in.

    The hash is checked outside any transaction (argon2 takes tens of milliseconds on purpose), so sign-ins never
    hold the database's write lock while they compute."""
    name = " ".join((name or "").split())[:MAX_NAME]
    client = client[:100]
    with db.read() as session:
        _check_rate(session, db, name, client)
        account = session.execute(
            select(Account.name, Account.role, Account.password_hash, Account.disabled_at).where(Account.name == name)
        ).first()
    stored = account.password_hash if account is not None else None
    try:
        _HASHER.verify(stored or _DUMMY_HASH, password or "")
        ok = stored is not None and account is not None and account.disabled_at is None
    except (VerificationError, InvalidHashError):
        ok = False
    with db.write() as session:
        session.add(LoginAttempt(name=name, client=client, succeeded=ok))
        session.execute(delete(LoginAttempt).where(LoginAttempt.created_at < utcnow() - timedelta(days=1)))
    if not ok or account is None:
        raise SignInRefused("wrong name or password (or the account is disabled)")
    return start_session(db, account.name), Principal(account.name, Role(account.role))


def start_session(db: Database, name: str) -> str:
    """A new browser session for an enabled account (after a password or an OIDC sign-in); returns its secret."""
    secret = secrets.token_urlsafe(32)
    expires = utcnow() + timedelta(hours=db.settings.session_hours)
    with db.write() as session:
        account = session.scalars(select(Account).where(Account.name == name, Account.disabled_at.is_(None))).first()
        if account is None:
            raise SignInRefused(f"{name!r} has no enabled account here: ask an admin to add it")
        account.last_login_at = utcnow()
        session.add(WebSession(token_hash=_digest(secret), account_id=account.id, expires_at=expires))
        session.execute(delete(WebSession).where(WebSession.expires_at < utcnow()))
    return secret


def session_principal(db: Database, secret: str | None) -> Principal | None:
    """Who a browser session belongs to, or None when it is unknown, expired or its account disabled."""
    if not secret:
        return None
    with db.read() as session:
        row = session.execute(
            select(Account.name, Account.role)
            .join(WebSession, WebSession.account_id == Account.id)
            .where(
                WebSession.token_hash == _digest(secret),
                WebSession.expires_at > utcnow(),
                Account.disabled_at.is_(None),
            )
        ).first()
    return Principal(row.name, Role(row.role)) if row else None


def end_session(db: Database, secret: str | None) -> None:
    if secret:
        with db.write() as session:
            session.execute(delete(WebSession).where(WebSession.token_hash == _digest(secret)))


# --- API tokens ----------------------------------------------------------------------------------------------------


def _token_view(token: ApiToken) -> TokenView:
    return TokenView(
        id=token.id,
        name=token.name,
        role=Role(token.role),
        created_by=token.created_by,
        created_at=token.created_at,
        last_used_at=token.last_used_at,
        revoked=token.revoked_at is not None,
    )


def create_token(db: Database, name: str, role: Role | str, *, actor: str) -> tuple[TokenView, str]:
    """A new bearer token scoped to `role`. Returns it and its secret, which is stored only as a hash."""
    name, role = _clean_name(name), _role(role)
    secret = "pct_" + secrets.token_urlsafe(32)
    with db.write() as session:
        check(session, db.settings.auth, actor, Action.ACCOUNTS)
        if session.scalars(select(ApiToken.id).where(ApiToken.name == name)).first() is not None:
            raise ProdcatError(f"a token named {name!r} exists already (revoked tokens keep their name)")
        token = ApiToken(name=name, role=role.value, token_hash=_digest(secret), created_by=actor)
        session.add(token)
        record(session, actor, Action.ACCOUNTS, f"token {name}", change="create", role=role.value)
        session.flush()
        return _token_view(token), secret


def list_tokens(db: Database) -> list[TokenView]:
    with db.read() as session:
        return [_token_view(t) for t in session.scalars(select(ApiToken).order_by(ApiToken.id))]


def revoke_token(db: Database, name: str, *, actor: str) -> TokenView:
    with db.write() as session:
        check(session, db.settings.auth, actor, Action.ACCOUNTS)
        token = session.scalars(select(ApiToken).where(ApiToken.name == name)).first()
        if token is None:
            raise NotFound(f"no token named {name!r} (see `tokens list`)")
        if token.revoked_at is None:
            token.revoked_at = utcnow()
            record(session, actor, Action.ACCOUNTS, f"token {name}", change="revoke")
        return _token_view(token)


def token_principal(db: Database, secret: str | None) -> Principal | None:
    """Who a bearer token speaks for (None: unknown or revoked); records when it was last used."""
    if not secret:
        return None
    digest = _digest(secret)
    with db.read() as session:
        token = session.execute(
            select(ApiToken.id, ApiToken.name, ApiToken.role, ApiToken.last_used_at).where(
                ApiToken.token_hash == digest, ApiToken.revoked_at.is_(None)
            )
        ).first()
    if token is None:
        return None
    now = utcnow()
    if token.last_used_at is None or now - token.last_used_at > timedelta(seconds=60):
        # At most one write a minute per token: a busy API client does not queue behind every other writer.
        with db.write() as session:
            session.execute(update(ApiToken).where(ApiToken.id == token.id).values(last_used_at=now))
    return Principal(token.name, Role(token.role), is_token=True)


# --- the audit of actions that are not label changes ---------------------------------------------------------------


@dataclass(frozen=True)
class AuditView:
    at: datetime
    actor: str
    action: str
    subject: str
    detail: dict[str, Any]


def recent_actions(db: Database, *, limit: int = 100) -> list[AuditView]:
    """The newest rows of `audit_events` (categories, model versions, jobs, weights, accounts, tokens), newest first."""
    with db.read() as session:
        rows = session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit))
        return [AuditView(r.created_at, r.actor, r.action, r.subject, dict(r.detail or {})) for r in rows]
