"""The `snaptree` command line: builds command values and hands them to the service's handler.

Each module adds one group of commands to `main` (adapters/cli/app.py).
"""

from adapters.cli import audit, bundle, console, queue, snapshot, tree, vm, worker  # noqa: F401  (register)
from adapters.cli.app import main

__all__ = ["main"]
