"""`snaptree vm console VM`: the VM's serial console, attached (Ctrl-] detaches) or as its log.

QEMU keeps the console on a unix socket in the VM's run directory and appends everything the
guest writes to a log beside it (adapters/qemu/devices.py), so the log holds the boot even when
no one was attached, and detaching never stops the guest.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import time
from pathlib import Path

import click

from adapters.cli.app import Ctx
from adapters.cli.output import command
from adapters.cli.vm import vm
from domain.errors import Conflict

DETACH = b"\x1d"  # Ctrl-]


@vm.command("console")
@click.argument("name", metavar="VM")
@click.option("--log", "show_log", is_flag=True, help="Print what the guest wrote on its console.")
@click.option("--follow", "-f", is_flag=True, help="With --log: keep printing new lines (Ctrl-C ends).")
@command
def vm_console(ctx: Ctx, name: str, show_log: bool, follow: bool, as_json: bool) -> None:
    """Attach to VM's serial console (Ctrl-] detaches), or print its log with --log."""
    from adapters.qemu.devices import CONSOLE_LOG, CONSOLE_SOCKET  # not on every `--help`

    run_dir = ctx.service.data.vm_dir(ctx.service.app.get_vm(name).name) / "run"
    if show_log or follow:
        _print_log(run_dir / CONSOLE_LOG, follow)
        return
    _attach(run_dir / CONSOLE_SOCKET, name)


def _print_log(path: Path, follow: bool) -> None:
    if not path.exists():
        raise Conflict(f"no console log yet at {path}: the VM has not run since it got a console")
    out = sys.stdout.buffer
    with open(path, "rb") as f:
        while True:
            chunk = f.read(65536)
            if chunk:
                out.write(chunk)
                out.flush()
            elif not follow:
                return
            else:
                time.sleep(0.2)


def _attach(path: Path, name: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        raise Conflict(f"VM {name!r} is not running (no console at {path})") from None
    click.echo(f"connected to the console of {name}; Ctrl-] detaches", err=True)
    tty = sys.stdin.isatty()
    saved = None
    if tty:
        import termios
        import tty as ttymod

        saved = termios.tcgetattr(sys.stdin.fileno())
        ttymod.setraw(sys.stdin.fileno())
    try:
        _relay(sock, sys.stdin.fileno(), sys.stdout.fileno())
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
        sock.close()
    click.echo("\ndetached", err=True)


def _relay(sock: socket.socket, stdin: int, stdout: int) -> None:
    open_in = True
    while True:
        ready, _, _ = select.select([sock, stdin] if open_in else [sock], [], [])
        if sock in ready:
            data = sock.recv(65536)
            if not data:
                return  # QEMU went away
            os.write(stdout, data)
        if open_in and stdin in ready:
            data = os.read(stdin, 1024)
            if not data:
                open_in = False  # input ended (a pipe): keep printing until the guest closes
                return
            if DETACH in data:
                sock.sendall(data.split(DETACH, 1)[0])
                return
            sock.sendall(data)
