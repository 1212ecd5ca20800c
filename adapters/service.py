"""The service layer every entry point shares: checks what needs the disk, then calls the domain.

The domain cannot look at files; here a disk handed to `vm create` is checked (exists, is a
qcow2 image) before any event is recorded, and in the embedded mode a command waits for its
side effects by draining the VM's work right away.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from adapters.config import open_app, this_host
from adapters.qemu import qemu_img
from adapters.runtime import Runtime
from adapters.storage import DataDir
from domain.application import Snaptree
from domain.errors import Conflict, InvalidDisk, Refused, VMExists
from domain.names import validate_name
from domain.vm import VirtualMachine
from workers.disk_effects import Progress, _quiet
from workers.runner import Worker


class MergeFailedError(RuntimeError):
    code = "merge_failed"


def parse_disks(specs: list[str]) -> dict[str, str]:
    """`PATH` or `NAME=PATH` per disk; unnamed disks are disk0, disk1, ... in order."""
    disks: dict[str, str] = {}
    for i, spec in enumerate(specs):
        name, sep, path = spec.partition("=")
        if not sep or "/" in name:
            name, path = f"disk{i}", spec
        validate_name(name, "disk name")
        if name in disks:
            raise Refused(f"disk name {name!r} given twice")
        # The real path: a symlink or a second spelling must not make one file two disks.
        disks[name] = os.path.realpath(path)
    return disks


@dataclass
class Service:
    data: DataDir
    app: Snaptree
    host: str

    @classmethod
    def open(cls, home: str | None = None, host: str | None = None) -> Service:
        data = DataDir.open(home)
        return cls(data, open_app(data), host or this_host())

    @property
    def runtime(self) -> Runtime:
        return Runtime(self.data)

    def take(self, vm: str, name: str, *, memory: bool = True) -> UUID:
        """A snapshot; of a running VM with its memory unless `memory` is False."""
        return self.app.take(vm, name, with_memory=memory and self.runtime.is_running(vm))

    def apply(self, vm: str, snapshot: str, *, paused: bool = False, wait: bool = True) -> UUID:
        """Apply; when waiting, a take still in progress on this VM finishes first."""
        if wait:
            self.wait(vm)
        return self.app.apply(vm, snapshot, paused=paused, wait_for_memory=wait)

    def start_vm(self, vm: str, *, paused: bool = False) -> dict[str, Any]:
        self.wait(vm)  # overlays the current state needs must exist first
        agg = self.app.get_vm(vm)
        if self.runtime.is_running(vm):
            raise Conflict(f"VM {vm!r} is already running (pid {self.runtime.pid(vm)})")
        if agg.host != self.host:
            raise Refused(f"VM {vm!r} belongs to host {agg.host!r}, not {self.host!r}")
        self.runtime.start(agg, paused=paused)
        return self.runtime.status(agg)

    def stop_vm(self, vm: str) -> dict[str, Any]:
        self.wait(vm)  # a memory save in flight ends first
        agg = self.app.get_vm(vm)
        self.runtime.stop(agg)
        return self.runtime.status(agg)

    def status(self, vm: str) -> dict[str, Any]:
        return self.runtime.status(self.app.get_vm(vm))

    def worker(self, progress: Progress = _quiet) -> Worker:
        return Worker(self.app, self.data, self.host, progress)

    def wait(self, vm: str, progress: Progress = _quiet) -> int:
        """Perform the VM's outstanding side effects now (the embedded default).

        A merge that fails leaves its node hidden and marked failed; the caller hears of it.
        """
        worker = self.worker(progress)
        done = worker.drain(vm)
        if worker.effects.failures:
            raise MergeFailedError(
                "; ".join(worker.effects.failures)
                + f" (the node stays hidden; retry with `snaptree merge {vm} NODE`)"
            )
        return done

    def create_vm(
        self,
        name: str,
        disk_specs: list[str],
        *,
        copy: bool = False,
        host: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> VirtualMachine:
        validate_name(name, "VM name")
        if not disk_specs:
            raise Refused("give at least one --disk PATH")
        disks = parse_disks(disk_specs)
        for disk, path in disks.items():
            if not os.path.isfile(path):
                raise InvalidDisk(f"disk {disk}: {path} does not exist or is not a file")
            if not qemu_img.is_qcow2(path):
                raise InvalidDisk(f"disk {disk}: {path} is not a qcow2 image")
            if self.data.owns(path) and not copy:
                raise InvalidDisk(f"disk {disk}: {path} lies inside the data directory; pass --copy")
            owner = self._disk_owner(path)
            if owner is not None and not copy:
                raise InvalidDisk(f"disk {disk}: {path} already is a layer of VM {owner!r}")
        if name in self._existing_names():
            raise VMExists(f"a VM named {name!r} already exists")
        copies: list[Path] = []
        if copy:
            disks, copies = self._copy_disks(name, disks)
        try:
            self.app.create_vm(name, disks, host=host or self.host, config=config)
        except BaseException:
            for c in copies:
                c.unlink(missing_ok=True)
            raise
        return self.app.get_vm(name)

    def _disk_owner(self, path: str) -> str | None:
        """The VM whose tree already uses this file (two VMs writing one file would corrupt it)."""
        real = os.path.realpath(path)
        for other in self.app.vm_names():
            for node in self.app.get_vm(other).nodes.values():
                if any(os.path.realpath(p) == real for p in node.layers.values()):
                    return other
        return None

    def _existing_names(self) -> set[str]:
        return set(self.app.vm_names())

    def _copy_disks(self, vm: str, disks: dict[str, str]) -> tuple[dict[str, str], list[Path]]:
        folder = self.data.vm_dir(vm) / "disks"
        folder.mkdir(parents=True, exist_ok=True)
        copied: dict[str, str] = {}
        made: list[Path] = []
        for disk, path in disks.items():
            if qemu_img.backing_file(path):
                raise InvalidDisk(f"disk {disk}: {path} has a backing file; --copy takes standalone images")
            target = folder / f"{disk}.qcow2"
            tmp = target.with_suffix(".tmp")
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
            made.append(target)
            copied[disk] = str(target)
        return copied, made
