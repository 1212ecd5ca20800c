"""`snaptree vm export VM FILE` and `snaptree vm import FILE [--name NEW]` (adapters/bundle.py)."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from adapters import bundle
from adapters.cli_verify import cli_module
from adapters.vm_export import export_vm
from adapters.vm_import import import_vm

BIG = 16 << 20  # files from this size on show progress (on a terminal)


def progress_printer(enabled: bool) -> bundle.Progress:
    """A percentage per large file on stderr, at most ~10 updates a second."""
    if not enabled:
        return bundle.quiet
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


def register(main: click.Group) -> None:
    cli = cli_module(main)
    vm = main.commands["vm"]
    assert isinstance(vm, click.Group)

    def progress(as_json: bool) -> bundle.Progress:
        return progress_printer(not as_json and sys.stderr.isatty())

    @vm.command("export")
    @click.argument("vm_name", metavar="VM")
    @click.argument("file", metavar="FILE", type=click.Path(dir_okay=False))
    @cli.command
    def vm_export(ctx: Any, vm_name: str, file: str, as_json: bool) -> None:
        """Write VM with its whole tree, memory states and event history to one bundle FILE."""
        out = export_vm(ctx.service, vm_name, file, progress(as_json))
        cli.emit(out, as_json, f"exported VM {out['vm']} ({out['nodes']} nodes, {out['bytes']} bytes)"
                               f" to {out['file']}")

    @vm.command("import")
    @click.argument("file", metavar="FILE", type=click.Path(dir_okay=False))
    @click.option("--name", "new_name", metavar="NEW", help="Name of the imported VM (default: its old name).")
    @cli.command
    def vm_import(ctx: Any, file: str, new_name: str | None, as_json: bool) -> None:
        """Import a bundle FILE as a new VM in this data directory (digests checked first)."""
        out = import_vm(ctx.service, file, new_name, progress(as_json))
        cli.emit(out, as_json, f"imported VM {out['vm']} ({out['nodes']} nodes) from"
                               f" {out['source']['name']}@{out['source']['host']}")
