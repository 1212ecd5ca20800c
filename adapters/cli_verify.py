"""`snaptree audit verify VM`: the tree from the events against the disk (adapters/audit_verify.py).

Exit status 1 when there is any finding, 0 when clean; `--json` gives
`{"vm", "clean", "findings": [{"kind", "node", "disk", "path", "message"}], "notes": [...]}`
(notes — files pending removal, overlays being created — never make a VM unclean).
"""

from __future__ import annotations

import sys
from types import ModuleType

import click

from adapters.audit_verify import verify


def cli_module(main: click.Group) -> ModuleType:
    """The CLI module that owns `main`: under `python -m adapters.cli` it is `__main__`, and
    importing `adapters.cli` again would build (and register extensions on) a second copy."""
    assert main.callback is not None
    return sys.modules[main.callback.__module__]


def audit_group(main: click.Group) -> click.Group:
    """The `audit` group, shared with the other audit commands whichever module registers first."""
    found = main.commands.get("audit")
    if isinstance(found, click.Group):
        return found
    group = click.Group("audit", help="Audit a VM's history and files.")
    main.add_command(group)
    return group


def register(main: click.Group) -> None:
    cli = cli_module(main)

    @audit_group(main).command("verify")
    @click.argument("vm_name", metavar="VM")
    @cli.command
    def audit_verify(ctx: cli.Ctx, vm_name: str, as_json: bool) -> None:  # type: ignore[name-defined]
        """Compare VM's tree (from its events) with its files; exit 1 on any finding."""
        report = verify(ctx.service.app, ctx.service.data, vm_name)
        if as_json:
            cli.emit(report.to_json(), True)
        else:
            for f in report.findings:
                click.echo(f.line())
            for n in report.notes:
                click.echo(f"note: {n.line()}", err=True)
            if report.clean:
                click.echo(f"VM {vm_name}: clean ({len(report.notes)} note(s))")
        if not report.clean:
            sys.exit(1)
