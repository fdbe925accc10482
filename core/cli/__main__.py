"""`python -m core.cli`."""

import core.cli  # noqa: F401 (registers every command group)
from core.cli.app import app

app(prog_name="python -m core.cli")
