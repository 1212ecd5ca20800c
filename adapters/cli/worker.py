"""`snaptree worker run`: perform the host work the embedded mode left (`--no-wait`)."""

from __future__ import annotations

import click

from adapters.cli.app import Ctx, main
from adapters.cli.output import command, emit, wait_option
from domain import commands as c


@main.group()
def worker() -> None:
    """Run the worker that performs the disk work."""


@worker.command("run")
@click.option("--until-idle", is_flag=True, help="Exit once no work is left.")
@command
def worker_run(ctx: Ctx, until_idle: bool, as_json: bool) -> None:
    """Follow the event log and perform overlay creation, merges and file removal."""
    from service.worker import WorkFailed
    from workers.runner import LogFollower

    follower = LogFollower(ctx.service)
    follower.run(until_idle=until_idle)
    left = follower.failures or follower.outstanding()
    if left:
        raise WorkFailed("; ".join(left))
    emit({"position": follower.position}, as_json, f"worker idle at notification {follower.position}")


@main.group("work")
def work() -> None:
    """Failed host work: run it again, or roll it back."""


@work.command("retry")
@click.argument("vm", metavar="VM")
@wait_option
@command
def work_retry(ctx: Ctx, vm: str, no_wait: bool, as_json: bool) -> None:
    """Run VM's failed host work again (after fixing what made it fail)."""
    ctx.run(c.RetryWork(vm), as_json, wait=not no_wait)


@work.command("abandon")
@click.argument("vm", metavar="VM")
@wait_option
@command
def work_abandon(ctx: Ctx, vm: str, no_wait: bool, as_json: bool) -> None:
    """Roll back the take or apply of VM whose overlay could not be created."""
    ctx.run(c.AbandonWork(vm), as_json, wait=not no_wait)
