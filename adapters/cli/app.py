"""The `snaptree` command group, its global options, and running one request through the
service (the same handler the Python API and the queue use; service/handlers.py).

Imports stay light here: each top-level command's module is imported only when that command
runs (COMMANDS), and the service, the store and QEMU when it needs them, so `snaptree --help`
and `snaptree tree VM` pay only for what they use (tests/test_cli_imports.py).
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

import click

from adapters.cli.output import emit, fail, progress_printer

if TYPE_CHECKING:
    from adapters.storage import DataDir
    from domain.commands import Command, Query
    from service.api import Service
    from service.results import Result


class Ctx:
    def __init__(self, home: str | None, host: str | None) -> None:
        self.home = home
        self.host = host
        self._data: DataDir | None = None
        self._service: Service | None = None

    @property
    def data(self) -> DataDir:
        if self._data is None:
            from adapters.storage import DataDir

            self._data = DataDir.open(self.home)
            if self._data.tightened:
                click.echo(f"snaptree: note: {self._data.root} was readable by others;"
                           " made it 0700", err=True)
        return self._data

    @property
    def service(self) -> Service:
        if self._service is None:
            from service.bootstrap import open_service

            self._service = open_service(str(self.data.root), self.host)
        return self._service

    def run(self, request: Command | Query, as_json: bool, *, wait: bool = True) -> Result:
        """Handle `request` and print its result (JSON, or the one-line summary)."""
        progress = progress_printer(not as_json and sys.stderr.isatty())
        result = self.service.handle(request, wait=wait, progress=progress)
        emit(result.json(), as_json, result.text())
        return result


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised where the program is, so that cleanup (children killed, QMP
    connections closed) runs on the way out. Not KeyboardInterrupt: click would print for it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


INTERRUPTED = ("interrupted; the work stopped where it was, as after a crash: run the command"
               " again (or `snaptree worker run`) to finish it")


# Each top-level command: the modules that define it and its subcommands, and the first
# paragraph of its help, which is all `snaptree --help` lists (tests/test_cli_imports.py checks
# this table against the commands themselves).
COMMANDS: dict[str, tuple[tuple[str, ...], str]] = {
    "audit": (("adapters.cli.audit",), "Audit a VM's history and files."),
    "merge": (("adapters.cli.tree",),
              "Merge hidden NODE now (retry a failed merge, or --force one with 2+ dependents)."),
    "merges": (("adapters.cli.tree",),
               "List hidden nodes and merges in flight, with what blocks each and what it would cost."),
    "projections": (("adapters.cli.audit",),
                    "Read models kept from the event log: tree, pending merges, audit timeline."),
    "queue": (("adapters.cli.queue",), "Inspect the scale-out queues."),
    "serve": (("adapters.cli.queue",), "Relay, command consumer and this host's workers (scale-out mode)."),
    "snapshot": (("adapters.cli.snapshot",), "Take, apply, delete, rename and revert snapshots."),
    "submit": (("adapters.cli.queue",),
               "Submit COMMAND (e.g. snapshot.take) for VM to the commands stream and wait for it."),
    "tree": (("adapters.cli.tree",),
             "Show VM's snapshot tree: which file gets the writes, which are frozen, pending merges."),
    "vm": (("adapters.cli.vm", "adapters.cli.bundle", "adapters.cli.console"),
           "Register VMs, start and stop them, change their settings."),
    "work": (("adapters.cli.worker",), "Failed host work: run it again, or roll it back."),
    "worker": (("adapters.cli.worker", "adapters.cli.queue"), "Run the worker that performs the disk work."),
}


def load(name: str) -> None:
    """Import the modules that define top-level command `name`."""
    from adapters.cli.dataclass_cache import install

    install()  # before the first dataclass of the domain is made
    for module in COMMANDS[name][0]:
        importlib.import_module(module)


def load_all() -> None:
    for name in COMMANDS:
        load(name)


class SnaptreeGroup(click.Group):
    """Click's own usage errors follow the same contract: one line, exit 2, JSON on request.
    SIGINT and SIGTERM stop the child processes, print one line and exit 130 / 143.

    Commands are loaded on first use (COMMANDS); the help listing uses the table's summaries
    for the ones not loaded."""

    _listing = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            if self._listing:
                return click.Command(cmd_name, help=COMMANDS[cmd_name][1])
            load(cmd_name)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_commands(ctx, formatter)
        finally:
            self._listing = False

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        import os
        import signal

        kwargs["standalone_mode"] = False
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)
        os.umask(0o077)  # every file snaptree and its children make is the owner's only
        try:
            return super().main(*args, **kwargs)
        except (click.exceptions.Abort, KeyboardInterrupt):
            fail(130, "interrupted", INTERRUPTED, "--json" in sys.argv[1:])
        except Interrupted as stop:
            if stop.signum == signal.SIGTERM:
                fail(143, "terminated", INTERRUPTED.replace("interrupted", "terminated", 1), "--json" in sys.argv[1:])
            fail(130, "interrupted", INTERRUPTED, "--json" in sys.argv[1:])
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            fail(2, "usage", exc.format_message(), "--json" in sys.argv[1:])


@click.group(cls=SnaptreeGroup)
@click.option("--home", envvar="SNAPTREE_HOME", help="Data directory (default: per-user data dir).")
@click.option("--host", envvar="SNAPTREE_HOST", help="This host's name (default: hostname).")
@click.option("-v", "--verbose", is_flag=True, help="Log what the worker does on stderr.")
@click.version_option(package_name="snaptree")
@click.pass_context
def main(click_ctx: click.Context, home: str | None, host: str | None, verbose: bool) -> None:
    """Live snapshot trees for QEMU VMs, with Hyper-V checkpoint semantics."""
    import logging

    if verbose:
        logging.basicConfig(level=logging.INFO, format="snaptree: %(message)s")
    else:
        logging.getLogger().addHandler(logging.NullHandler())  # errors reach the user once
    click_ctx.obj = Ctx(home, host)


def arg_help(cls: type, name: str) -> str:
    """A command field's help text (domain/commands.py), for `--help`."""
    import dataclasses

    for f in dataclasses.fields(cls):
        if f.name == name:
            return str(f.metadata.get("help", ""))
    raise KeyError(f"{cls.__name__} has no field {name}")
