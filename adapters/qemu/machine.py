"""QEMU process control: one ``qemu-system-x86_64`` process per VM.

A VM's QEMU lives in the VM's own folder ``run_dir``:

    run_dir/qmp.sock    QMP unix socket (created under umask 077: mode 0600)
    run_dir/qemu.pid    pidfile written by QEMU (-pidfile)
    run_dir/qemu.log    QEMU's stdout/stderr (appended; error messages of a
                        failed start or incoming migration end up here)

QEMU runs in its own session (setsid), so it outlives the snaptree process
that started it; :meth:`QemuMachine.attach` reconnects from pidfile + socket.

Block graph and names (stable, deterministic):

* every disk is one ``virtio-blk-pci`` (or ``ide-hd``) device whose qdev id is
  the disk name;
* every layer of every disk's chain is opened **explicitly** in one nested
  JSON ``-blockdev`` (format node ``node_name(disk, path)``, protocol node
  ``node_name(disk, path) + "-f"``) down to ``"backing": null`` at the bottom.
  Left to itself QEMU would open the backing chain from the qcow2 headers with
  invented names (``#block123``) that change on every start; naming each
  layer after a hash of its absolute path means the same file always has the
  same node name, in this QEMU, after a restart, and after overlays are
  added or layers merged away.  The chain is read with ``qemu-img info
  --backing-chain -U`` before the start, and every layer is opened at its
  ``full-backing-filename``, so QEMU still sees the backing it would have
  chosen itself (filenames stay plain, no ``json:`` pseudo-filenames).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from qemu.qmp import ConnectError, ExecInterruptedError, QMPClient, QMPError

QEMU_BINARY = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"

SOCKET_NAME = "qmp.sock"
PIDFILE_NAME = "qemu.pid"
LOG_NAME = "qemu.log"

_DISK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,17}$")

# QEMU run states reported as "running" by status(); all others (paused,
# prelaunch, inmigrate, postmigrate, finish-migrate, save-vm, ...) are "paused".
_RUNNING_STATES = {"running"}


class MachineError(RuntimeError):
    """QEMU could not be started, attached to, or did something unexpected."""


@dataclass
class MachineConfig:
    """Everything that defines the virtual hardware.

    A restore (incoming migration) needs exactly the same configuration as
    the VM that was saved, so this is what a snapshot's configuration copy
    must hold (see :meth:`to_dict` / :meth:`from_dict`).
    """

    memory_mib: int = 256
    cpus: int = 1
    kernel: str | None = None
    machine: str = "pc"               # pin e.g. "pc-i440fx-7.2" to restore across QEMU upgrades
    accel: str = "tcg"                # never kvm on these hosts; "tcg,thread=single" = no MTTCG
    disk_bus: str = "virtio"          # "virtio" (virtio-blk-pci) | "ide" (ide-hd)
    extra_args: list[str] = field(default_factory=list)
    qemu_binary: str = QEMU_BINARY

    @property
    def multithreaded_tcg(self) -> bool:
        """TCG with one thread per vCPU (QEMU's default for x86 on x86).

        QEMU 7.2 MTTCG loses guest writes to TLB-hot pages in the dirty log of
        a *live* pre-copy migration (measured: restored heartbeat page older
        than the pages it counts); background-snapshot (userfaultfd) and a
        pre-copy of a stopped VM are exact.
        """
        parts = self.accel.split(",")
        return parts[0] == "tcg" and "thread=single" not in parts[1:]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MachineConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def node_name(disk: str, path: str | os.PathLike[str]) -> str:
    """The format node name of the layer file ``path`` of disk ``disk``.

    ``disk`` + 10 hex digits of sha1(absolute path): at most 29 characters
    (QEMU allows 31), the protocol node adds ``-f``.
    """
    digest = hashlib.sha1(os.path.abspath(os.fspath(path)).encode()).hexdigest()[:10]
    return f"{disk}-{digest}"


def file_node_name(disk: str, path: str | os.PathLike[str]) -> str:
    return node_name(disk, path) + "-f"


def check_disk_name(disk: str) -> None:
    if not _DISK_NAME.match(disk):
        raise ValueError(
            f"disk name {disk!r}: must match {_DISK_NAME.pattern} (it becomes a QEMU id)")


async def image_chain(path: str) -> list[dict[str, Any]]:
    """``qemu-img info --backing-chain --output=json -U`` of path (top first)."""
    proc = await asyncio.create_subprocess_exec(
        QEMU_IMG, "info", "--backing-chain", "--output=json", "-U", path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise MachineError(f"qemu-img info {path}: {err.decode().strip()}")
    chain = json.loads(out)
    return chain if isinstance(chain, list) else [chain]


def blockdev_tree(disk: str, chain: list[dict[str, Any]], top_path: str) -> dict[str, Any]:
    """Nested ``-blockdev`` JSON that opens every layer of ``chain`` with our names."""
    paths = [os.path.abspath(top_path)]
    for layer in chain[:-1]:
        backing = layer.get("full-backing-filename") or layer.get("backing-filename")
        if not backing:
            break
        paths.append(backing)
    node: dict[str, Any] | None = None
    for layer, path in reversed(list(zip(chain, paths))):
        fmt = layer["format"]
        opts: dict[str, Any] = {
            "driver": fmt,
            "node-name": node_name(disk, path),
            "file": {"driver": "file", "filename": path,
                     "node-name": file_node_name(disk, path)},
        }
        if fmt == "qcow2":
            opts["backing"] = node          # None at the bottom -> "backing": null
        elif node is not None:
            raise MachineError(f"{path}: format {fmt} cannot have a backing file")
        node = opts
    assert node is not None
    return node


class QemuMachine:
    """One QEMU process for one VM, controlled over QMP (``qemu.qmp``).

    Events: a background task consumes the client's default event listener
    into a numbered, bounded log.  Code that waits for an event takes
    ``seq = m.event_seq`` *before* issuing the command that triggers it and
    then calls ``await m.wait_event(names, after=seq, ...)``: no event can be
    missed between command and wait.  (Do not consume ``m.qmp.events``
    yourself; register your own ``EventListener`` if you need a raw stream.)
    """

    def __init__(self, run_dir: Path | str, config: MachineConfig, disks: dict[str, str]):
        for disk in disks:
            check_disk_name(disk)
        if config.disk_bus not in ("virtio", "ide"):
            raise ValueError(f"disk_bus {config.disk_bus!r}: 'virtio' or 'ide'")
        self.run_dir = Path(run_dir).absolute()
        self.config = config
        self.disks = {d: os.path.abspath(p) for d, p in disks.items()}
        self.qmp = QMPClient(f"snaptree:{self.run_dir.name}")
        self._proc: asyncio.subprocess.Process | None = None
        self._pid: int | None = None
        self._runstate: str | None = None
        self._events: collections.deque[tuple[int, dict[str, Any]]] = collections.deque(maxlen=2000)
        self._seq = 0
        self._cond = asyncio.Condition()
        self._pump: asyncio.Task[None] | None = None

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
        return self._pid if self._pid is not None and _alive(self._pid) else None

    def device_id(self, disk: str) -> str:
        """qdev id of the disk's device (the disk name)."""
        return disk

    def qdev_path(self, disk: str) -> str:
        """QOM path of the device that owns the disk's BlockBackend.

        For virtio-blk-pci that is the inner virtio device, not the PCI proxy
        (``qemu-io -d <id>`` on the proxy fails: "Device does not have a
        block device backend").
        """
        if self.config.disk_bus == "virtio":
            return f"/machine/peripheral/{disk}/virtio-backend"
        return f"/machine/peripheral/{disk}"

    # -------------------------------------------------------------- lifecycle
    def command_line(self, chains: dict[str, list[dict[str, Any]]], *,
                     paused: bool = False, incoming: bool = False) -> list[str]:
        c = self.config
        args = [
            c.qemu_binary, "-accel", c.accel, "-nodefaults", "-no-user-config",
            "-display", "none", "-machine", c.machine,
            "-m", str(c.memory_mib), "-smp", str(c.cpus),
            "-name", f"snaptree-{re.sub(r'[^A-Za-z0-9_.-]', '_', self.run_dir.name)},"
                     "debug-threads=on",
            "-pidfile", str(self.pidfile),
            "-chardev", f"socket,id=qmp,path={_opt(self.socket_path)},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
        ]
        if c.kernel:
            args += ["-kernel", c.kernel]
        for index, (disk, path) in enumerate(self.disks.items()):
            tree = blockdev_tree(disk, chains[disk], path)
            args += ["-blockdev", json.dumps(tree, separators=(",", ":"))]
            if c.disk_bus == "virtio":
                # fixed PCI slots: the device layout is part of the migration stream
                args += ["-device", f"virtio-blk-pci,id={disk},drive={tree['node-name']},"
                                    f"addr={0x10 + index:#x}"]
            else:
                bus = f"ide.{index // 2}"
                args += ["-device", f"ide-hd,id={disk},drive={tree['node-name']},"
                                    f"bus={bus},unit={index % 2}"]
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
        QEMU; see ``live.restore`` for waiting on it).
        """
        if self.pid is not None or _pid_from_file(self.pidfile, self.socket_path) is not None:
            raise MachineError(f"a QEMU already runs in {self.run_dir}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        for stale in (self.socket_path, self.pidfile):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        chains = {}
        for disk, path in self.disks.items():
            chains[disk] = await image_chain(path)
        args = self.command_line(chains, paused=paused, incoming=incoming is not None)
        with open(self.log_path, "ab") as log:
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

    async def attach(self, timeout: float = 10.0) -> None:
        """Reconnect to the QEMU already running in run_dir (after a restart)."""
        pid = _pid_from_file(self.pidfile, self.socket_path)
        if pid is None:
            raise MachineError(f"no QEMU runs in {self.run_dir}")
        self._pid = pid
        await self._connect(timeout)

    async def detach(self) -> None:
        """Drop the QMP connection, leave QEMU running (what a restart does)."""
        await self._disconnect()

    async def stop(self, timeout: float = 10.0) -> None:
        """Quit QEMU (QMP ``quit``, then SIGTERM, then SIGKILL). Idempotent."""
        pid = self.pid or _pid_from_file(self.pidfile, self.socket_path)
        if pid is not None:
            self._pid = pid
        if self._connected():
            with contextlib.suppress(QMPError, EOFError, OSError, ExecInterruptedError):
                await asyncio.wait_for(self.qmp.execute("quit"), timeout=2)
        await self._disconnect()
        if pid is not None and not await self._wait_exit(pid, timeout):
            for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                if await self._wait_exit(pid, wait):
                    break
            else:
                raise MachineError(f"QEMU pid {pid} does not exit")
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

    async def query_status(self) -> str:
        """QEMU's own run state ("running", "paused", "inmigrate", "postmigrate", ...)."""
        st = await self.qmp.execute("query-status")
        self._runstate = st["status"]
        return st["status"]

    # ----------------------------------------------------------------- events
    @property
    def event_seq(self) -> int:
        """Sequence number of the last event received."""
        return self._seq

    def events_since(self, after: int, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        wanted = set(names) if names else None
        return [e for s, e in self._events
                if s > after and (wanted is None or e["event"] in wanted)]

    async def wait_event(self, names: str | Iterable[str], *, after: int,
                         match: Callable[[dict[str, Any]], bool] | None = None,
                         timeout: float | None = 60.0) -> dict[str, Any]:
        """First event named in ``names``, received after ``after``, accepted by ``match``."""
        wanted = {names} if isinstance(names, str) else set(names)

        def find() -> dict[str, Any] | None:
            for s, e in self._events:
                if s > after and e["event"] in wanted and (match is None or match(e)):
                    return e
            return None

        async def waiter() -> dict[str, Any]:
            async with self._cond:
                while True:
                    hit = find()
                    if hit is not None:
                        return hit
                    if not self._connected() or self.pid is None:
                        raise MachineError(
                            f"QEMU gone while waiting for {sorted(wanted)}" + self._log_tail())
                    # re-check liveness now and then: a dead QEMU sends no more events
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._cond.wait(), 0.5)

        try:
            return await asyncio.wait_for(waiter(), timeout)
        except asyncio.TimeoutError:
            raise MachineError(f"timeout ({timeout}s) waiting for {sorted(wanted)}") from None

    # -------------------------------------------------------------- internals
    def _connected(self) -> bool:
        from qemu.qmp import Runstate
        return self.qmp.runstate == Runstate.RUNNING

    async def _connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None and self._proc.returncode is not None:
                raise MachineError(
                    f"QEMU exited with status {self._proc.returncode}" + self._log_tail())
            if self._pid is not None and not _alive(self._pid):
                raise MachineError("QEMU is gone" + self._log_tail())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MachineError(f"cannot connect to {self.socket_path}" + self._log_tail())
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
        self._pump = asyncio.get_running_loop().create_task(self._pump_events())
        await self.query_status()

    async def _pump_events(self) -> None:
        try:
            async for event in self.qmp.events:
                self._seq += 1
                self._events.append((self._seq, event))
                if event["event"] == "STOP":
                    self._runstate = "paused"
                elif event["event"] == "RESUME":
                    self._runstate = "running"
                elif event["event"] == "SHUTDOWN":
                    self._runstate = "shutdown"
                async with self._cond:
                    self._cond.notify_all()
        except asyncio.CancelledError:
            pass

    async def _disconnect(self) -> None:
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump
            self._pump = None
        self.qmp.events.clear()
        async with self._cond:
            self._cond.notify_all()

    async def _wait_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def _kill(self) -> None:
        await self._disconnect()
        if self._pid is not None and _alive(self._pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            await self._wait_exit(self._pid, 5.0)
        if self._proc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._proc.wait(), 1)

    def _log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        tail = [ln for ln in text if not ln.startswith("--- ")][-lines:]
        return (": " + " | ".join(tail)) if tail else ""


def _opt(value: object) -> str:
    """Escape a value for QEMU's key=value option syntax (',' -> ',,')."""
    return str(value).replace(",", ",,")


def _alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def _pid_from_file(pidfile: Path, socket_path: Path) -> int | None:
    """The live QEMU of this run_dir (pidfile, checked against /proc cmdline)."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    if not _alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    # guards against a recycled pid: the process must be the QEMU of this socket
    if not any(_opt(socket_path).encode() in arg for arg in cmdline):
        return None
    return pid


def running_pid(run_dir: Path | str) -> int | None:
    """The pid of the QEMU running in run_dir, or None (a stale pidfile does not count)."""
    run = Path(run_dir)
    return _pid_from_file(run / PIDFILE_NAME, run / SOCKET_NAME)
