"""`python -m core.cli`."""

import core.cli  # noqa: F401 (registers every command group)
from core.cli.app import app

if __name__ == "__main__":  # the usual guard, for any multiprocessing pool that loads the main module
    app(prog_name="python -m core.cli")
