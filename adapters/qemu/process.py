"""A VM's QEMU as an operating-system process: finding it from its run directory (pidfile checked
against /proc), waiting for it to end or ending it, reading the tail of its log.

A VM's QEMU outlives the snaptree process that started it, so "is it running" is always asked of
the system, never of memory: the pidfile names a pid, and that pid must be alive and be the QEMU
of this run directory's QMP socket (pids are recycled).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from adapters.qemu.errors import MachineError

SOCKET_NAME = "qmp.sock"
PIDFILE_NAME = "qemu.pid"
LOG_NAME = "qemu.log"


def opt(value: object) -> str:
    """Escape a value for QEMU's key=value option syntax (',' -> ',,')."""
    return str(value).replace(",", ",,")


def alive(pid: int) -> bool:
    """True if pid exists and is not a zombie with no threads left.

    A QEMU's main thread exits first: the kernel shows it as a zombie while its other threads
    still run down and hold its guest RAM (huge pages) and image files for a moment more.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    if stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X"):
        return True
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def pid_from_file(pidfile: Path, socket_path: Path) -> int | None:
    """The live QEMU of this run_dir (pidfile, checked against /proc cmdline)."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    if not alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    # guards against a recycled pid: the process must be the QEMU of this socket
    if not any(opt(socket_path).encode() in arg for arg in cmdline):
        return None
    return pid


def running_pid(run_dir: Path | str) -> int | None:
    """The pid of the QEMU running in run_dir, or None (a stale pidfile does not count)."""
    run = Path(run_dir)
    return pid_from_file(run / PIDFILE_NAME, run / SOCKET_NAME)


async def wait_exit(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited; False if it still runs after ``timeout`` seconds."""
    import asyncio  # here: finding a pid (every command) needs no event loop

    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def terminate(pid: int, timeout: float) -> None:
    """Wait ``timeout`` seconds for ``pid`` to exit (after a QMP ``quit``), then SIGTERM, then
    SIGKILL; MachineError if even that does not end it."""
    if await wait_exit(pid, timeout):
        return
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if await wait_exit(pid, wait):
            return
    raise MachineError(f"QEMU pid {pid} does not exit")


def log_tail(log_path: Path, lines: int = 8) -> str:
    """The last lines of a QEMU log (without our "--- start" lines), as ": a | b | c"."""
    try:
        text = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    tail = [ln for ln in text if not ln.startswith("--- ")][-lines:]
    return (": " + " | ".join(tail)) if tail else ""
