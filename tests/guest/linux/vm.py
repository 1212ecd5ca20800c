"""Run the Linux test guest under a plain qemu-system-x86_64 (not through snaptree).

    vm = LinuxVM(guest, disk, workdir)           # nothing runs yet; vm.command is the argv
    vm.start(); vm.wait_first_line()
    vm.console_lines(); vm.http_get("/"); vm.agent(); vm.qmp("query-status")
    vm.stop()                                    # QMP quit, then SIGKILL if needed

The machine: `-accel tcg -m 256 -nodefaults -display none -no-reboot`, the kernel and
initramfs by direct kernel boot (SeaBIOS, or OVMF with uefi=True), the data disk on
virtio-blk, the console on a serial chardev appending to workdir/serial.log, a
virtio-net NIC on user-mode networking with the guest's port 80 forwarded to a free
loopback port, the guest agent on a virtio-serial port, QMP on a unix socket.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from adapters.qemu.agent import GuestAgent
from .build import LinuxGuest
from .check import boot_ids, console_lines

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")


class VMError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LinuxVM:
    def __init__(self, guest: LinuxGuest, disk: str | os.PathLike[str], workdir: str | os.PathLike[str], *,
                 memory_mib: int = 256, interval_ms: int | None = None, net: bool = True,
                 agent: bool = True, uefi: bool = False, incoming: str | None = None,
                 serial_log: str | os.PathLike[str] | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.guest = guest
        self.disk = Path(disk)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.serial_log = Path(serial_log) if serial_log else self.workdir / "serial.log"
        # unix socket paths must stay short (108 bytes)
        sockdir = self.workdir if len(str(self.workdir)) < 80 else Path(tempfile.mkdtemp(prefix="stg-"))
        self.qmp_path = sockdir / "qmp.sock"
        self.agent_path = sockdir / "qga.sock" if agent else None
        self.http_port = free_port() if net else None
        self.uefi = uefi
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: Qmp | None = None
        self.started_at: float | None = None

        cmd = [
            "qemu-system-x86_64", "-accel", "tcg", "-m", str(memory_mib), "-nodefaults",
            "-display", "none", "-no-reboot",
        ]
        if uefi:
            vars_copy = self.workdir / "OVMF_VARS.fd"
            if not vars_copy.exists():
                shutil.copyfile(OVMF_VARS, vars_copy)
            cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                    "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
        cmd += [
            "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
            "-append", guest.append(interval_ms),
            "-drive", f"file={self.disk},if=none,id=data0,format=qcow2",
            "-device", "virtio-blk-pci,drive=data0",
            "-chardev", f"file,id=ser0,path={self.serial_log},append=on", "-serial", "chardev:ser0",
        ]
        if net:
            cmd += ["-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.http_port}-:80",
                    "-device", "virtio-net-pci,netdev=n0,romfile="]
        if agent:
            cmd += ["-device", "virtio-serial",
                    "-chardev", f"socket,path={self.agent_path},server=on,wait=off,id=qga0",
                    "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
        cmd += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if incoming:
            cmd += ["-incoming", incoming]
        cmd += list(extra_args)
        self.command = cmd

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "LinuxVM":
        if self.proc is not None:
            raise VMError("already started")
        for p in (self.qmp_path, self.agent_path):
            if p is not None:
                p.unlink(missing_ok=True)
        self._stderr = open(self.workdir / "qemu.stderr", "ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self._stderr,
                                     stderr=self._stderr, start_new_session=True)
        deadline = time.monotonic() + 30
        while not self.qmp_path.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise VMError(f"QEMU did not create {self.qmp_path}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 15.0) -> int | None:
        """quit over QMP (QEMU flushes the disk), SIGKILL if that does not work."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.qmp("quit")
            except Exception:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        self._stderr.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> "LinuxVM":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.kill()

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise VMError(f"QEMU exited with {self.proc.returncode}: {self.stderr_text()}\n"
                          f"console tail:\n{self.console_tail()}")

    def stderr_text(self) -> str:
        try:
            return (self.workdir / "qemu.stderr").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # ------------------------------------------------------------ console
    def console_text(self) -> str:
        try:
            return self.serial_log.read_bytes().decode(errors="replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def console_tail(self, n: int = 30) -> str:
        return "\n".join(self.console_text().splitlines()[-n:])

    def console_lines(self) -> list[int]:
        return console_lines(self.serial_log)

    def boot_ids(self) -> list[str]:
        return boot_ids(self.serial_log)

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            self._check_alive()
            if time.monotonic() > deadline:
                raise VMError(f"timed out after {timeout} s waiting for {what}; console tail:\n"
                              f"{self.console_tail()}\nqemu stderr: {self.stderr_text()}")
            time.sleep(0.1)

    def wait_console(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        rx = re.compile(pattern, re.M)
        return self.wait_for(lambda: rx.search(self.console_text()), timeout, f"/{pattern}/ on the console")

    def wait_line(self, above: int = 0, timeout: float = 60.0) -> int:
        """Wait until the console shows a SNAPTREE-LINE number > above; return the last one."""
        def last() -> int | None:
            lines = self.console_lines()
            return lines[-1] if lines and lines[-1] > above else None
        return self.wait_for(last, timeout, f"SNAPTREE-LINE > {above}")

    # ------------------------------------------------------------ channels
    def qmp(self, command: str, **arguments: Any) -> Any:
        if self._qmp is None:
            self._qmp = Qmp(self.qmp_path)
        return self._qmp.execute(command, arguments or None)

    def agent(self, timeout: float = 30.0) -> GuestAgent:
        if self.agent_path is None:
            raise VMError("this VM has no guest agent channel")
        return GuestAgent(self.agent_path, timeout=timeout)

    def http_get(self, path: str = "/", timeout: float = 10.0) -> str:
        if self.http_port is None:
            raise VMError("this VM has no NIC")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=timeout) as r:
            return r.read().decode()


class Qmp:
    """A tiny synchronous QMP client (greeting, qmp_capabilities, id-matched replies)."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(str(path))
        self._file = self._sock.makefile("rb")
        self._seq = 0
        greeting = self._read()
        if "QMP" not in greeting:
            raise VMError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise VMError("QMP connection closed")
        return json.loads(line)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self._seq += 1
        msg: dict[str, Any] = {"execute": command, "id": self._seq}
        if arguments:
            msg["arguments"] = arguments
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            try:
                reply = self._read()
            except VMError:
                if command == "quit":
                    return None
                raise
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != self._seq:
                continue
            if "error" in reply:
                raise VMError(f"QMP {command}: {reply['error'].get('desc')}")
            return reply.get("return")

    def close(self) -> None:
        try:
            self._file.close()
        finally:
            self._sock.close()
