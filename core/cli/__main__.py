"""`python -m core.cli`."""

import core.cli  # noqa: F401 (registers every command group)
from core.cli.app import app

if __name__ == "__main__":  # the usual guard: a multiprocessing worker may load the main module
    app(prog_name="python -m core.cli")
