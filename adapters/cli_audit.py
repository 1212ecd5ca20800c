"""`snaptree projections rebuild|update|status` and `snaptree audit log|replay|export`.

Same error contract as adapters/cli.py: exit 2 for refused input (unknown VM, a version out of
range, a time that is not ISO 8601 or before the VM existed), 1 for a failure while doing it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from adapters.cli_verify import audit_group, cli_module
from domain.errors import Refused
from projections import records
from projections.read import read_timeline, runner_for
from projections.replay import parse_time, tree_at, version_at_time, vm_at
from projections.tree_view import tree_json


def register(main: click.Group) -> None:
    cli = cli_module(main)  # the running CLI module (it is __main__ under `python -m`)
    command = cli.command

    @main.group("projections")
    def projections() -> None:
        """Read models kept from the event log: tree, pending merges, audit timeline."""

    @projections.command("update")
    @command
    def projections_update(ctx: Any, as_json: bool) -> None:
        """Catch the views up with the event log."""
        _run(ctx, as_json, rebuild=False)

    @projections.command("rebuild")
    @command
    def projections_rebuild(ctx: Any, as_json: bool) -> None:
        """Empty the views and rebuild them from the first event (same rows as before)."""
        _run(ctx, as_json, rebuild=True)

    @projections.command("status")
    @command
    def projections_status(ctx: Any, as_json: bool) -> None:
        """Where the views stand in the event log."""
        app = ctx.service.app
        position = runner_for(app).position
        head = app.recorder.max_notification_id() or 0
        data = {"position": position, "head": head, "behind": max(head - position, 0)}
        cli.emit(data, as_json, f"views at notification {position} of {head}")

    def _run(ctx: Any, as_json: bool, *, rebuild: bool) -> None:
        runner = runner_for(ctx.service.app)
        started = time.perf_counter()
        events = runner.rebuild() if rebuild else runner.update()
        seconds = round(time.perf_counter() - started, 3)
        data = {"position": runner.position, "events": events, "seconds": seconds}
        verb = "rebuilt from" if rebuild else "projected"
        cli.emit(data, as_json, f"{verb} {events} events in {seconds} s; views at notification {runner.position}")

    audit = audit_group(main)

    @audit.command("log")
    @click.argument("vm_name", metavar="VM")
    @command
    def audit_log(ctx: Any, vm_name: str, as_json: bool) -> None:
        """Every event of VM: time, version, type, request id and a one-line summary."""
        rows = read_timeline(ctx.service.app, vm_name)
        cli.emit(rows, as_json, "\n".join(_log_line(r) for r in rows))

    @audit.command("replay")
    @click.argument("vm_name", metavar="VM")
    @click.option("--at-version", type=int, metavar="N", help="Right after the VM's event number N.")
    @click.option("--at-time", metavar="ISO-8601", help="As it was at this time (no zone: UTC).")
    @click.option("--events-only", is_flag=True,
                  help="Fold every event from the registration; ignore aggregate snapshots.")
    @command
    def audit_replay(ctx: Any, vm_name: str, at_version: int | None, at_time: str | None,
                     events_only: bool, as_json: bool) -> None:
        """VM's tree as it was, from its events alone (`tree --json` format, no disk reads)."""
        app = ctx.service.app
        if (at_version is None) == (at_time is None):
            raise Refused("give exactly one of --at-version N and --at-time ISO-8601")
        version = at_version if at_version is not None else version_at_time(app, vm_name, parse_time(at_time or ""))
        if as_json:
            cli.emit(tree_at(app, vm_name, version, events_only=events_only), True)
            return
        agg = vm_at(app, vm_name, version, events_only=events_only)
        click.echo(f"VM {vm_name} at version {version} of its history ({_iso(agg.modified_on)})")
        doc = tree_json(agg)
        for n in doc["nodes"]:
            if "merge" in n and n["merge"]["bytes"] is None:
                n["merge"]["bytes"] = "?"  # a disk fact; the events alone do not say
        from rich.console import Console

        Console().print(cli.render_tree(doc, agg.host))

    @audit.command("export")
    @click.argument("vm_name", metavar="VM")
    @click.option("--format", "fmt", type=click.Choice(records.FORMATS), default="jsonl",
                  show_default=True, help="JSON lines, or a stream of msgpack maps.")
    @click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
                  help="Write to FILE (default: standard output).")
    @command
    def audit_export(ctx: Any, vm_name: str, fmt: str, output: Path | None, as_json: bool) -> None:
        """Every event of VM with its type, version, time and fields, for external tools."""
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


def _log_line(r: dict[str, Any]) -> str:
    request = f" [{r['request_id']}]" if r["request_id"] else ""
    return f"{r['time']}  v{r['version']:<5} {r['event']:<17} {r['summary']}{request}"


def _iso(ts: Any) -> str:
    return str(ts.isoformat().replace("+00:00", "Z")) if ts is not None else "?"
