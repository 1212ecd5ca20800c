"""In-memory implementations of the service layer's ports (service/ports.py).

`FakeImages` keeps every file as a layer with a backing path and a map offset -> pattern, and
reads through backing chains the way qcow2 does; `FakeMachines` runs "QEMU" as a record of which
layers each disk writes into. Both count what the real adapters would cost (QMP connections,
/proc checks) and can be told to fail at a given call, to drive the worker's error and resume
paths in milliseconds. The real-binary tests stay the proof.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from adapters.qemu.errors import LiveError, QemuImgError
from domain.memory import LiveSwitch, SavedMemory, SaveMethod
from domain.vm import VirtualMachine

BLOCK = 64 * 1024
Fraction = Callable[[float], None]


@dataclass
class Image:
    backing: str | None
    data: dict[int, str] = field(default_factory=dict)
    format: str = "qcow2"


class Crash(BaseException):
    """A kill -9 in the middle of a step: nothing after it runs, nothing is recorded."""


@dataclass
class FakeImages:
    files: dict[str, Image] = field(default_factory=dict)
    fail: dict[str, int] = field(default_factory=dict)  # call name -> raise at that call number
    crash: dict[str, int] = field(default_factory=dict)  # call name -> Crash at that call number
    calls: dict[str, int] = field(default_factory=dict)

    # --- test helpers ---

    def make(self, path: str, data: dict[int, str] | None = None, backing: str | None = None) -> str:
        self.files[path] = Image(backing, dict(data or {}))
        return path

    def read(self, path: str) -> dict[int, str]:
        """What a guest reads through `path`'s chain."""
        out: dict[int, str] = {}
        for image in reversed(self._chain(path)):
            out.update(image.data)
        return out

    def write(self, path: str, offset: int, pattern: str) -> None:
        self.files[path].data[offset] = pattern

    def _chain(self, path: str) -> list[Image]:
        images, seen = [], path
        while seen is not None:
            image = self.files[seen]
            images.append(image)
            seen = image.backing  # type: ignore[assignment]
        return images

    def _call(self, name: str) -> None:
        n = self.calls[name] = self.calls.get(name, 0) + 1
        if self.crash.get(name) == n:
            raise Crash(f"killed in {name} #{n}")
        if self.fail.get(name) == n:
            raise QemuImgError([f"qemu-img {name}"], 1, f"injected failure of {name} #{n}")

    # --- the Disks port ---

    def chain(self, path: str) -> list[tuple[str, str]]:
        self._call("chain")
        if path not in self.files:
            raise QemuImgError(["qemu-img", "info"], 1, f"Could not open '{path}': No such file")
        out, seen = [], path
        while seen is not None:
            image = self.files[seen]
            out.append((seen, image.format))
            seen = image.backing  # type: ignore[assignment]
        return out

    def create_overlay(self, path: str, backing: str) -> None:
        self._call("create_overlay")
        if path in self.files:
            if self.files[path].backing != backing:
                raise ValueError(f"{path} exists with backing {self.files[path].backing}, not {backing}")
            return
        if backing not in self.files:
            raise QemuImgError(["qemu-img", "create"], 1, f"Could not open backing file {backing}")
        self.files[path] = Image(backing)

    def create_overlays(self, pairs: list[tuple[str, str]]) -> None:
        self._call("create_overlays")
        for path, backing in pairs:
            self.create_overlay(path, backing)

    def backing_file(self, path: str) -> str | None:
        return self.files[path].backing

    def allocated_bytes(self, path: str) -> int:
        return len(self.files[path].data) * BLOCK

    def commit(self, top: str, progress: Fraction) -> None:
        self._call("commit")
        image = self.files[top]
        assert image.backing is not None
        self.files[image.backing].data.update(image.data)
        progress(1.0)

    def rebase_safe(self, path: str, backing: str, progress: Fraction) -> None:
        self._call("rebase_safe")
        before = self.read(path)
        image = self.files[path]
        image.backing = backing
        after = self.read(backing)
        for offset, pattern in before.items():
            if after.get(offset) != pattern:
                image.data[offset] = pattern
        progress(1.0)

    def rebase_unsafe(self, path: str, backing: str) -> None:
        self._call("rebase_unsafe")
        self.files[path].backing = backing

    def repair_leaks(self, path: str) -> None:
        self._call("repair_leaks")

    def check(self, path: str) -> tuple[str, str] | None:
        self._call("check")
        return None

    def remove(self, path: str) -> None:
        self._call("remove")
        self.files.pop(path, None)

    def exists(self, path: str) -> bool:
        return path in self.files


@dataclass
class FakeLive:
    images: FakeImages
    disks: dict[str, str]  # disk -> active layer
    pid: int
    paused: bool = False
    saving_to: str | None = None
    closed: bool = False
    fail_switch: str | None = None  # memory error to report on the next switch
    agent: str = "absent"  # connected | absent | unresponsive
    frozen: bool = False
    freezes: int = 0
    hang_freeze: bool = False  # the freeze times out (the guest's agent is stuck)
    time_set: int = 0

    def active_layers(self) -> dict[str, str]:
        return dict(self.disks)

    def switch(self, overlays: dict[str, str], state_path: str | None) -> LiveSwitch:
        self.disks = dict(overlays)
        if state_path is None:
            return LiveSwitch(pause_ms=5.0)
        if self.fail_switch:
            return LiveSwitch(pause_ms=5.0, memory_error=self.fail_switch)
        self.images.files[state_path] = Image(None, {0: "memory"}, format="state")
        self.saving_to = state_path
        return LiveSwitch(pause_ms=5.0, method=SaveMethod.BACKGROUND_SNAPSHOT, qemu_downtime_ms=3)

    def saving(self) -> SaveMethod | None:
        return SaveMethod.BACKGROUND_SNAPSHOT if self.saving_to else None

    def wait_saved(self, state_path: str, progress: Fraction) -> SavedMemory:
        if self.saving_to != state_path:
            raise LiveError(f"no memory save to {state_path} runs")
        self.saving_to = None
        progress(1.0)
        return SavedMemory(1 << 20, 0.25, "0" * 64)

    def cancel_save(self, state_path: str) -> None:
        if self.saving_to == state_path:
            self.saving_to = None

    def commit_online(self, disk: str, top: str, base: str, progress: Fraction) -> None:
        if self.images.backing_file(top) == base:
            self.images.commit(top, progress)
        if self.disks[disk] == top:
            self.disks[disk] = base  # an active commit: the disk writes into the base now

    def stream_online(self, disk: str, into: str, base: str, progress: Fraction) -> None:
        if self.images.backing_file(into) != base:
            self.images.rebase_safe(into, base, progress)

    def run_state(self) -> str:
        return "paused" if self.paused else "running"

    def agent_state(self, timeout: float = 1.0) -> str:
        return self.agent

    def freeze(self, timeout: float) -> int:
        if self.agent != "connected":
            raise LiveError("no guest agent")
        self.freezes += 1
        self.frozen = True  # a stuck freeze may still complete later
        if self.hang_freeze:
            raise LiveError(f"guest-fsfreeze-freeze: no answer in {timeout} s")
        return 2

    def thaw(self, timeout: float = 10.0) -> int:
        self.frozen = False
        return 2

    def thaw_if_frozen(self) -> bool:
        was, self.frozen = self.frozen, False
        return was

    def set_time(self) -> None:
        self.time_set += 1

    def freeze_status(self) -> str | None:
        if self.agent != "connected":
            return None
        return "frozen" if self.frozen else "thawed"

    def resume(self) -> None:
        self.paused = False

    def stop(self) -> None:
        self.closed = True

    def close(self) -> None:
        pass


@dataclass
class FakeMachines:
    images: FakeImages
    running: dict[str, FakeLive] = field(default_factory=dict)
    attaches: int = 0  # QMP connections a real adapter would open
    probes: int = 0  # /proc checks a real adapter would make
    next_pid: int = 1000
    restores: list[str] = field(default_factory=list)
    restore_agent: str = "absent"  # the guest agent of a restored VM
    restore_frozen: bool = False  # restored from memory saved while its filesystems were frozen

    def pid(self, vm_name: str) -> int | None:
        self.probes += 1
        live = self._alive(vm_name)
        return live.pid if live is not None else None

    def probe(self, vm: VirtualMachine) -> tuple[str, int | None]:
        self.probes += 1
        live = self._alive(vm.name)
        if live is None:
            return "stopped", None
        return live.run_state(), live.pid

    def attach(self, vm: VirtualMachine) -> FakeLive | None:
        self.probes += 1
        live = self._alive(vm.name)
        if live is not None:
            self.attaches += 1
        return live

    def start(self, vm: VirtualMachine, *, paused: bool) -> FakeLive:
        layers = vm.nodes[vm.current].layers
        return self._run(vm.name, FakeLive(self.images, dict(layers), self._pid(), paused))

    def restore(self, vm: VirtualMachine, layers: dict[str, str], config: dict[str, object],
                state_path: str, *, paused: bool) -> FakeLive:
        if state_path not in self.images.files:
            raise LiveError(f"no memory state file {state_path}")
        self.restores.append(state_path)
        live = FakeLive(self.images, dict(layers), self._pid(), paused, agent=self.restore_agent,
                        frozen=self.restore_frozen)
        return self._run(vm.name, live)

    def _run(self, name: str, live: FakeLive) -> FakeLive:
        self.attaches += 1
        self.running[name] = live
        return live

    def _alive(self, name: str) -> FakeLive | None:
        live = self.running.get(name)
        if live is not None and live.closed:
            del self.running[name]
            return None
        return live

    def _pid(self) -> int:
        self.next_pid += 1
        return self.next_pid
