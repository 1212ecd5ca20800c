"""QEMU process control: one ``qemu-system-x86_64`` process per VM, and its QMP connection.

A VM's QEMU lives in the VM's own folder ``run_dir``:

    run_dir/qmp.sock    QMP unix socket (created under umask 077: mode 0600)
    run_dir/qemu.pid    pidfile written by QEMU (-pidfile)
    run_dir/qemu.log    QEMU's stdout/stderr (appended; error messages of a
                        failed start or incoming migration end up here)

QEMU runs in its own session (setsid), so it outlives the snaptree process
that started it; :meth:`QemuMachine.attach` reconnects from pidfile + socket.
How the disks are named and opened: :mod:`adapters.qemu.blockdev`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from qemu.qmp import ConnectError, ExecInterruptedError, Message, QMPClient, QMPError, Runstate

from adapters.qemu import qcow2
from adapters.qemu import devices, hugepages
from adapters.qemu.blockdev import BUSES, disk_args
from adapters.qemu.errors import MachineError, QemuImgError
from adapters.qemu.events import Event, EventLog
from adapters.qemu.hardware import MachineConfig, resolve_accel
from adapters.qemu.process import (LOG_NAME, PIDFILE_NAME, SOCKET_NAME, alive, log_tail, opt,
                                   pid_from_file, terminate, wait_exit)
from domain.names import disk_name

# QEMU run states reported as "running" by status(); all others (paused,
# prelaunch, inmigrate, postmigrate, finish-migrate, save-vm, ...) are "paused".
_RUNNING_STATES = {"running"}


class _QMP(QMPClient):
    """qemu.qmp formats every message (indented JSON) for its debug log even when nothing logs at
    that level: ~0.5 ms per large reply (``query-named-block-nodes``), a block job reads many."""

    def _cb_outbound(self, msg: Message) -> Message:
        return super()._cb_outbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg

    def _cb_inbound(self, msg: Message) -> Message:
        return super()._cb_inbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg


class QemuMachine:
    """One QEMU process for one VM, controlled over QMP (``qemu.qmp``).

    Events: a background task consumes the client's default event listener
    into a numbered, bounded log (:class:`~adapters.qemu.events.EventLog`).
    Code that waits for an event takes ``seq = m.event_seq`` *before* issuing
    the command that triggers it and then calls ``await m.wait_event(names,
    after=seq, ...)``.  (Do not consume ``m.qmp.events`` yourself; register
    your own ``EventListener`` if you need a raw stream.)
    """

    def __init__(self, run_dir: Path | str, config: MachineConfig, disks: dict[str, str]):
        for disk in disks:
            disk_name(disk)                 # it becomes a QEMU id: the one rule, domain.names
        for disk in disks:
            if config.bus(disk) not in BUSES:
                raise ValueError(f"disk {disk}: bus {config.bus(disk)!r} is not one of {', '.join(BUSES)}")
        self.run_dir = Path(run_dir).absolute()
        self.config = config
        self.disks = {d: os.path.abspath(p) for d, p in disks.items()}
        self.qmp = _QMP(f"snaptree:{self.run_dir.name}")
        self._proc: asyncio.subprocess.Process | None = None
        self._pid: int | None = None
        self._runstate: str | None = None
        self._log = EventLog(maxlen=2000)
        self._pump: asyncio.Task[None] | None = None
        self._qemu_major: int | None = None

    # ------------------------------------------------------------------ paths
    @property
    def socket_path(self) -> Path:
        return self.run_dir / SOCKET_NAME

    @property
    def pidfile(self) -> Path:
        return self.run_dir / PIDFILE_NAME

    @property
    def log_path(self) -> Path:
        return self.run_dir / LOG_NAME

    @property
    def pid(self) -> int | None:
        return self._pid if self._pid is not None and alive(self._pid) else None

    def device_id(self, disk: str) -> str:
        """qdev id of the disk's device (the disk name)."""
        return disk

    def qdev_path(self, disk: str) -> str:
        """QOM path of the device that owns the disk's BlockBackend.

        For virtio-blk-pci that is the inner virtio device, not the PCI proxy
        (``qemu-io -d <id>`` on the proxy fails: "Device does not have a
        block device backend").
        """
        if self.config.bus(disk) == "virtio":
            return f"/machine/peripheral/{disk}/virtio-backend"
        return f"/machine/peripheral/{disk}"

    # -------------------------------------------------------------- lifecycle
    def command_line(self, chains: dict[str, list[qcow2.ChainImage]], *,
                     paused: bool = False, incoming: bool = False) -> list[str]:
        c = self.config
        args = [
            c.qemu_binary, "-accel", resolve_accel(c.accel), "-nodefaults", "-no-user-config",
            *devices.display_args(c), "-machine", devices.machine_option(c),
            "-m", str(c.memory_mib), *devices.memory_args(c), "-smp", str(c.cpus),
            "-name", f"snaptree-{re.sub(r'[^A-Za-z0-9_.-]', '_', self.run_dir.parent.name)},"
                     "debug-threads=on",
            "-pidfile", str(self.pidfile),
            "-chardev", f"socket,id=qmp,path={opt(self.socket_path)},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
        ]
        args += devices.firmware_args(c) + devices.boot_args(c)
        args += disk_args(self.disks, chains, c.disk_bus, c.disk_options)
        args += devices.cdrom_args(c) + devices.nic_args(c) + devices.console_args(c, self.run_dir)
        args += devices.agent_args(c, self.run_dir)
        if paused or incoming:
            args.append("-S")
        if incoming:
            args += ["-incoming", "defer"]
        args += list(c.extra_args)
        return args

    async def start(self, *, paused: bool = False, incoming: str | None = None,
                    timeout: float = 30.0) -> None:
        """Start QEMU; with ``incoming`` (a migration URI) load that state.

        ``incoming``: QEMU starts with ``-incoming defer -S``; this method
        enables the ``events`` migration capability and issues
        ``migrate-incoming`` with the URI, then returns (the load runs in
        QEMU; see ``migration.restore`` for waiting on it).
        """
        if self.pid is not None or pid_from_file(self.pidfile, self.socket_path) is not None:
            raise MachineError(f"a QEMU already runs in {self.run_dir}")
        if self.config.hugepages:
            hugepages.check_free(self.config.memory_mib)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        for stale in (self.socket_path, self.pidfile):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        chains = {}
        for disk, path in self.disks.items():
            try:
                chains[disk] = await qcow2.backing_chain_async(path)
            except QemuImgError as exc:
                raise MachineError(f"qemu-img info {path}: {exc.stderr.strip()}") from None
        args = self.command_line(chains, paused=paused, incoming=incoming is not None)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)  # the guest's console and QEMU's messages: the owner's only
        with open(fd, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} start: "
                      f"{' '.join(args)}\n".encode())
            log.flush()
            self._proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,     # survives snaptree, not hit by its Ctrl-C
                umask=0o077,                # QMP socket and pidfile: owner only
                cwd=self.run_dir)
        self._pid = self._proc.pid
        try:
            await self._connect(timeout)
            if incoming is not None:
                await self.qmp.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "events", "state": True}]})
                await self.qmp.execute("migrate-incoming", {"uri": incoming})
        except BaseException:
            await self._kill()
            raise

    async def attach(self, timeout: float = 10.0, *, pid: int | None = None) -> None:
        """Reconnect to the QEMU already running in run_dir (after a restart).

        ``pid``: the caller has just found it (``process.running_pid``): not looked up again.
        """
        if pid is None:
            pid = pid_from_file(self.pidfile, self.socket_path)
        if pid is None:
            raise MachineError(f"no QEMU runs in {self.run_dir}")
        self._pid = pid
        await self._connect(timeout)

    async def detach(self) -> None:
        """Drop the QMP connection, leave QEMU running (what a restart does)."""
        await self._disconnect()

    async def stop(self, timeout: float = 10.0) -> None:
        """Quit QEMU (QMP ``quit``, then SIGTERM, then SIGKILL). Idempotent."""
        pid = self.pid or pid_from_file(self.pidfile, self.socket_path)
        if pid is not None:
            self._pid = pid
        if self.connected():
            with contextlib.suppress(QMPError, EOFError, OSError, ExecInterruptedError):
                await asyncio.wait_for(self.qmp.execute("quit"), timeout=2)
        await self._disconnect()
        if pid is not None:
            await terminate(pid, timeout)
        if self._proc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._proc.wait(), 1)
            self._proc = None
        self._runstate = None
        for leftover in (self.socket_path, self.pidfile):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()

    def status(self) -> str:
        """"running" | "paused" | "stopped" (from QEMU's STOP/RESUME events)."""
        if self.pid is None:
            return "stopped"
        return "running" if self._runstate in _RUNNING_STATES else "paused"

    async def query(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """A QMP command whose reply is read: JSON, typed Any (``qmp.execute`` says object)."""
        return await self.qmp.execute(command, arguments)

    async def query_status(self) -> str:
        """QEMU's own run state ("running", "paused", "inmigrate", "postmigrate", ...)."""
        st = await self.query("query-status")
        self._runstate = st["status"]
        return str(st["status"])

    async def qemu_major(self) -> int:
        """QEMU's major version (asked once per connection: never inside a pause)."""
        if self._qemu_major is None:
            v = await self.query("query-version")
            self._qemu_major = int(v["qemu"]["major"])
        return self._qemu_major

    # ----------------------------------------------------------------- events
    @property
    def event_seq(self) -> int:
        """Sequence number of the last event received."""
        return self._log.seq

    def events_since(self, after: int, names: Iterable[str] | None = None) -> list[Event]:
        return self._log.since(after, names)

    async def wait_event(self, names: str | Iterable[str], *, after: int,
                         match: Callable[[Event], bool] | None = None,
                         timeout: float | None = 60.0) -> Event:
        """First event named in ``names``, received after ``after``, accepted by ``match``."""
        def gone() -> str | None:
            return self.log_tail() if not self.connected() or self.pid is None else None

        return await self._log.wait(names, after=after, match=match, timeout=timeout, gone=gone)

    # -------------------------------------------------------------- internals
    def connected(self) -> bool:
        return bool(self.qmp.runstate == Runstate.RUNNING)

    async def _connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None and self._proc.returncode is not None:
                raise MachineError(
                    f"QEMU exited with status {self._proc.returncode}" + self.log_tail())
            if self._pid is not None and not alive(self._pid):
                raise MachineError("QEMU is gone" + self.log_tail())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MachineError(f"cannot connect to {self.socket_path}" + self.log_tail())
            if self.socket_path.exists():
                level = self.qmp.logger.level
                self.qmp.logger.setLevel(logging.CRITICAL)   # expected refusals: no noise
                try:
                    # the greeting only comes once no other client holds the monitor
                    await asyncio.wait_for(self.qmp.connect(str(self.socket_path)),
                                           min(remaining, 5.0))
                    break
                except (ConnectError, asyncio.TimeoutError, OSError):
                    with contextlib.suppress(Exception):
                        await self.qmp.disconnect()
                finally:
                    self.qmp.logger.setLevel(level)
            await asyncio.sleep(0.01)
        with contextlib.suppress(OSError):
            os.chmod(self.socket_path, 0o600)
        self._pump = asyncio.get_running_loop().create_task(
            self._log.pump(self.qmp.events, self._track_runstate))
        await self.query_status()

    def _track_runstate(self, event: Event) -> None:
        name = event["event"]
        if name == "STOP":
            self._runstate = "paused"
        elif name == "RESUME":
            self._runstate = "running"
        elif name == "SHUTDOWN":
            self._runstate = "shutdown"

    async def _disconnect(self) -> None:
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump
            self._pump = None
        self.qmp.events.clear()
        await self._log.wake()

    async def _kill(self) -> None:
        await self._disconnect()
        if self._pid is not None and alive(self._pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            await wait_exit(self._pid, 5.0)
        if self._proc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._proc.wait(), 1)

    def log_tail(self, lines: int = 8) -> str:
        """The last lines QEMU wrote to its log, as ": a | b | c" for an error message."""
        return log_tail(self.log_path, lines)

