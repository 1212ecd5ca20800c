"""`snaptree vm create|list|start|stop|status|set`."""

from __future__ import annotations

from typing import Any, Callable

import click

from adapters.cli.app import Ctx, arg_help, main
from adapters.cli.output import command, wait_option
from domain import commands as c
from domain.definition import Accel, Display, Firmware
from domain.rules import DEFAULT_MAX_CHAIN_DEPTH, MIN_CHAIN_DEPTH


@main.group()
def vm() -> None:
    """Register VMs, start and stop them, change their settings."""


def definition_options(create: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options `vm create` and `vm set` share (docs/vm-definition.md)."""
    cmd = c.CreateVM if create else c.SetVM
    file = click.Path(exists=True, dir_okay=False, resolve_path=True)
    unset = "" if create else " ('' removes it)"

    def h(field: str, extra: str = "") -> str:
        text = arg_help(cmd, field)
        return text[:1].upper() + text[1:] + extra + "."

    opts = [
        click.option("--accel", type=click.Choice([a.value for a in Accel]),
                     default=Accel.AUTO.value if create else None, show_default=create, help=h("accel")),
        click.option("--machine", help=h("machine")),
        click.option("--cpu", help=h("cpu")),
        click.option("--memory", type=click.IntRange(16, 1 << 20), default=256 if create else None,
                     show_default=create, help="MiB."),
        click.option("--cpus", type=click.IntRange(1, 64), default=1 if create else None, show_default=create),
        click.option("--kernel", type=file if create else str, help=h("kernel", unset)),
        click.option("--initrd", type=file if create else str, help=h("initrd", unset)),
        click.option("--append", help=h("append", unset)),
        click.option("--cdrom", type=file if create else str, metavar="ISO", help=h("cdrom", unset)),
        click.option("--nic", multiple=True, metavar="SPEC", help=h("nic") + " Repeatable."),
        click.option("--display", type=click.Choice([d.value for d in Display]),
                     default=Display.NONE.value if create else None, show_default=create, help=h("display")),
        click.option("--qemu-arg", "qemu_arg", multiple=True, metavar="ARG", help=h("qemu_arg") + " Repeatable."),
        click.option("--max-chain-depth", type=click.IntRange(MIN_CHAIN_DEPTH, 4096),
                     default=DEFAULT_MAX_CHAIN_DEPTH if create else None, show_default=create,
                     help=h("max_chain_depth")),
        click.option("--agent/--no-agent", default=True if create else None, show_default=create,
                     help=h("agent")),
        click.option("--hugepages/--no-hugepages", default=False if create else None, show_default=create,
                     help=h("hugepages")),
    ]
    if create:
        opts.append(click.option("--firmware", type=click.Choice([f.value for f in Firmware]),
                                 default=Firmware.BIOS.value, show_default=True, help=h("firmware")))

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        for o in reversed(opts):
            fn = o(fn)
        return fn

    return wrap


@vm.command("create")
@click.argument("vm", metavar="NAME")
@click.option("--disk", "disk", multiple=True, required=True, metavar="[NAME=]PATH[,bus=B][,cache=C][,discard=unmap]",
              help="A qcow2 disk the VM owns (repeatable). It stays where it is unless --copy.")
@click.option("--copy", is_flag=True, help=arg_help(c.CreateVM, "copy").capitalize() + ".")
@click.option("--vm-host", "host", help="Host that runs this VM (default: this host).")
@definition_options(create=True)
@command
def vm_create(ctx: Ctx, vm: str, disk: tuple[str, ...], copy: bool, host: str | None, as_json: bool,
              **definition: Any) -> None:
    """Register VM NAME with its own disk files and the machine it runs in.

    \b
    Examples:
      # a cloud image booting through the firmware, SSH on 127.0.0.1:2222
      snaptree vm create web --disk /srv/debian-12.qcow2 --memory 1024 --cpus 2 \\
          --nic user,hostfwd=tcp:127.0.0.1:2222-:22
      # direct kernel boot, console on the serial port
      snaptree vm create k --disk /srv/root.qcow2 --kernel vmlinuz --initrd initrd.img \\
          --append "console=ttyS0 root=/dev/vda1"
      # UEFI (OVMF) with its own NVRAM
      snaptree vm create u --disk /srv/uefi.qcow2 --firmware uefi --machine q35
    """
    ctx.run(c.CreateVM(vm, disk=disk, copy=copy, host=host, **_enums(definition)), as_json)


def _enums(values: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    for key, enum in (("accel", Accel), ("display", Display), ("firmware", Firmware)):
        if out.get(key) is not None:
            out[key] = enum(out[key])
    return out


@vm.command("list")
@command
def vm_list(ctx: Ctx, as_json: bool) -> None:
    """List registered VMs."""
    ctx.run(c.ListVMs(), as_json)


@vm.command("start")
@click.argument("vm", metavar="VM")
@click.option("--paused", is_flag=True, help="Start with the vCPUs stopped.")
@wait_option
@command
def vm_start(ctx: Ctx, vm: str, paused: bool, no_wait: bool, as_json: bool) -> None:
    """Start VM's QEMU on its current state (after the work recorded before), or resume it if paused."""
    ctx.run(c.StartVM(vm, paused=paused), as_json, wait=not no_wait)


@vm.command("stop")
@click.argument("vm", metavar="VM")
@wait_option
@command
def vm_stop(ctx: Ctx, vm: str, no_wait: bool, as_json: bool) -> None:
    """Stop VM's QEMU (after any memory save in flight has ended)."""
    ctx.run(c.StopVM(vm), as_json, wait=not no_wait)


@vm.command("status")
@click.argument("vm", metavar="VM")
@command
def vm_status(ctx: Ctx, vm: str, as_json: bool) -> None:
    """Whether VM runs, and where."""
    ctx.run(c.GetVMStatus(vm), as_json)


@vm.command("set")
@click.argument("vm", metavar="VM")
@definition_options(create=False)
@wait_option
@command
def vm_set(ctx: Ctx, vm: str, no_wait: bool, as_json: bool, **definition: Any) -> None:
    """Change the current state's definition (snapshots keep their copies; takes effect at the
    next start; a lower --max-chain-depth flattens now). --nic and --qemu-arg replace the whole
    list; --nic '' or --qemu-arg '' removes them all."""
    values = _enums(definition)
    for key in ("nic", "qemu_arg"):  # not given: unchanged; '' alone: none
        values[key] = tuple(v for v in values[key] if v) if values[key] else None
    ctx.run(c.SetVM(vm, **values), as_json, wait=not no_wait)


@vm.command("show")
@click.argument("vm", metavar="VM")
@command
def vm_show(ctx: Ctx, vm: str, as_json: bool) -> None:
    """Print VM's whole definition: machine, boot, disks, NICs with their MACs, console."""
    ctx.run(c.GetVMDefinition(vm), as_json)
