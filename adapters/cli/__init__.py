"""The `snaptree` command line: builds command values and hands them to the service's handler.

Each module adds one group of commands to `main` (adapters/cli/app.py), imported when that
command runs (`COMMANDS`); `load_all()` imports every one.
"""

from adapters.cli.app import COMMANDS, load_all, main

__all__ = ["COMMANDS", "load_all", "main"]
