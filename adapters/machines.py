"""The service layer's `Machines` port on real QEMU processes, found by VM name.

A VM's QEMU lives in `<data>/vms/<vm>/run/` (QMP socket 0600, pidfile, log) and outlives
snaptree, so every operation first looks for a running process there; nothing is kept between
commands. `attach` looks into /proc once and opens one QMP connection that the worker keeps for
all the steps of one drain (adapters/qemu/session.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from adapters.qemu.agent import AgentError, GuestAgent
from adapters.qemu.devices import AGENT_CHARDEV, AGENT_SOCKET, OVMF_VARS
from adapters.qemu.hardware import MachineConfig
from adapters.qemu.process import running_pid
from adapters.storage import DataDir
from domain.memory import LiveSwitch, SavedMemory, SaveMethod
from domain.vm import VirtualMachine

if TYPE_CHECKING:  # the QMP client (asyncio, qemu.qmp) is loaded only when a QEMU runs or starts
    from adapters.qemu.session import LiveVM

# VM settings snaptree keeps in a node's configuration (domain/definition.py) and hands to QEMU.
CONFIG_KEYS = ("memory_mib", "cpus", "kernel", "initrd", "append", "machine", "accel", "cpu", "firmware",
               "disk_bus", "disk_options", "cdrom", "nics", "display", "agent", "hugepages")
CHUNK = 1 << 20
NVRAM_NAME = "nvram.fd"


def machine_config(config: dict[str, Any], nvram: str | None = None) -> MachineConfig:
    known = {k: v for k, v in config.items() if k in CONFIG_KEYS and v is not None}
    if config.get("qemu_args"):
        known["extra_args"] = list(config["qemu_args"])  # type: ignore[call-overload]
    if known.get("firmware") == "uefi":
        known["nvram"] = nvram
    return MachineConfig.from_dict(known)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class GrowingFileHash:
    """sha256 of a file that one writer appends to, read in a thread while it grows."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._h = hashlib.sha256()
        self._opened = False
        self._done = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        try:
            f = open(self._path, "rb")
        except OSError:
            return  # not there: finish() hashes the whole file
        self._opened = True
        with f:
            while not self._stop:
                chunk = f.read(CHUNK)
                if chunk:
                    self._h.update(chunk)
                elif self._done.is_set():
                    return  # the writer closed it and everything is read
                else:
                    time.sleep(0.005)

    def finish(self) -> str:
        """The digest, once the writer has closed the file."""
        self._done.set()
        self._thread.join()
        return self._h.hexdigest() if self._opened else sha256_file(self._path)

    def abandon(self) -> None:
        self._stop = True
        self._done.set()
        self._thread.join()


class QemuLive:
    """One running QEMU for the worker: the session facade, in the port's domain types, and
    its guest agent (one connection, opened when first needed)."""

    def __init__(self, live: LiveVM, agent_path: Path | None = None) -> None:
        self._live = live
        self._agent_path = agent_path
        self._agent: GuestAgent | None = None

    # --- the guest agent ---

    def _ga(self, timeout: float) -> GuestAgent:
        if self._agent_path is None or not self._agent_path.exists():
            raise AgentError("the VM has no guest agent channel")
        if self._agent is None:
            self._agent = GuestAgent(self._agent_path, timeout=timeout, connect=False)
            self._agent.connect(timeout)
        return self._agent

    def agent_state(self, timeout: float = 1.0) -> str:
        if self._agent_path is None or not self._agent_path.exists():
            return "absent"
        if not self._live.guest_opened(AGENT_CHARDEV):
            return "absent"  # no agent runs in the guest: no reason to wait for one
        try:
            self._ga(timeout).sync(time.monotonic() + timeout)
            return "connected"
        except AgentError:
            self._drop_agent()
            return "unresponsive"

    def freeze(self, timeout: float) -> int:
        try:
            return int(self._ga(timeout).fsfreeze_freeze(timeout=timeout))
        except AgentError:
            self._drop_agent()  # a reply that comes late must not be read as another's
            raise

    def thaw(self, timeout: float = 10.0) -> int:
        """Thaw, retried until `timeout`: after a freeze that timed out the agent may still be
        freezing, and answers the thaw once it is done."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return int(self._ga(min(2.0, timeout)).fsfreeze_thaw(timeout=min(2.0, timeout)))
            except AgentError:
                self._drop_agent()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def thaw_if_frozen(self) -> bool:
        if self.agent_state() != "connected":
            return False
        if self._ga(1.0).fsfreeze_status() != "frozen":
            return False
        self.thaw()
        return True

    def freeze_status(self) -> str | None:
        try:
            return str(self._ga(1.0).fsfreeze_status())
        except AgentError:
            self._drop_agent()
            return None

    def resume(self) -> None:
        self._live.resume()

    def set_time(self) -> None:
        self._ga(2.0).set_time(time.time_ns())

    def _drop_agent(self) -> None:
        if self._agent is not None:
            self._agent.close()
            self._agent = None

    @property
    def pid(self) -> int:
        return self._live.pid

    def active_layers(self) -> dict[str, str]:
        return self._live.active_layers()

    def switch(self, overlays: dict[str, str], state_path: str | None) -> LiveSwitch:
        s = self._live.switch(overlays, state_path)
        return LiveSwitch(
            pause_ms=round(s.pause_ms, 3) if s.pause_ms is not None else None,
            method=SaveMethod(s.method) if s.method else None,
            qemu_downtime_ms=s.qemu_downtime_ms, memory_error=s.memory_error,
        )

    def saving(self) -> SaveMethod | None:
        method = self._live.saving()
        return SaveMethod(method) if method else None

    def wait_saved(self, state_path: str, progress: Callable[[float], None]) -> SavedMemory:
        # QEMU writes the state as one stream, front to back: hash it as it grows, so only the
        # tail is left once the save ends (a pass over 1 GiB after it took 0.6 s).
        hasher = GrowingFileHash(state_path)
        try:
            saved = self._live.wait_saved(state_path, progress)
        except BaseException:
            hasher.abandon()
            raise
        return SavedMemory(saved.bytes, saved.seconds, hasher.finish())

    def cancel_save(self, state_path: str) -> None:
        self._live.cancel_save(state_path)

    def commit_online(self, disk: str, top: str, base: str, progress: Callable[[float], None]) -> None:
        self._live.commit_online(disk, top, base, progress)

    def stream_online(self, disk: str, into: str, base: str, progress: Callable[[float], None]) -> None:
        self._live.stream_online(disk, into, base, progress)

    def run_state(self) -> str:
        return self._live.run_state()

    def stop(self) -> None:
        self._drop_agent()
        self._live.stop()

    def close(self) -> None:
        self._drop_agent()
        self._live.close()


class QemuMachines:
    def __init__(self, data: DataDir) -> None:
        self.data = data

    def run_dir(self, vm_name: str) -> Path:
        return self.data.vm_dir(vm_name) / "run"

    def pid(self, vm_name: str) -> int | None:
        return running_pid(self.run_dir(vm_name))

    def probe(self, vm: VirtualMachine) -> tuple[str, int | None]:
        live = self.attach(vm)
        if live is None:
            return "stopped", None
        try:
            return live.run_state(), live.pid
        finally:
            live.close()

    def config(self, vm: VirtualMachine, config: dict[str, Any]) -> MachineConfig:
        return machine_config(config, str(self.data.vm_dir(vm.name) / NVRAM_NAME))

    def attach(self, vm: VirtualMachine) -> QemuLive | None:
        run_dir = self.run_dir(vm.name)
        if running_pid(run_dir) is None:
            return None  # a stopped VM: no connection to open, no QMP client to load
        from adapters.qemu.session import LiveVM

        node = vm.nodes[vm.current]
        live = LiveVM.attach(run_dir, self.config(vm, node.config), dict(node.layers))
        return QemuLive(live, self._agent_path(vm)) if live is not None else None

    def start(self, vm: VirtualMachine, *, paused: bool) -> QemuLive:
        node = vm.nodes[vm.current]
        run_dir = self.data.private_dir(self.run_dir(vm.name))
        config = self._prepared(self.config(vm, node.config))
        from adapters.qemu.session import LiveVM

        return QemuLive(LiveVM.start(run_dir, config, dict(node.layers), paused=paused), self._agent_path(vm))

    def restore(self, vm: VirtualMachine, layers: dict[str, str], config: dict[str, object],
                state_path: str, *, paused: bool) -> QemuLive:
        run_dir = self.data.private_dir(self.run_dir(vm.name))
        machine = self._prepared(self.config(vm, dict(config)))
        from adapters.qemu.session import LiveVM

        return QemuLive(LiveVM.restore(run_dir, machine, layers, state_path, paused=paused), self._agent_path(vm))

    def _agent_path(self, vm: VirtualMachine) -> Path:
        return self.run_dir(vm.name) / AGENT_SOCKET

    def _prepared(self, config: MachineConfig) -> MachineConfig:
        """A UEFI VM's NVRAM starts as a copy of the firmware's empty variable store."""
        if config.nvram is not None and not os.path.exists(config.nvram):
            tmp = config.nvram + ".tmp"
            shutil.copyfile(OVMF_VARS, tmp)
            os.chmod(tmp, 0o600)
            os.replace(tmp, config.nvram)
        return config
