"""Workarounds for QEMU 7.2's userfaultfd defects; delete this module together with QEMU 7.2.

A background snapshot (``migrate`` with the ``background-snapshot`` capability) write-protects
guest RAM with userfaultfd and saves each page before the guest may change it.  QEMU 7.2 gets the
end of an *unsuccessful* save wrong:

* it does not stop the write tracking when the save ends early (``migrate_cancel``, a write error
  on the state file): the RAM stays write-protected and a vCPU that writes sleeps forever while
  QEMU reports "running" -- :func:`release_write_protection` undoes it;
* when the save fails right after the VM resumed, QEMU's main thread (holding the big lock)
  faults on a protected page while the thread that would resolve the fault waits for that lock:
  QEMU hangs, QMP included -- :class:`UffdWatchdog` breaks that deadlock and marks the save
  as broken (:func:`deadlocked`).

Nothing here is needed on a QEMU that ends a background snapshot correctly.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import re
import struct
import time
import weakref
from pathlib import Path

from adapters.qemu.errors import LiveError
from adapters.qemu.machine import QemuMachine

_SYS_PIDFD_GETFD = 438                  # x86_64
_UFFDIO_UNREGISTER = 0x8010AA01         # _IOR(0xAA, 0x01, struct uffdio_range)
_UFFDIO_WRITEPROTECT = 0xC018AA06       # _IOWR(0xAA, 0x06, struct uffdio_writeprotect)

# Machines whose last background save the watchdog had to break (its state file is invalid).
_deadlocked: "weakref.WeakSet[QemuMachine]" = weakref.WeakSet()


def deadlocked(m: QemuMachine) -> bool:
    """Whether the watchdog broke a deadlock of this machine's save since :func:`clear`."""
    return m in _deadlocked


def clear(m: QemuMachine) -> None:
    """Forget an earlier broken save (a new one is about to start)."""
    _deadlocked.discard(m)


def _uffd_state(pid: int) -> tuple[list[int], list[tuple[int, int]]]:
    """QEMU's userfaultfd descriptors and its write-protect-registered ranges."""
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[userfaultfd]":
                fds.append(int(fd))
    ranges, current = [], None
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if head:
                current = (int(head.group(1), 16), int(head.group(2), 16))
            elif line.startswith("VmFlags:") and " uw" in line and current:
                ranges.append(current)     # "uw": registered for uffd write-protect
    return fds, ranges


def can_take_fds(pid: int) -> bool:
    """May we pidfd_getfd() from QEMU (root, or ptrace rights over it)?"""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        fd = ctypes.CDLL(None, use_errno=True).syscall(_SYS_PIDFD_GETFD, pidfd, 0, 0)
        if fd >= 0:
            os.close(fd)
            return True
        return False
    finally:
        os.close(pidfd)


def release_write_protection(m: QemuMachine) -> int:
    """Undo the RAM write protection a failed/cancelled background snapshot left.

    QEMU 7.2 does not stop its userfaultfd write tracking when a background
    snapshot ends early (``migrate_cancel``, or a write error on the state
    file): the RAM stays registered and write-protected, and a vCPU blocked on
    a write fault sleeps forever while QEMU reports "running" (measured: 5 of
    6 cancels froze the guest; a later memory save then fails too).  This
    takes QEMU's userfaultfd with pidfd_getfd(2) and clears the protection
    (which wakes the blocked vCPU) and the registration of every range
    /proc/PID/smaps flags ``uw``.  Only call it once the migration has ended.
    Needs ptrace rights over QEMU (root, or CAP_SYS_PTRACE).  Returns the
    number of ranges released (0: nothing was left protected).
    """
    pid = m.pid
    if pid is None:
        return 0
    fds, ranges = _uffd_state(pid)
    if not fds or not ranges:
        return 0
    syscall = ctypes.CDLL(None, use_errno=True).syscall
    pidfd = os.pidfd_open(pid)
    released: set[int] = set()
    try:
        for target in fds:
            fd = syscall(_SYS_PIDFD_GETFD, pidfd, target, 0)
            if fd < 0:
                err = ctypes.get_errno()
                raise LiveError(f"cannot take QEMU's userfaultfd ({os.strerror(err)}): the "
                                "guest may stay frozen after this failed memory save; restart it")
            try:
                released |= _unprotect(fd, ranges)
            finally:
                os.close(fd)
    finally:
        os.close(pidfd)
    return len(released)


def _unprotect(fd: int, ranges: list[tuple[int, int]]) -> set[int]:
    """Clear write protection and registration of each range this uffd has; their starts."""
    done = set()
    for start, end in ranges:
        length = end - start
        try:
            fcntl.ioctl(fd, _UFFDIO_WRITEPROTECT, bytearray(struct.pack("QQQ", start, length, 0)))
            fcntl.ioctl(fd, _UFFDIO_UNREGISTER, bytearray(struct.pack("QQ", start, length)))
            done.add(start)
        except OSError:
            pass            # range belongs to another uffd
    return done


def _main_thread_in_uffd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/task/{pid}/wchan").read_text() == "handle_userfault"
    except OSError:
        return False


class UffdWatchdog:
    """Breaks QEMU 7.2's background-snapshot deadlock.

    When the save fails right after the VM resumed (e.g. ENOSPC on the state
    file), QEMU's main thread -- holding the big lock -- faults on a
    write-protected page (vm_start's virtio notifiers write guest RAM), while
    the snapshot thread that would resolve the fault waits for that lock:
    QEMU hangs, QMP included.  If the main thread sits in handle_userfault
    for ``stuck_after`` seconds, the protection is released (the save is then
    worthless and reported as failed: :func:`deadlocked`).
    """

    def __init__(self, m: QemuMachine, stuck_after: float = 2.0):
        self.m, self.stuck_after = m, stuck_after
        self.fired = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "UffdWatchdog":
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        since = None
        while True:
            await asyncio.sleep(0.2)
            pid = self.m.pid
            if pid is None:
                return
            if not _main_thread_in_uffd(pid):
                since = None
                continue
            since = since or time.monotonic()
            if time.monotonic() - since >= self.stuck_after:
                self.fired = True
                _deadlocked.add(self.m)
                await asyncio.to_thread(release_write_protection, self.m)
                since = None
