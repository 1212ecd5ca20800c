"""`snaptree projections rebuild|update|status` and `snaptree audit log|replay|export|verify`.

Same error contract as every command: exit 2 for refused input (unknown VM, a version out of
range, a time that is not ISO 8601 or before the VM existed), 1 for a failure while doing it;
`audit verify` exits 1 when it has any finding.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from adapters.cli.app import Ctx, main
from adapters.cli.output import command, emit
from domain import commands as c
from domain.errors import Refused


@main.group("projections")
def projections() -> None:
    """Read models kept from the event log: tree, pending merges, audit timeline."""


@projections.command("update")
@command
def projections_update(ctx: Ctx, as_json: bool) -> None:
    """Catch the views up with the event log."""
    _run(ctx, as_json, rebuild=False)


@projections.command("rebuild")
@command
def projections_rebuild(ctx: Ctx, as_json: bool) -> None:
    """Empty the views and rebuild them from the first event (same rows as before)."""
    _run(ctx, as_json, rebuild=True)


@projections.command("status")
@command
def projections_status(ctx: Ctx, as_json: bool) -> None:
    """Where the views stand in the event log."""
    from projections.read import runner_for

    app = ctx.service.app
    position = runner_for(app).position
    head = app.recorder.max_notification_id() or 0
    data = {"position": position, "head": head, "behind": max(head - position, 0)}
    emit(data, as_json, f"views at notification {position} of {head}")


def _run(ctx: Ctx, as_json: bool, *, rebuild: bool) -> None:
    from projections.read import runner_for

    runner = runner_for(ctx.service.app)
    started = time.perf_counter()
    events = runner.rebuild() if rebuild else runner.update()
    seconds = round(time.perf_counter() - started, 3)
    data = {"position": runner.position, "events": events, "seconds": seconds}
    verb = "rebuilt from" if rebuild else "projected"
    emit(data, as_json, f"{verb} {events} events in {seconds} s; views at notification {runner.position}")


@main.group("audit")
def audit() -> None:
    """Audit a VM's history and files."""


@audit.command("log")
@click.argument("vm", metavar="VM")
@command
def audit_log(ctx: Ctx, vm: str, as_json: bool) -> None:
    """Every event of VM: time, version, type, request id and a one-line summary."""
    ctx.run(c.GetAuditLog(vm), as_json)


@audit.command("replay")
@click.argument("vm_name", metavar="VM")
@click.option("--at-version", type=int, metavar="N", help="Right after the VM's event number N.")
@click.option("--at-time", metavar="ISO-8601", help="As it was at this time (no zone: UTC).")
@click.option("--events-only", is_flag=True,
              help="Fold every event from the registration; ignore aggregate snapshots.")
@command
def audit_replay(ctx: Ctx, vm_name: str, at_version: int | None, at_time: str | None,
                 events_only: bool, as_json: bool) -> None:
    """VM's tree as it was, from its events alone (`tree --json` format, no disk reads)."""
    from adapters.cli.tree import render_tree
    from projections.replay import parse_time, tree_at, version_at_time, vm_at
    from projections.tree_view import tree_json

    app = ctx.service.app
    if (at_version is None) == (at_time is None):
        raise Refused("give exactly one of --at-version N and --at-time ISO-8601")
    version = at_version if at_version is not None else version_at_time(app, vm_name, parse_time(at_time or ""))
    if as_json:
        emit(tree_at(app, vm_name, version, events_only=events_only), True)
        return
    agg = vm_at(app, vm_name, version, events_only=events_only)
    click.echo(f"VM {vm_name} at version {version} of its history ({_iso(agg.modified_on)})")
    doc = tree_json(agg)
    for n in doc["nodes"]:
        if "merge" in n and n["merge"]["bytes"] is None:
            n["merge"]["bytes"] = "?"  # a disk fact; the events alone do not say
    from rich.console import Console

    Console().print(render_tree(doc, agg.host))


@audit.command("export")
@click.argument("vm_name", metavar="VM")
@click.option("--format", "fmt", type=click.Choice(("jsonl", "msgpack")), default="jsonl",
              show_default=True, help="JSON lines, or a stream of msgpack maps.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to FILE (default: standard output).")
@command
def audit_export(ctx: Ctx, vm_name: str, fmt: str, output: Path | None, as_json: bool) -> None:
    """Every event of VM with its type, version, time and fields, for external tools."""
    from projections import records

    app = ctx.service.app
    app.get_vm(vm_name)  # refuses an unknown VM before anything is written
    rows = records.event_records(app, vm_name)
    if output is None:
        try:
            records.write(rows, sys.stdout.buffer, fmt)
            sys.stdout.buffer.flush()
        except BrokenPipeError:  # the reader stopped early (`| head`): not our failure
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    tmp = output.with_name(output.name + ".part")
    with open(tmp, "wb") as out:  # a reader never sees half a file under the final name
        count = records.write(rows, out, fmt)
    os.replace(tmp, output)
    click.echo(f"exported {count} events of VM {vm_name} to {output}", err=True)


@audit.command("verify")
@click.argument("vm_name", metavar="VM")
@click.option("--deep", is_flag=True,
              help="also run qemu-img check on every layer: finds leaked clusters; slower")
@command
def audit_verify(ctx: Ctx, vm_name: str, deep: bool, as_json: bool) -> None:
    """Compare VM's tree (from its events) with its files; exit 1 on any finding."""
    from service.verify import verify

    report = verify(ctx.service.app, ctx.service.data, vm_name, deep=deep)
    if as_json:
        emit(report.to_json(), True)
    else:
        for f in report.findings:
            click.echo(f.line())
        for n in report.notes:
            click.echo(f"note: {n.line()}", err=True)
        if report.clean:
            click.echo(f"VM {vm_name}: clean ({len(report.notes)} note(s))")
    if not report.clean:
        sys.exit(1)


def _iso(ts: Any) -> str:
    return str(ts.isoformat().replace("+00:00", "Z")) if ts is not None else "?"
