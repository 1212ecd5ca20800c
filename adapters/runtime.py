"""Where each VM's QEMU runs: start, stop, status and re-attach, by VM name.

A VM's QEMU lives in `<data>/vms/<vm>/run/` (QMP socket 0600, pidfile, log) and outlives snaptree,
so every operation first looks for a running process there; nothing is kept in memory between
commands.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from adapters.qemu.machine import MachineConfig, QemuMachine, running_pid
from adapters.storage import DataDir
from domain.vm import VirtualMachine

# VM settings snaptree keeps in a node's configuration and hands to QEMU.
CONFIG_KEYS = ("memory_mib", "cpus", "kernel", "machine", "accel", "disk_bus")


def machine_config(config: dict[str, Any]) -> MachineConfig:
    return MachineConfig.from_dict({k: v for k, v in config.items() if k in CONFIG_KEYS and v is not None})


class Runtime:
    def __init__(self, data: DataDir) -> None:
        self.data = data

    def run_dir(self, vm_name: str) -> Path:
        return self.data.vm_dir(vm_name) / "run"

    def pid(self, vm_name: str) -> int | None:
        return running_pid(self.run_dir(vm_name))

    def is_running(self, vm_name: str) -> bool:
        return self.pid(vm_name) is not None

    def machine(self, vm: VirtualMachine, disks: dict[str, str] | None = None,
                config: dict[str, Any] | None = None) -> QemuMachine:
        node = vm.nodes[vm.current]
        return QemuMachine(
            self.run_dir(vm.name),
            machine_config(config if config is not None else node.config),
            disks if disks is not None else node.layers,
        )

    @asynccontextmanager
    async def attached(self, vm: VirtualMachine) -> AsyncIterator[QemuMachine]:
        m = self.machine(vm)
        await m.attach()
        try:
            await m.query_status()
            yield m
        finally:
            await m.detach()

    # --- commands (synchronous faces for the CLI and the worker) ---

    def start(self, vm: VirtualMachine, *, paused: bool = False) -> int:
        async def go() -> int:
            m = self.machine(vm)
            await m.start(paused=paused)
            pid = m.pid
            await m.detach()
            assert pid is not None
            return pid

        return asyncio.run(go())

    def stop(self, vm: VirtualMachine) -> None:
        asyncio.run(self.stop_async(vm))

    async def stop_async(self, vm: VirtualMachine) -> None:
        """Quit QEMU over QMP (connected first: an unconnected stop would wait for SIGTERM)."""
        m = self.machine(vm)
        if self.is_running(vm.name):
            try:
                await m.attach()
            except Exception:  # noqa: BLE001 - stop() falls back to signals
                pass
        await m.stop()

    def status(self, vm: VirtualMachine) -> dict[str, Any]:
        pid = self.pid(vm.name)
        state = "stopped"
        if pid is not None:

            async def query() -> str:
                async with self.attached(vm) as m:
                    return "running" if await m.query_status() == "running" else "paused"

            state = asyncio.run(query())
        return {"vm": vm.name, "state": state, "pid": pid, "host": vm.host}
