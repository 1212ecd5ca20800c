"""`snaptree vm export VM FILE` and `snaptree vm import FILE [--name NEW]` (adapters/bundle.py)."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import click

from adapters.cli.app import Ctx
from adapters.cli.output import command, emit
from adapters.cli.vm import vm

BIG = 16 << 20  # files from this size on show progress (on a terminal)


def progress_printer(enabled: bool) -> Callable[[str, int, int], None]:
    """A percentage per large file on stderr, at most ~10 updates a second."""
    if not enabled:
        return lambda what, done, total: None
    last = [0.0]

    def show(what: str, done: int, total: int) -> None:
        now = time.monotonic()
        if total < BIG or (done < total and now - last[0] < 0.1):
            return
        last[0] = now
        end = "\n" if done >= total else "\r"
        sys.stderr.write(f"  {what}: {done * 100 // max(total, 1):3d}% of {total >> 20} MiB{end}")
        sys.stderr.flush()

    return show


def _progress(as_json: bool) -> Any:
    return progress_printer(not as_json and sys.stderr.isatty())


@vm.command("export")
@click.argument("vm_name", metavar="VM")
@click.argument("file", metavar="FILE", type=click.Path(dir_okay=False))
@command
def vm_export(ctx: Ctx, vm_name: str, file: str, as_json: bool) -> None:
    """Write VM with its whole tree, memory states and event history to one bundle FILE."""
    from service.export import export_vm

    out = export_vm(ctx.service, vm_name, file, _progress(as_json))
    emit(out, as_json, f"exported VM {out['vm']} ({out['nodes']} nodes, {out['bytes']} bytes) to {out['file']}")


@vm.command("import")
@click.argument("file", metavar="FILE", type=click.Path(dir_okay=False))
@click.option("--name", "new_name", metavar="NEW", help="Name of the imported VM (default: its old name).")
@command
def vm_import(ctx: Ctx, file: str, new_name: str | None, as_json: bool) -> None:
    """Import a bundle FILE as a new VM in this data directory (digests checked first)."""
    from service.import_bundle import import_vm

    out = import_vm(ctx.service, file, new_name, _progress(as_json))
    emit(out, as_json, f"imported VM {out['vm']} ({out['nodes']} nodes) from"
                       f" {out['source']['name']}@{out['source']['host']}")
