"""`snaptree snapshot take|apply|delete|rename|revert`."""

from __future__ import annotations

import click

from adapters.cli.app import Ctx, arg_help, main
from adapters.cli.output import command, wait_option
from domain import commands as c


@main.group()
def snapshot() -> None:
    """Take, apply, delete, rename and revert snapshots."""


@snapshot.command("take")
@click.argument("vm", metavar="VM")
@click.argument("name")
@click.option("--memory/--no-memory", default=True, show_default=True,
              help="Of a running VM: save its memory too (--no-memory: disks only).")
@click.option("--quiesce", type=click.Choice([q.value for q in c.Quiesce]), default="auto",
              show_default=True, help=arg_help(c.TakeSnapshot, "quiesce").capitalize() + ".")
@wait_option
@command
def snapshot_take(ctx: Ctx, vm: str, name: str, memory: bool, quiesce: str, no_wait: bool,
                  as_json: bool) -> None:
    """Take snapshot NAME of VM (of a running VM: live, memory saved while it runs)."""
    ctx.run(c.TakeSnapshot(vm, name, memory=memory, quiesce=c.Quiesce(quiesce)), as_json, wait=not no_wait)


@snapshot.command("apply")
@click.argument("vm", metavar="VM")
@click.argument("snapshot", metavar="SNAPSHOT")
@click.option("--paused", is_flag=True, help="A snapshot with saved memory comes back paused.")
@wait_option
@command
def snapshot_apply(ctx: Ctx, vm: str, snapshot: str, paused: bool, no_wait: bool, as_json: bool) -> None:
    """Set VM to start from a copy of SNAPSHOT; the current state is discarded.

    With saved memory the VM comes back running (or --paused) exactly where SNAPSHOT was."""
    ctx.run(c.ApplySnapshot(vm, snapshot, paused=paused), as_json, wait=not no_wait)


@snapshot.command("delete")
@click.argument("vm", metavar="VM")
@click.argument("snapshot", metavar="SNAPSHOT")
@click.option("--subtree", is_flag=True, help="Also delete every snapshot below it.")
@wait_option
@command
def snapshot_delete(ctx: Ctx, vm: str, snapshot: str, subtree: bool, no_wait: bool, as_json: bool) -> None:
    """Delete SNAPSHOT (its layers merge or wait as a hidden node, by the rules)."""
    ctx.run(c.DeleteSnapshot(vm, snapshot, subtree=subtree), as_json, wait=not no_wait)


@snapshot.command("rename")
@click.argument("vm", metavar="VM")
@click.argument("snapshot", metavar="SNAPSHOT")
@click.argument("new", metavar="NEW")
@command
def snapshot_rename(ctx: Ctx, vm: str, snapshot: str, new: str, as_json: bool) -> None:
    """Rename SNAPSHOT to NEW (the only edit a snapshot allows)."""
    ctx.run(c.RenameSnapshot(vm, snapshot, new), as_json)


@snapshot.command("revert")
@click.argument("vm", metavar="VM")
@click.option("--paused", is_flag=True, help="A snapshot with saved memory comes back paused.")
@wait_option
@command
def snapshot_revert(ctx: Ctx, vm: str, paused: bool, no_wait: bool, as_json: bool) -> None:
    """Apply the nearest visible snapshot above the current state."""
    ctx.run(c.RevertSnapshot(vm, paused=paused), as_json, wait=not no_wait)
