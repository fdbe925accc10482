"""`python -m core.cli`: loads every command module (core/cli_*.py) onto the shared typer app and runs it."""

from __future__ import annotations

import importlib
import pkgutil

import core
from core.cli_app import app

# Modules written by different people; each registers its commands on core.cli_app.app when imported.
KNOWN_COMMAND_MODULES = ("core.cli_data", "core.cli_model", "core.cli_review", "core.cli_demo")


def command_modules() -> list[str]:
    """The known command modules plus any other core/cli_*.py, in a stable order."""
    found = {
        f"core.{info.name}"
        for info in pkgutil.iter_modules(core.__path__)
        if info.name.startswith("cli_") and info.name != "cli_app"
    }
    return list(KNOWN_COMMAND_MODULES) + sorted(found - set(KNOWN_COMMAND_MODULES))


def load_commands() -> list[str]:
    """Import each command module that exists; returns the names loaded.

    Only a missing module itself is skipped: an import error *inside* a module that exists propagates,
    so a broken command module fails loudly instead of silently vanishing from the CLI.
    """
    loaded = []
    for name in command_modules():
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        loaded.append(name)
    return loaded


load_commands()

if __name__ == "__main__":
    app(prog_name="python -m core.cli")
