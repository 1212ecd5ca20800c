"""Memory state files: QEMU's outgoing migration into a file, waiting for it, cancelling it, and
starting a new QEMU from one (incoming migration).

A state file is written by QEMU through a file descriptor we open and pass over the QMP socket
(:func:`pass_state_fd`), and is complete only once QEMU has closed it (:func:`wait_released`).
Whether a save is still running, or which file it writes, is asked of QEMU and of /proc, never
remembered: every function here also works on a QEMU this process only attached to.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shlex
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError

from adapters.qemu import uffd_qemu72
from adapters.qemu.errors import LiveError, MachineError
from adapters.qemu.hardware import MachineConfig
from adapters.qemu.machine import QemuMachine

TERMINAL = ("completed", "failed", "cancelled")
ACTIVE = ("setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug")
MAX_BANDWIDTH = 1 << 40            # bytes/s: effectively unlimited (7.2 default: 128 MiB/s)

FileIdent = tuple[int, int]         # (st_dev, st_ino): which file QEMU holds open
Command = tuple[str, dict[str, Any] | None]

_fd_names = itertools.count(1)


async def pass_state_fd(m: QemuMachine, state_path: str) -> tuple[str, FileIdent]:
    """Open the state file here and hand it to QEMU (SCM_RIGHTS + ``getfd``).

    ``migrate fd:NAME`` then writes straight into it: no `sh -c cat` to fork
    inside the pause (a fork of QEMU took ~38 ms of a 84 ms pause at
    256 MiB), no pipe.  Returns the fd name and the file's (st_dev, st_ino).
    """
    name = f"snaptree-state-{next(_fd_names)}"
    fd = os.open(state_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        m.qmp.send_fd_scm(fd)
        await m.qmp.execute("getfd", {"fdname": name})
    finally:
        os.close(fd)
    return name, (st.st_dev, st.st_ino)


async def drop_fd(m: QemuMachine, name: str) -> None:
    with contextlib.suppress(ExecuteError):
        await m.qmp.execute("closefd", {"fdname": name})   # only if migrate never took it


def file_ident(path: str | None) -> FileIdent | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def qemu_holds(m: QemuMachine, ident: FileIdent | None) -> bool:
    """Whether QEMU has the file ``ident`` open (its /proc/PID/fd)."""
    pid = m.pid
    if pid is None or ident is None:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/{pid}/fd/{fd}")
            if (st.st_dev, st.st_ino) == ident:
                return True
    return False


async def wait_released(m: QemuMachine, ident: FileIdent | None, timeout: float = 120.0) -> None:
    """Wait until QEMU has closed the state file.

    QEMU 7.2 emits MIGRATION ``completed`` before its cleanup flushes and
    closes the migration stream (measured with an exec: writer: 90-120 KB
    still arrived after the event): the file is complete only once closed.
    """
    deadline = time.monotonic() + timeout
    while qemu_holds(m, ident):
        if time.monotonic() > deadline:
            raise LiveError(f"QEMU still holds the memory state file after {timeout}s")
        await asyncio.sleep(0.005)


async def set_caps(m: QemuMachine, **caps: bool) -> None:
    await m.qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()]})


async def status(m: QemuMachine) -> dict[str, Any]:
    """``query-migrate``: the current (or last) migration's status and counters."""
    info: dict[str, Any] = await m.query("query-migrate")
    return info


async def bg_capability(m: QemuMachine) -> bool:
    caps = await m.query("query-migrate-capabilities")
    return any(c["capability"] == "background-snapshot" and c["state"] for c in caps)


async def pipeline(m: QemuMachine, commands: list[Command]) -> list[Any]:
    """Send several QMP commands at once; QEMU runs them in order.

    Saves one client round trip per command inside the pause (0.6-30 ms each
    on a 2-core host whose vCPU thread spins).  Returns results/exceptions.
    """
    return await asyncio.gather(*(m.qmp.execute(c, a) for c, a in commands),
                                return_exceptions=True)


def check_space(m: QemuMachine, state_path: str) -> None:
    """Refuse a memory save that cannot fit: a save failing half-way is what
    freezes or deadlocks QEMU 7.2 (see uffd_qemu72)."""
    if os.path.exists(state_path) and not os.path.isfile(state_path):
        return                                  # a device or pipe: caller's business
    st = os.statvfs(os.path.dirname(os.path.abspath(state_path)))
    need = (m.config.memory_mib + 64) << 20
    if st.f_bavail * st.f_frsize < need:
        raise LiveError(f"not enough free space for a {m.config.memory_mib} MiB memory "
                        f"state in {os.path.dirname(os.path.abspath(state_path))}")


async def wait_save(m: QemuMachine, state_path: str | None = None,
                    ident: FileIdent | None = None, poll: float = 0.5) -> dict[str, Any]:
    """Wait for the current outgoing migration to end and QEMU to close the file.

    Usable after a restart (attach) too, with the state path: it polls
    ``query-migrate`` next to waiting for MIGRATION events.  Returns the final
    query-migrate info; raises LiveError if the save failed or was cancelled
    (after undoing QEMU 7.2's leftover write protection).
    """
    ident = ident or file_ident(state_path)
    async with uffd_qemu72.UffdWatchdog(m):
        while True:
            seq = m.event_seq
            info = await status(m)
            state = info.get("status")
            if state in TERMINAL:
                break
            with contextlib.suppress(MachineError):
                await m.wait_event("MIGRATION", after=seq, timeout=poll,
                                   match=lambda e: e["data"]["status"] in TERMINAL)
        await wait_released(m, ident)
    if uffd_qemu72.deadlocked(m):
        raise LiveError("memory save failed: QEMU deadlocked on its write protection "
                        "(released; the state file is invalid)")
    if state != "completed":
        if await bg_capability(m):
            uffd_qemu72.release_write_protection(m)      # QEMU 7.2 would leave the guest frozen
        raise LiveError(f"memory save {state}: {info.get('error-desc', '')}".strip())
    return info


async def total_seconds(m: QemuMachine, info: dict[str, Any]) -> float:
    """QEMU's own duration of the save that ended with ``info`` (seconds)."""
    for _ in range(20):  # QEMU 7.2 reports `completed` a moment before it sets total-time
        if info.get("total-time"):
            break
        await asyncio.sleep(0.05)
        info = await status(m)
    return float(info.get("total-time", 0)) / 1000.0


async def cancel_save(m: QemuMachine, state_path: str | None = None) -> str:
    """Stop a running memory save, for "delete while saving".

    Waits until QEMU has stopped writing (migration ended, file closed), then
    removes ``state_path`` if given (regular files only); disks and overlays
    are untouched.  A background snapshot is cancelled with ``migrate_cancel``
    and then ``uffd_qemu72.release_write_protection`` (QEMU 7.2 would leave
    the guest frozen).  Without the rights for that, the save is instead left
    to run to its end into the already-unlinked file (slower, never freezes
    the guest).  Returns "cancelled", or "completed"/"failed" if the save had
    already ended, "none" if no save ever ran.
    """
    ident = file_ident(state_path)
    seq = m.event_seq
    state = (await status(m)).get("status", "none")
    if state not in TERMINAL and state != "none":
        bg = await bg_capability(m)
        if bg and not (m.pid and uffd_qemu72.can_take_fds(m.pid)):
            _unlink_state(state_path)       # the blocks go when QEMU closes the file
            with contextlib.suppress(LiveError):
                await wait_save(m, None, ident)
            return "cancelled"
        await m.qmp.execute("migrate_cancel")
        state = await _until_ended(m, seq)
        if bg and state != "completed":
            uffd_qemu72.release_write_protection(m)
    await wait_released(m, ident)
    _unlink_state(state_path)
    return str(state)


async def _until_ended(m: QemuMachine, seq: int) -> str:
    """The final status of the migration, from its MIGRATION event or, failing that, polling."""
    while True:
        with contextlib.suppress(MachineError):
            ev = await m.wait_event("MIGRATION", after=seq, timeout=0.5,
                                    match=lambda e: e["data"]["status"] in TERMINAL)
            return str(ev["data"]["status"])
        state = (await status(m)).get("status", "none")
        if state in TERMINAL:
            return str(state)


def _unlink_state(state_path: str | None) -> None:
    if state_path is not None and os.path.isfile(state_path):   # never a device node
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state_path)


async def restore(run_dir: Path | str, config: MachineConfig, disks: dict[str, str],
                  state_path: str, *, paused: bool = False,
                  timeout: float = 300.0) -> QemuMachine:
    """Start a new QEMU from a saved memory state (incoming migration).

    ``config`` and the disk names must be exactly those of the saved VM;
    ``disks`` are the new active layers (fresh overlays on the snapshot's
    layers).  The VM runs afterwards unless ``paused``.
    """
    if not os.path.isfile(state_path):
        raise LiveError(f"no memory state file {state_path}")
    m = QemuMachine(run_dir, config, disks)
    await m.start(incoming="exec:exec cat " + shlex.quote(os.path.abspath(state_path)))
    try:
        ev = await m.wait_event("MIGRATION", after=0, timeout=timeout,
                                match=lambda e: e["data"]["status"] in TERMINAL)
        if ev["data"]["status"] != "completed":
            raise LiveError(f"restore from {state_path}: migration {ev['data']['status']}"
                            + m.log_tail())
        if not paused:
            await m.qmp.execute("cont")
        else:
            await m.query_status()
    except BaseException:
        await m.stop()
        raise
    return m
