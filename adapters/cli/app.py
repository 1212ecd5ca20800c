"""The `snaptree` command group, its global options, and running one request through the
service (the same handler the Python API and the queue use; service/handlers.py).

Imports stay light here: the service, the store and QEMU are loaded when a command runs, so
`snaptree --help` does not pay for them.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

import click

from adapters.cli.output import emit, fail, progress_printer

if TYPE_CHECKING:
    from domain.commands import Command, Query
    from service.api import Service
    from service.results import Result


class Ctx:
    def __init__(self, home: str | None, host: str | None) -> None:
        self.home = home
        self.host = host
        self._service: Service | None = None

    @property
    def service(self) -> Service:
        if self._service is None:
            from service.bootstrap import open_service

            self._service = open_service(self.home, self.host)
            if self._service.data.tightened:
                click.echo(f"snaptree: note: {self._service.data.root} was readable by others;"
                           " made it 0700", err=True)
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


class SnaptreeGroup(click.Group):
    """Click's own usage errors follow the same contract: one line, exit 2, JSON on request.
    SIGINT and SIGTERM stop the child processes, print one line and exit 130 / 143."""

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
