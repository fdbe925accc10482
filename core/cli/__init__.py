"""The command line, `python -m core.cli`: one typer app (core.cli.app.app) and a module per command group,
each registering its commands on that app when imported here."""

from core.cli import (
    data,  # noqa: F401
    demo,  # noqa: F401
    duplicates,  # noqa: F401
    images,  # noqa: F401
    jobs,  # noqa: F401
    labels,  # noqa: F401
    model,  # noqa: F401
    review,  # noqa: F401
    users,  # noqa: F401
)
