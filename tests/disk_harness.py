"""Proves that nothing is lost: byte patterns in every layer, read back through every snapshot.

Before each snapshot a distinct pattern goes into the current layer (qemu-io). The harness keeps,
per node, what each 64 KiB slot must read; after every operation and after the worker drains, every
visible snapshot (through a temporary overlay, so it is never written) and the current state must
read exactly that, each node's backing file must be its parent's layer, and the VM's folder must
hold exactly the files of the tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

from adapters.qemu import qemu_img, qemu_io
from domain import commands as c
from service.api import Service
from domain.tree import NodeKind
from domain.vm import VirtualMachine
from domain.work import pending_work

SLOT = 64 * 1024
DISK_SIZE = 16 * 1024 * 1024


@dataclass
class PatternVM:
    svc: Service
    name: str
    disks: dict[str, str]
    # node id -> disk -> slot -> pattern byte (0 = never written)
    expected: dict[UUID, dict[str, dict[int, int]]] = field(default_factory=dict)
    slots_used: set[int] = field(default_factory=set)
    next_pattern: int = 1

    @classmethod
    def create(cls, svc: Service, tmp: Path, name: str = "vm", ndisks: int = 2) -> PatternVM:
        disks = {}
        for i in range(ndisks):
            path = str(tmp / f"{name}-own-{i}.qcow2")
            qemu_img.create_image(path, DISK_SIZE)
            disks[f"disk{i}"] = path
        agg = svc.handle(c.CreateVM(name, disk=tuple(disks.values()))).vm  # type: ignore[attr-defined]
        pv = cls(svc, name, dict(agg.disks))
        pv.expected[agg.current] = {d: {} for d in agg.disks}
        return pv

    @property
    def vm(self) -> VirtualMachine:
        return self.svc.app.get_vm(self.name)

    def write(self, slot: int | None = None, nbytes: int = SLOT) -> int:
        """Write a new pattern into the current layer of every disk; returns the pattern."""
        vm = self.vm
        assert not pending_work(vm), "write only into a settled VM"
        pattern = self.next_pattern
        self.next_pattern = self.next_pattern % 250 + 1
        slot = slot if slot is not None else (max(self.slots_used) + 1 if self.slots_used else 0)
        covered = range(slot, slot + -(-nbytes // SLOT))  # every slot the write touches
        for disk, path in vm.nodes[vm.current].layers.items():
            qemu_io.write_pattern(path, slot * SLOT, nbytes, pattern)
            for s in covered:
                self.expected[vm.current][disk][s] = pattern
        self.slots_used.update(covered)
        return pattern

    # --- operations that keep the expectations in step ---

    def take(self, name: str, *, write: bool = True) -> UUID:
        if write:
            self.write()
        frozen = self.svc.handle(c.TakeSnapshot(self.name, name), wait=False).snapshot  # type: ignore[attr-defined]
        self.settle()
        vm = self.vm
        self.expected[vm.current] = _copy(self.expected[frozen])
        return frozen

    def apply(self, snap: str) -> None:
        self.svc.handle(c.ApplySnapshot(self.name, snap), wait=False)
        self._after_new_current()

    def revert(self) -> None:
        self.svc.handle(c.RevertSnapshot(self.name), wait=False)
        self._after_new_current()

    def delete(self, snap: str, subtree: bool = False) -> None:
        self.svc.handle(c.DeleteSnapshot(self.name, snap, subtree=subtree), wait=False)
        self.settle()

    def force_merge(self, node: str) -> None:
        self.svc.handle(c.MergeNode(self.name, node, force=True), wait=False)
        self.settle()

    def _after_new_current(self) -> None:
        self.settle()
        vm = self.vm
        parent = vm.nodes[vm.current].parent
        assert parent is not None
        self.expected[vm.current] = _copy(self.expected[parent])

    def settle(self) -> None:
        self.svc.settle(self.name)

    # --- checks ---

    def check(self) -> None:
        vm = self.vm
        assert not pending_work(vm), f"work left: {pending_work(vm)}"
        self.check_backing(vm)
        self.check_files(vm)
        for node in vm.nodes.values():
            if node.kind is NodeKind.HIDDEN:
                continue
            for disk, path in node.layers.items():
                for slot in sorted(self.slots_used):
                    want = self.expected[node.id][disk].get(slot, 0)
                    if node.id == vm.current:
                        ok = qemu_io.read_matches(path, slot * SLOT, SLOT, want)
                    else:
                        ok = qemu_io.read_through(path, slot * SLOT, SLOT, want)
                    assert ok, f"{node.kind.value} {node.name or node.id} {disk} slot {slot}: want {want:#x}"

    def check_backing(self, vm: VirtualMachine) -> None:
        for node in vm.nodes.values():
            for disk, path in node.layers.items():
                want = vm.nodes[node.parent].layers[disk] if node.parent else None
                assert qemu_img.backing_file(path) == want, f"{path}: backing is not {want}"

    def check_files(self, vm: VirtualMachine) -> None:
        layers_dir = self.svc.data.vm_dir(self.name) / "layers"
        on_disk = {str(p) for p in layers_dir.glob("*")} if layers_dir.exists() else set()
        in_tree = {p for n in vm.nodes.values() for p in n.layers.values() if not vm.is_own_disk(p)}
        assert on_disk == in_tree, f"orphans: {on_disk - in_tree}; missing: {in_tree - on_disk}"
        for path in vm.disks.values():
            assert os.path.exists(path), f"own disk {path} is gone"
        assert not vm.garbage

    def visible(self) -> list[str]:
        return sorted(n.name for n in self.vm.nodes.values() if n.kind is NodeKind.SNAPSHOT and n.name)

    def hidden(self) -> list[str]:
        return sorted(n.name or "" for n in self.vm.nodes.values() if n.kind is NodeKind.HIDDEN)


def _copy(exp: dict[str, dict[int, int]]) -> dict[str, dict[int, int]]:
    return {d: dict(slots) for d, slots in exp.items()}
