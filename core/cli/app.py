"""The typer application behind `python -m core.cli`, its sub-command groups, and helpers every command module shares.

Commands register on `app` (or on `categories_app`, `export_app`, `models_app`) from the modules of `core/cli/`
(imported by `core/cli/__init__.py`).
Every command registered through these objects turns a `ProdcatError`, and a database or disk failure
(`core.errors.as_storage_error`: locked, read-only, full...), into a red one-line message and exit code 1 (the full
error goes to logs/cli.log); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import getpass
import json
import os
import traceback
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from core.db import Database, open_database
from core.errors import ProdcatError, as_storage_error
from core.settings import get_settings

F = TypeVar("F", bound=Callable[..., Any])
CLI_LOG = "cli.log"  # in the data directory's logs/: the full text of database and disk errors the CLI reported


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `message` in red on stderr and return the Exit to raise (`raise fail("...")`)."""
    typer.secho(f"Error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _friendly_errors(func: F) -> F:
    @functools.wraps(func)  # typer reads the signature through __wrapped__
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ProdcatError as exc:
            raise fail(str(exc)) from None
        except Exception as exc:
            refusal = as_storage_error(exc)
            if refusal is None:  # a bug: keep its traceback
                raise
            where = _log_details(exc)
            raise fail(f"{refusal} (details in {where})" if where else str(refusal)) from None

    return wrapper  # type: ignore[return-value]  # functools.wraps: same call signature as func (F)


def _log_details(exc: BaseException) -> str:
    """Append the full error (SQL, parameters, traceback) to logs/cli.log in the data directory, for whoever looks
    into it; returns that place as the person may read it ("" when it could not be written: a full or read-only
    disk may refuse it too)."""
    try:
        settings = get_settings()
        settings.logs_dir.mkdir(parents=True, exist_ok=True)
        with open(settings.logs_dir / CLI_LOG, "a", encoding="utf-8") as log_file:
            log_file.write(f"--- {datetime.now().astimezone():%Y-%m-%d %H:%M:%S %z}\n")
            log_file.write("".join(traceback.format_exception(exc)))
    except Exception:
        return ""
    return f"the data directory's logs/{CLI_LOG}"


class ProdcatTyper(typer.Typer):
    """A Typer whose commands report `ProdcatError`s as a red message with exit code 1 instead of a traceback."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[F], F]:
        register = super().command(*args, **kwargs)

        def decorator(func: F) -> F:
            register(_friendly_errors(func))
            return func

        return decorator


def command_group(help_text: str) -> ProdcatTyper:
    return ProdcatTyper(
        help=help_text,
        no_args_is_help=True,
        rich_markup_mode="markdown",  # docstrings wrap as paragraphs; `code` renders as code
        add_completion=False,
        pretty_exceptions_show_locals=False,  # locals can hold paths and settings; keep tracebacks short
    )


app = command_group(
    "prodcat: product-photo catalogue with labels, audit trail and retraining.\n\n"
    "Settings come from PRODCAT_* environment variables (PRODCAT_DATA_DIR picks the data folder)."
)
categories_app = command_group("List, add, rename, merge, archive, un-archive and delete categories.")
export_app = command_group("Export labels as a CSV or the labelled originals as an ImageFolder tree.")
models_app = command_group("Model versions: list and activate (rollback = activate an older one).")
app.add_typer(categories_app, name="categories")
app.add_typer(export_app, name="export")
app.add_typer(models_app, name="models")


def open_db() -> Database:
    """The database named by the current settings (PRODCAT_DATA_DIR / PRODCAT_DATABASE_URL), migrated."""
    return open_database(get_settings())


def default_actor() -> str:
    """Who a change is recorded as when --actor is not given: the configured default_actor if one was set
    (PRODCAT_DEFAULT_ACTOR or .env), else $USER, else the built-in default."""
    settings = get_settings()
    if "default_actor" in settings.model_fields_set:
        return settings.default_actor
    try:
        user = os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = ""
    return user or settings.default_actor


def actor_or_default(actor: str | None) -> str:
    """The --actor value, or the default actor."""
    return actor.strip() if actor and actor.strip() else default_actor()


def _to_jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _to_jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return value


def print_json(value: Any) -> None:
    """Print dataclasses, dicts, lists, datetimes and paths as indented JSON on stdout (for scripts and jq)."""
    typer.echo(json.dumps(_to_jsonable(value), indent=2, ensure_ascii=False, default=str))


# Shared option types: `actor: ActorOpt = None`, `as_json: JsonOpt = False`.
ActorOpt = Annotated[
    str | None, typer.Option("--actor", help="Who makes the change, for the audit trail. Default: $USER.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")]
