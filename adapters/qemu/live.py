"""Live operations on a running QEMU over QMP: snapshot, memory save/restore,
online merges (block-stream / active block-commit), HMP helpers.

One live operation per VM at a time (the workers' per-VM order): the
helpers share the VM's QMP connection and event log.

Measured on QEMU 7.2 (see DESIGN §4); sequences chosen for the shortest pause:

live_snapshot (background-snapshot, the default):
    before the pause: check every overlay's qcow2 header names the current
    active layer, ``blockdev-add`` the overlays with ``"backing": null``, set
    the migration capabilities/parameters, open the state file and pass its
    fd to QEMU (``getfd``);
    pause:  one pipelined burst ``stop`` + ``transaction`` of
            ``blockdev-snapshot`` (all disks, atomic) + ``migrate fd:NAME``;
            QEMU 7.2 then saves the device state, arms userfaultfd write
            protection and resumes the VM by itself;
    after:  RAM is written copy-on-write while the guest runs; the file is
            complete once QEMU has closed it (``wait_saved``).
    The pause is RESUME.timestamp - STOP.timestamp of QEMU's own events.
    Without memory the burst is ``stop`` + ``transaction`` + ``cont``.

live_snapshot (pre-copy fallback, when background-snapshot is refused):
    capability ``pause-before-switchover``; ``migrate`` with the guest running;
    at MIGRATION ``pre-switchover`` (guest stopped by QEMU) switch the disks,
    ``migrate-continue``, wait ``completed``, ``cont`` the postmigrate source.
    On multi-threaded TCG the guest is stopped for the whole pre-copy instead
    (QEMU 7.2 MTTCG dirty logging misses writes; see MachineConfig).

QEMU 7.2 defects handled here: a background snapshot that ends early
(cancel, write error) freezes the guest or deadlocks QEMU -- see
:func:`release_write_protection` and ``_UffdWatchdog``.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import re
import shlex
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from qemu.qmp import ExecuteError

from .machine import (MachineConfig, MachineError, QemuMachine, check_disk_name,
                      file_node_name, node_name)

COUNTER_ADDR = 0x00200000          # the test guest's heartbeat (tests/guest/guest.c)
MAX_BANDWIDTH = 1 << 40            # bytes/s: effectively unlimited (7.2 default: 128 MiB/s)
PRECOPY_DOWNTIME_MS = 30

Progress = Callable[[int, int], Any]     # (done, total), bytes


class LiveError(MachineError):
    """A live operation failed (QEMU refused or the job/migration failed)."""


# --------------------------------------------------------------------- chains
@dataclass(frozen=True)
class Layer:
    node: str                 # format node name
    filename: str             # layer file
    format: str
    backing: str | None       # filename of the next layer down, None at the bottom


async def chain(m: QemuMachine, disk: str) -> list[Layer]:
    """The disk's chain as QEMU has it open right now, active layer first."""
    return (await _chains(m, [disk]))[disk]


async def _chains(m: QemuMachine, disks: list[str]) -> dict[str, list[Layer]]:
    blocks = await m.qmp.execute("query-block")
    nodes = await m.qmp.execute("query-named-block-nodes", {"flat": True})
    by_file: dict[str, list[dict[str, Any]]] = {}
    for n in nodes:
        if n["drv"] not in ("file", "host_device"):
            by_file.setdefault(n["file"], []).append(n)
    out = {}
    for disk in disks:
        dev = m.device_id(disk)
        root = None
        for b in blocks:
            qdev = b.get("qdev", "")
            if qdev == f"/machine/peripheral/{dev}" or \
                    qdev.startswith(f"/machine/peripheral/{dev}/") or b.get("device") == dev:
                root = b.get("inserted")
                break
        if root is None:
            raise LiveError(f"disk {disk!r}: no such device in QEMU")
        layers = []
        image: dict[str, Any] | None = root["image"]
        name = root["node-name"]
        while image is not None:
            filename = image["filename"]
            if name is None:
                cands = by_file.get(filename, [])
                ours = [c for c in cands if c["node-name"] == node_name(disk, filename)]
                pick = (ours or cands or [None])[0]
                if pick is None:
                    raise LiveError(f"disk {disk!r}: no node for layer {filename}")
                name = pick["node-name"]
            backing = image.get("backing-image")
            layers.append(Layer(name, filename, image["format"],
                                backing["filename"] if backing else None))
            image, name = backing, None
        out[disk] = layers
    return out


async def chains(m: QemuMachine) -> dict[str, list[Layer]]:
    """chain() of every disk of the VM (one query-block + one node query)."""
    return await _chains(m, list(m.disks))


async def active_node(m: QemuMachine, disk: str) -> str:
    return (await chain(m, disk))[0].node


def qcow2_backing_file(path: str) -> str | None:
    """Backing file name written in a qcow2 header, made absolute, or None."""
    with open(path, "rb") as f:
        head = f.read(32)
        if head[:4] != b"QFI\xfb":
            raise LiveError(f"{path}: not a qcow2 image")
        offset, size = struct.unpack(">QI", head[8:20])
        if offset == 0:
            return None
        f.seek(offset)
        name = f.read(size).decode()
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), name))


# ------------------------------------------------------------- memory saving
_TERMINAL = ("completed", "failed", "cancelled")
_ACTIVE = ("setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug")
_fd_counter = 0


async def _pass_state_fd(m: QemuMachine, state_path: str) -> tuple[str, tuple[int, int]]:
    """Open the state file here and hand it to QEMU (SCM_RIGHTS + ``getfd``).

    ``migrate fd:NAME`` then writes straight into it: no `sh -c cat` to fork
    inside the pause (a fork of QEMU took ~38 ms of a 84 ms pause at
    256 MiB), no pipe.  Returns the fd name and the file's (st_dev, st_ino).
    """
    global _fd_counter
    _fd_counter += 1
    name = f"snaptree-state-{_fd_counter}"
    fd = os.open(state_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        m.qmp.send_fd_scm(fd)
        await m.qmp.execute("getfd", {"fdname": name})
    finally:
        os.close(fd)
    return name, (st.st_dev, st.st_ino)


async def _drop_fd(m: QemuMachine, name: str) -> None:
    with contextlib.suppress(ExecuteError):
        await m.qmp.execute("closefd", {"fdname": name})   # only if migrate never took it


def _qemu_holds(m: QemuMachine, ident: tuple[int, int] | None) -> bool:
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


async def _wait_released(m: QemuMachine, ident: tuple[int, int] | None,
                         timeout: float = 120.0) -> None:
    """Wait until QEMU has closed the state file.

    QEMU 7.2 emits MIGRATION ``completed`` before its cleanup flushes and
    closes the migration stream (measured with an exec: writer: 90-120 KB
    still arrived after the event): the file is complete only once closed.
    """
    deadline = time.monotonic() + timeout
    while _qemu_holds(m, ident):
        if time.monotonic() > deadline:
            raise LiveError(f"QEMU still holds the memory state file after {timeout}s")
        await asyncio.sleep(0.005)


def _file_ident(path: str | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


async def _set_caps(m: QemuMachine, **caps: bool) -> None:
    await m.qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()]})


async def _migration_status(m: QemuMachine) -> dict[str, Any]:
    return await m.qmp.execute("query-migrate")


async def _pipeline(m: QemuMachine, commands: list[tuple[str, dict[str, Any] | None]]
                    ) -> list[Any]:
    """Send several QMP commands at once; QEMU runs them in order.

    Saves one client round trip per command inside the pause (0.6-30 ms each
    on a 2-core host whose vCPU thread spins).  Returns results/exceptions.
    """
    return await asyncio.gather(*(m.qmp.execute(c, a) for c, a in commands),
                                return_exceptions=True)


@dataclass
class LiveSnapshotResult:
    """Outcome of :func:`live_snapshot`.

    ``pause_ms``: guest pause from QEMU's STOP/RESUME event timestamps (None
    if the VM was not running).  ``method``: "background-snapshot" |
    "precopy" | None (no memory).  ``overlay_nodes``: disk -> node name of the
    new active layer.  ``error`` is set if the disks were switched but the
    memory save could not be started (the snapshot then has no memory).
    """

    pause_ms: float | None
    method: str | None
    overlay_nodes: dict[str, str]
    state_path: str | None = None
    error: str | None = None
    qemu_downtime_ms: int | None = None     # QEMU's own "downtime" (query-migrate)
    # ms since STOP of the events inside the pause: "MIGRATION setup/active/...", "RESUME"
    timeline: dict[str, float] = field(default_factory=dict)
    _m: QemuMachine | None = field(default=None, repr=False)
    _ident: tuple[int, int] | None = field(default=None, repr=False)
    _t0: float = field(default=0.0, repr=False)
    _saved: tuple[int, float] | None = field(default=None, repr=False)

    async def wait_saved(self, timeout: float | None = None) -> tuple[int, float]:
        """Wait until the memory state file is complete: (bytes, seconds).

        Raises LiveError if the save failed or was cancelled.
        (0, 0.0) when the snapshot has no memory.
        """
        if self.method is None or self.state_path is None:
            if self.error:
                raise LiveError(self.error)
            return (0, 0.0)
        if self._saved is None:
            assert self._m is not None
            info = await asyncio.wait_for(wait_save(self._m, self.state_path, self._ident),
                                          timeout)
            self._saved = (os.path.getsize(self.state_path), time.monotonic() - self._t0)
            if self.qemu_downtime_ms is None:
                self.qemu_downtime_ms = info.get("downtime")
        return self._saved

    async def progress(self) -> tuple[int, int]:
        """(bytes transferred, total RAM bytes) of the memory save."""
        if self._saved is not None:
            return (self._saved[0], self._saved[0])
        if self.method is None or self._m is None:
            return (0, 0)
        info = await _migration_status(self._m)
        ram = info.get("ram", {})
        if info.get("status") == "completed":
            return (ram.get("total", 1), ram.get("total", 1))
        return (ram.get("transferred", 0), ram.get("total", 0))


# -- QEMU 7.2: a background snapshot that ends early leaves RAM write-protected
_SYS_PIDFD_GETFD = 438                  # x86_64
_UFFDIO_UNREGISTER = 0x8010AA01         # _IOR(0xAA, 0x01, struct uffdio_range)
_UFFDIO_WRITEPROTECT = 0xC018AA06       # _IOWR(0xAA, 0x06, struct uffdio_writeprotect)


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


def _can_take_fds(pid: int) -> bool:
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
    released = set()
    try:
        for target in fds:
            fd = syscall(_SYS_PIDFD_GETFD, pidfd, target, 0)
            if fd < 0:
                err = ctypes.get_errno()
                raise LiveError(f"cannot take QEMU's userfaultfd ({os.strerror(err)}): the "
                                "guest may stay frozen after this failed memory save; restart it")
            try:
                for start, end in ranges:
                    length = end - start
                    try:
                        fcntl.ioctl(fd, _UFFDIO_WRITEPROTECT,
                                    bytearray(struct.pack("QQQ", start, length, 0)))
                        fcntl.ioctl(fd, _UFFDIO_UNREGISTER,
                                    bytearray(struct.pack("QQ", start, length)))
                        released.add(start)
                    except OSError:
                        pass            # range belongs to another uffd
            finally:
                os.close(fd)
    finally:
        os.close(pidfd)
    return len(released)


async def _bg_capability(m: QemuMachine) -> bool:
    caps = await m.qmp.execute("query-migrate-capabilities")
    return any(c["capability"] == "background-snapshot" and c["state"] for c in caps)


def _main_thread_in_uffd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/task/{pid}/wchan").read_text() == "handle_userfault"
    except OSError:
        return False


class _UffdWatchdog:
    """Breaks QEMU 7.2's background-snapshot deadlock.

    When the save fails right after the VM resumed (e.g. ENOSPC on the state
    file), QEMU's main thread -- holding the big lock -- faults on a
    write-protected page (vm_start's virtio notifiers write guest RAM), while
    the snapshot thread that would resolve the fault waits for that lock:
    QEMU hangs, QMP included.  If the main thread sits in handle_userfault
    for ``stuck_after`` seconds, the protection is released (the save is then
    worthless and reported as failed).
    """

    def __init__(self, m: QemuMachine, stuck_after: float = 2.0):
        self.m, self.stuck_after = m, stuck_after
        self.fired = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "_UffdWatchdog":
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
                setattr(self.m, "_bg_save_broken", True)
                await asyncio.to_thread(release_write_protection, self.m)
                since = None


def _check_space(m: QemuMachine, state_path: str) -> None:
    """Refuse a memory save that cannot fit: a save failing half-way is what
    freezes or deadlocks QEMU 7.2 (see release_write_protection)."""
    if os.path.exists(state_path) and not os.path.isfile(state_path):
        return                                  # a device or pipe: caller's business
    st = os.statvfs(os.path.dirname(os.path.abspath(state_path)))
    need = (m.config.memory_mib + 64) << 20
    if st.f_bavail * st.f_frsize < need:
        raise LiveError(f"not enough free space for a {m.config.memory_mib} MiB memory "
                        f"state in {os.path.dirname(os.path.abspath(state_path))}")


async def wait_save(m: QemuMachine, state_path: str | None = None,
                    ident: tuple[int, int] | None = None, poll: float = 0.5) -> dict[str, Any]:
    """Wait for the current outgoing migration to end and QEMU to close the file.

    Usable after a restart (attach) too, with the state path: it polls
    ``query-migrate`` next to waiting for MIGRATION events.  Returns the final
    query-migrate info; raises LiveError if the save failed or was cancelled
    (after undoing QEMU 7.2's leftover write protection).
    """
    ident = ident or _file_ident(state_path)
    async with _UffdWatchdog(m):
        while True:
            seq = m.event_seq
            info = await _migration_status(m)
            status = info.get("status")
            if status in _TERMINAL:
                break
            with contextlib.suppress(MachineError):
                await m.wait_event("MIGRATION", after=seq, timeout=poll,
                                   match=lambda e: e["data"]["status"] in _TERMINAL)
        await _wait_released(m, ident)
    if getattr(m, "_bg_save_broken", False):
        raise LiveError("memory save failed: QEMU deadlocked on its write protection "
                        "(released; the state file is invalid)")
    if status != "completed":
        if await _bg_capability(m):
            release_write_protection(m)      # QEMU 7.2 would leave the guest frozen
        raise LiveError(f"memory save {status}: {info.get('error-desc', '')}".strip())
    return info


def _event_time(e: dict[str, Any]) -> float:
    ts = e["timestamp"]
    return ts["seconds"] + ts["microseconds"] / 1e6


def _timeline(m: QemuMachine, after: int) -> dict[str, float]:
    events = m.events_since(after, ("STOP", "RESUME", "MIGRATION"))
    stops = [e for e in events if e["event"] == "STOP"]
    if not stops:
        return {}
    t0 = _event_time(stops[0])
    out: dict[str, float] = {}
    for e in events:
        key = e["event"] if e["event"] != "MIGRATION" else f"MIGRATION {e['data']['status']}"
        out.setdefault(key, round((_event_time(e) - t0) * 1000.0, 3))
        if e["event"] == "RESUME":
            break
    return out


def _pause_ms(m: QemuMachine, after: int) -> float | None:
    stop = resume = None
    for e in m.events_since(after, ("STOP", "RESUME")):
        if e["event"] == "STOP" and stop is None:
            stop = e
        elif e["event"] == "RESUME" and stop is not None:
            resume = e
    if stop is None or resume is None:
        return None
    return round((_event_time(resume) - _event_time(stop)) * 1000.0, 3)


async def _qemu_major(m: QemuMachine) -> int:
    cached = getattr(m, "_qemu_major", None)
    if cached is None:
        v = await m.qmp.execute("query-version")
        cached = v["qemu"]["major"]
        setattr(m, "_qemu_major", cached)
    return cached


async def live_snapshot(m: QemuMachine, overlays: dict[str, str], state_path: str | None,
                        *, method: str | None = None, max_bandwidth: int = MAX_BANDWIDTH,
                        precopy_downtime_ms: int = PRECOPY_DOWNTIME_MS) -> LiveSnapshotResult:
    """Switch every disk to its new overlay atomically; save memory if state_path.

    overlays: disk -> path of the new overlay, created beforehand with
    ``qemu-img create -f qcow2 -b <current active abs path> -F qcow2``.
    method: None = background-snapshot, falling back to pre-copy if QEMU or
    the kernel refuses it; "background-snapshot" or "precopy" to force one.
    max_bandwidth: bytes/s for a pre-copy save (default: unlimited; QEMU's
    own default would be 128 MiB/s).  QEMU 7.2's background-snapshot ignores it.
    Returns once the guest runs again; await ``result.wait_saved()`` for the
    memory file.  On failure before the switch nothing is changed (overlay
    nodes are removed again, the VM keeps/gets back its run state).
    """
    if set(overlays) != set(m.disks):
        raise LiveError(f"overlays for {sorted(overlays)} but the VM has disks {sorted(m.disks)}")
    if method not in (None, "background-snapshot", "precopy"):
        raise ValueError(f"method {method!r}")
    if state_path is not None and (await _migration_status(m)).get("status") in _ACTIVE:
        raise LiveError("a memory save is still running on this VM")
    runstate = await m.query_status()
    if runstate not in ("running", "paused", "prelaunch"):
        raise LiveError(f"VM is {runstate!r}: no snapshot now")
    if runstate == "prelaunch" and state_path is not None:
        # QEMU 7.2 aborts ("invalid runstate transition: 'prelaunch' -> 'paused'")
        # on a background snapshot of a VM that never ran, and a pre-copy save
        # would leave its disks inactivated: there is nothing to save anyway.
        raise LiveError("VM has never run (started paused): snapshot it without memory")
    was_running = runstate == "running"
    if state_path is not None:
        _check_space(m, state_path)
    setattr(m, "_bg_save_broken", False)

    # ---- before the pause: everything that can be prepared or refused
    layers = await chains(m)
    olds: dict[str, Layer] = {}
    new_nodes: dict[str, str] = {}
    for disk, path in overlays.items():
        path = os.path.abspath(path)
        top = layers[disk][0]
        header = qcow2_backing_file(path)
        if header != os.path.abspath(top.filename):
            raise LiveError(f"overlay {path} has backing {header!r}, but disk {disk!r} "
                            f"writes into {top.filename}")
        olds[disk] = top
        new_nodes[disk] = node_name(disk, path)
    added: list[str] = []
    fdname = None
    result = LiveSnapshotResult(None, None, new_nodes,
                                state_path and os.path.abspath(state_path), _m=m)
    try:
        for disk, path in overlays.items():
            path = os.path.abspath(path)
            await m.qmp.execute("blockdev-add", {
                "driver": "qcow2", "node-name": new_nodes[disk],
                "file": {"driver": "file", "filename": path,
                         "node-name": file_node_name(disk, path)},
                "backing": None})
            added.append(new_nodes[disk])
        if state_path is not None:
            await _qemu_major(m)                       # cached: no query after the pause
            result.method = await _prepare_migration(m, method, max_bandwidth,
                                                     precopy_downtime_ms)
            fdname, result._ident = await _pass_state_fd(m, result.state_path)
    except BaseException:
        if fdname:
            await _drop_fd(m, fdname)
        await _drop_nodes(m, added)
        raise
    actions = [{"type": "blockdev-snapshot",
                "data": {"node": olds[d].node, "overlay": new_nodes[d]}} for d in overlays]
    if result.method == "precopy":
        await _snapshot_precopy(m, actions, added, result, was_running, fdname)
        return result

    # ---- the pause: one pipelined burst
    seq = m.event_seq
    burst: list[tuple[str, dict[str, Any] | None]] = []
    if was_running:
        burst.append(("stop", None))
    burst.append(("transaction", {"actions": actions}))
    if result.method == "background-snapshot":
        burst.append(("migrate", {"uri": f"fd:{fdname}"}))
    elif was_running:
        burst.append(("cont", None))      # runs whatever the transaction did
    result._t0 = time.monotonic()
    async with _UffdWatchdog(m) as watchdog:
        replies = await _pipeline(m, burst)
        await _after_burst(m, burst, replies, result, added, fdname, was_running, seq)
    if watchdog.fired and result.error is None:
        result.error = "memory save failed: QEMU deadlocked on its write protection"
    result.pause_ms = _pause_ms(m, seq) if was_running else None
    result.timeline = _timeline(m, seq)
    return result


async def _after_burst(m: QemuMachine, burst: list[tuple[str, dict[str, Any] | None]],
                       replies: list[Any], result: LiveSnapshotResult, added: list[str],
                       fdname: str | None, was_running: bool, seq: int) -> None:
    failed = [(c, r) for (c, _), r in zip(burst, replies) if isinstance(r, BaseException)]
    errors = dict(failed)
    if "stop" in errors or "transaction" in errors:
        # nothing switched: undo everything (a started memory save included)
        if result.method == "background-snapshot" and "migrate" not in errors:
            await cancel_save(m)
        elif fdname:
            await _drop_fd(m, fdname)
        await _resume(m, was_running)
        await _drop_nodes(m, added)
        exc = errors.get("stop") or errors["transaction"]
        raise LiveError(f"disk switch refused: {exc}") from exc
    for _, exc in failed:
        if not isinstance(exc, ExecuteError):
            await _resume(m, was_running)
            raise exc
    if "migrate" in errors:
        # disks switched, the memory save did not start: snapshot without memory
        result.error = f"memory save not started: {errors['migrate']}"
        result.method = None
        await _drop_fd(m, fdname)
        await _resume(m, was_running)
    elif result.method == "background-snapshot":
        await _await_bg_resume(m, seq, was_running)


async def _prepare_migration(m: QemuMachine, method: str | None, max_bandwidth: int,
                             downtime_ms: int) -> str:
    await m.qmp.execute("migrate-set-parameters", {"max-bandwidth": max_bandwidth,
                                                   "downtime-limit": downtime_ms})
    if method in (None, "background-snapshot"):
        try:
            await _set_caps(m, events=True, pause_before_switchover=False,
                            background_snapshot=True)
            return "background-snapshot"
        except ExecuteError:
            if method == "background-snapshot":
                raise
    await _set_caps(m, events=True, background_snapshot=False,
                    pause_before_switchover=not m.config.multithreaded_tcg)
    return "precopy"


async def _await_bg_resume(m: QemuMachine, seq: int, was_running: bool) -> None:
    """After ``migrate`` with background-snapshot: get the guest running again.

    QEMU 7.2 resumes the VM itself once write protection is armed (even one
    that was paused before: it is stopped again here).  Newer QEMU keeps a
    VM that was stopped stopped: wait for MIGRATION ``active``, then ``cont``.
    """
    def ended(e: dict[str, Any]) -> bool:
        return e["event"] == "RESUME" or e["data"].get("status") in ("failed", "cancelled")

    if await _qemu_major(m) < 8:
        ev = await m.wait_event(("RESUME", "MIGRATION"), after=seq, timeout=60,
                                match=ended)
        if ev["event"] == "MIGRATION":
            # failed before write protection was armed: QEMU leaves the VM stopped
            await _resume(m, was_running)
        elif not was_running:
            await m.qmp.execute("stop")
    else:
        await m.wait_event("MIGRATION", after=seq, timeout=60,
                           match=lambda e: e["data"]["status"] != "setup")
        if was_running:
            await m.qmp.execute("cont")


async def _snapshot_precopy(m: QemuMachine, actions: list[dict[str, Any]], added: list[str],
                            result: LiveSnapshotResult, was_running: bool,
                            fdname: str | None) -> None:
    """Pre-copy to the state file; the disks switch at the memory instant.

    Live (guest runs while RAM is copied): capability pause-before-switchover,
    switch the disks at ``pre-switchover`` (QEMU has stopped the guest),
    ``migrate-continue``.  On multi-threaded TCG a live pre-copy is not exact
    (see MachineConfig.multithreaded_tcg), so there the guest is stopped for
    the whole save: ``stop``, switch, migrate, ``cont`` (a long pause, but a
    correct image).  Either way the source ends 'postmigrate' with its images
    inactivated and is ``cont``-ed at once.
    """
    live_copy = was_running and not m.config.multithreaded_tcg
    seq = m.event_seq
    result._t0 = time.monotonic()
    if live_copy:
        burst: list[tuple[str, dict[str, Any] | None]] = [("migrate", {"uri": f"fd:{fdname}"})]
    else:
        burst = ([("stop", None)] if was_running else []) + [
            ("transaction", {"actions": actions}), ("migrate", {"uri": f"fd:{fdname}"})]
    replies = await _pipeline(m, burst)
    errors = {c: r for (c, _), r in zip(burst, replies) if isinstance(r, BaseException)}
    if errors:
        if "migrate" not in errors:
            await cancel_save(m)
        else:
            await _drop_fd(m, fdname)
        await _resume(m, was_running)
        if "transaction" in errors or "stop" in errors or live_copy:
            await _drop_nodes(m, added)
            raise LiveError(f"snapshot refused: {next(iter(errors.values()))}")
        result.error = f"memory save not started: {errors['migrate']}"
        result.method = None
        return
    if live_copy:
        ev = await m.wait_event("MIGRATION", after=seq, timeout=None,
                                match=lambda e: e["data"]["status"] in ("pre-switchover",) + _TERMINAL)
        if ev["data"]["status"] != "pre-switchover":
            await _drop_nodes(m, added)
            await _resume(m, was_running)
            raise LiveError(f"pre-copy memory save {ev['data']['status']}")
        tx, cont = await _pipeline(m, [("transaction", {"actions": actions}),
                                       ("migrate-continue", {"state": "pre-switchover"})])
        if isinstance(tx, BaseException):
            await cancel_save(m)
            await _resume(m, was_running)
            await _drop_nodes(m, added)
            raise LiveError(f"disk switch refused: {tx}") from tx
    ev = await m.wait_event("MIGRATION", after=seq, timeout=None,
                            match=lambda e: e["data"]["status"] in _TERMINAL)
    # The source is now 'postmigrate' with its images inactivated: any write
    # before `cont` trips an assertion and kills QEMU 7.2.  `cont` takes the
    # images back; a VM that was paused is stopped again right away.
    await _resume(m, True)
    if not was_running:
        await m.qmp.execute("stop")
    if ev["data"]["status"] != "completed":
        result.error = f"pre-copy memory save {ev['data']['status']}"
        result.method = None
    result.pause_ms = _pause_ms(m, seq) if was_running else None
    result.timeline = _timeline(m, seq)
    info = await _migration_status(m)
    result.qemu_downtime_ms = info.get("downtime")


async def _resume(m: QemuMachine, wanted: bool) -> None:
    if wanted and (await m.query_status()) != "running":
        await m.qmp.execute("cont")


async def _drop_nodes(m: QemuMachine, nodes: list[str]) -> None:
    for node in nodes:
        with contextlib.suppress(ExecuteError):
            await m.qmp.execute("blockdev-del", {"node-name": node})


async def cancel_save(m: QemuMachine, state_path: str | None = None) -> str:
    """Stop a running memory save, for "delete while saving".

    Waits until QEMU has stopped writing (migration ended, file closed), then
    removes ``state_path`` if given (regular files only); disks and overlays
    are untouched.  A background snapshot is cancelled with ``migrate_cancel``
    and then :func:`release_write_protection` (QEMU 7.2 would leave the guest
    frozen).  Without the rights for that, the save is instead left to run to
    its end into the already-unlinked file (slower, never freezes the guest).
    Returns "cancelled", or "completed"/"failed" if the save had already
    ended, "none" if no save ever ran.
    """
    ident = _file_ident(state_path)
    seq = m.event_seq
    status = (await _migration_status(m)).get("status", "none")
    if status not in _TERMINAL and status != "none":
        bg = await _bg_capability(m)
        if bg and not (m.pid and _can_take_fds(m.pid)):
            _unlink_state(state_path)       # the blocks go when QEMU closes the file
            with contextlib.suppress(LiveError):
                await wait_save(m, None, ident)
            return "cancelled"
        await m.qmp.execute("migrate_cancel")
        while True:
            with contextlib.suppress(MachineError):
                ev = await m.wait_event("MIGRATION", after=seq, timeout=0.5,
                                        match=lambda e: e["data"]["status"] in _TERMINAL)
                status = ev["data"]["status"]
                break
            status = (await _migration_status(m)).get("status", "none")
            if status in _TERMINAL:
                break
        if bg and status != "completed":
            release_write_protection(m)
    await _wait_released(m, ident)
    _unlink_state(state_path)
    return status


def _unlink_state(state_path: str | None) -> None:
    if state_path is not None and os.path.isfile(state_path):   # never a device node
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state_path)


# ------------------------------------------------------------------- restore
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
                                match=lambda e: e["data"]["status"] in _TERMINAL)
        if ev["data"]["status"] != "completed":
            raise LiveError(f"restore from {state_path}: migration {ev['data']['status']}"
                            + m._log_tail())
        if not paused:
            await m.qmp.execute("cont")
        else:
            await m.query_status()
    except BaseException:
        await m.stop()
        raise
    return m


# ---------------------------------------------------------------- block jobs
@dataclass
class ChainResult:
    """A disk's chain after an online merge."""

    active: str               # file the disk now writes into
    backing: str | None       # backing file of the active layer now (recorded in its header)
    bytes: int                # bytes the job copied
    seconds: float


async def _run_job(m: QemuMachine, job_id: str, progress: Progress | None,
                   complete_when_ready: bool) -> int:
    """Drive a block job (auto-dismiss off) to its end; returns bytes moved.

    Event-driven (JOB_STATUS_CHANGE) with query-jobs polling as a backstop,
    so it also works when re-entered after a restart.
    """
    last = (0, 0)
    while True:
        seq = m.event_seq
        jobs = {j["id"]: j for j in await m.qmp.execute("query-jobs")}
        job = jobs.get(job_id)
        if job is None:
            raise LiveError(f"block job {job_id} vanished")
        cur = (job.get("current-progress", 0), job.get("total-progress", 0))
        if progress is not None and cur != last:
            progress(*cur)
            last = cur
        status = job["status"]
        if status == "ready" and complete_when_ready:
            await m.qmp.execute("job-complete", {"id": job_id})
            complete_when_ready = False
            continue
        if status == "concluded":
            await m.qmp.execute("job-dismiss", {"id": job_id})
            if job.get("error"):
                raise LiveError(f"block job {job_id} failed: {job['error']}")
            return cur[0]
        with contextlib.suppress(MachineError):
            await m.wait_event("JOB_STATUS_CHANGE", after=seq, timeout=0.25,
                               match=lambda e: e["data"]["id"] == job_id)


async def prune_nodes(m: QemuMachine, disk: str) -> list[str]:
    """``blockdev-del`` the disk's format nodes that are no longer in its chain.

    A node created by ``-blockdev``/``blockdev-add`` is owned by the monitor:
    when a block job drops it from the chain (the old top after an active
    commit, the streamed-over layers) it stays open -- file still locked and
    held open, and it still claims its backing node, so a later
    ``blockdev-snapshot`` on that backing fails with "node is used as backing
    hd of ...".  Nodes that were only inline children are freed by QEMU
    itself; deleting them is refused and ignored.  Returns the deleted nodes.
    """
    keep = {layer.node for layer in await chain(m, disk)}
    ours = re.compile(rf"^{re.escape(disk)}-[0-9a-f]{{10}}$")
    deleted = []
    for n in await m.qmp.execute("query-named-block-nodes", {"flat": True}):
        name = n["node-name"]
        if ours.match(name) and name not in keep:
            try:
                await m.qmp.execute("blockdev-del", {"node-name": name})
                deleted.append(name)
            except ExecuteError:
                pass
    return deleted


def _find_layer(layers: list[Layer], ref: str) -> Layer:
    for layer in layers:
        if ref == layer.node or os.path.abspath(ref) == layer.filename:
            return layer
    raise LiveError(f"{ref!r} is not in the chain {[l.filename for l in layers]}")


async def _existing_job(m: QemuMachine, job_id: str) -> bool:
    return any(j["id"] == job_id for j in await m.qmp.execute("query-jobs"))


async def stream_into_active(m: QemuMachine, disk: str, base: str | None, *,
                             progress: Progress | None = None) -> ChainResult:
    """block-stream: pull the layers between ``base`` and the active layer into it.

    base: node name or file name of the layer to keep as the new backing,
    None to pull everything (the active layer becomes standalone).  QEMU
    rewrites the active layer's header when the job ends; the layers above
    ``base`` drop out of QEMU's graph (the caller deletes their files).
    """
    check_disk_name(disk)
    job_id = f"stream-{disk}"
    t0 = time.monotonic()
    if not await _existing_job(m, job_id):
        layers = await chain(m, disk)
        top = layers[0]
        args: dict[str, Any] = {"job-id": job_id, "device": top.node, "auto-dismiss": False}
        if base is not None:
            keep = _find_layer(layers, base)
            if keep is top:
                raise LiveError("base is the active layer itself")
            if keep.filename == top.backing:
                return ChainResult(top.filename, top.backing, 0, 0.0)
            args["base-node"] = keep.node
            args["backing-file"] = keep.filename
        elif top.backing is None:
            return ChainResult(top.filename, None, 0, 0.0)
        await m.qmp.execute("block-stream", args)
    moved = await _run_job(m, job_id, progress, complete_when_ready=False)
    await prune_nodes(m, disk)
    after = (await chain(m, disk))[0]
    return ChainResult(after.filename, after.backing, moved, time.monotonic() - t0)


async def commit_active(m: QemuMachine, disk: str, *,
                        progress: Progress | None = None) -> ChainResult:
    """Active block-commit: write the active layer down into its backing layer.

    When the job is READY (base in sync, guest writes mirrored) it is
    completed; the disk then writes into the former backing layer, and the
    former active layer drops out of QEMU's graph (the caller deletes it).
    """
    check_disk_name(disk)
    job_id = f"commit-{disk}"
    t0 = time.monotonic()
    if not await _existing_job(m, job_id):
        layers = await chain(m, disk)
        if len(layers) < 2:
            raise LiveError(f"disk {disk!r}: the active layer has no backing to commit into")
        await m.qmp.execute("block-commit", {
            "job-id": job_id, "device": layers[0].node, "base-node": layers[1].node,
            "auto-dismiss": False})
    moved = await _run_job(m, job_id, progress, complete_when_ready=True)
    await prune_nodes(m, disk)
    after = (await chain(m, disk))[0]
    return ChainResult(after.filename, after.backing, moved, time.monotonic() - t0)


# ----------------------------------------------------------------------- HMP
async def hmp(m: QemuMachine, command: str) -> str:
    """Run an HMP command (``human-monitor-command``) and return its output.

    E.g. ``qemu-io -d /machine/peripheral/DISK/virtio-backend "write -P 0xab
    0 64k"`` writes through the disk's device (see :func:`qemu_io`).
    """
    out = await m.qmp.execute("human-monitor-command", {"command-line": command})
    return str(out)


async def qemu_io(m: QemuMachine, disk: str, command: str, *, timeout: float = 5.0) -> str:
    """Run a qemu-io command through the disk's own device (guest-visible I/O).

    E.g. ``await qemu_io(m, "disk0", "write -P 0xab 0 64k")`` or
    ``"read -P 0xab 0 64k"`` (verifies the pattern).  QEMU 7.2 prints HMP
    qemu-io output on its stdout, not into the HMP reply: it is read back
    from the VM's log.  Raises LiveError on a failed command or a pattern
    mismatch.  Not for concurrent use on one VM (outputs would interleave).
    """
    start = m.log_path.stat().st_size if m.log_path.exists() else 0
    reply = await hmp(m, f"qemu-io -d {m.qdev_path(disk)} {_hmp_quote(command)}")
    out = reply
    deadline = time.monotonic() + timeout
    while True:
        with open(m.log_path, "rb") as log:
            log.seek(start)
            out = reply + log.read().decode(errors="replace")
        # every qemu-io I/O command ends with a summary line or an error line
        if re.search(r"(bytes at offset|ops/sec|failed|error|Error)", out) \
                or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    if re.search(r"(failed|error)", out, re.IGNORECASE):
        raise LiveError(f"qemu-io {command!r} on {disk}: {out.strip()}")
    return out


def _hmp_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


_XP = re.compile(r":\s*0x([0-9a-fA-F]+)")


async def read_counter(m: QemuMachine, addr: int = COUNTER_ADDR) -> int:
    """The 32-bit word at guest-physical ``addr`` (the test guest's heartbeat)."""
    out = await hmp(m, f"xp /1wx {addr:#x}")
    hit = _XP.search(out)
    if hit is None:
        raise LiveError(f"unexpected xp output: {out!r}")
    return int(hit.group(1), 16)
