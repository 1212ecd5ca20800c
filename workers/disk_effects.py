"""Performs one work item of a stopped VM on real qcow2 files and reports the result back.

Every step looks at the disk before it acts, so an item run twice, or run again after a crash
half way, ends in the same files:
- overlay creation is atomic (temp file + rename) and a no-op when the right overlay exists;
- a merge first records its plan (direction, bytes) as an event; re-running it repeats only
  idempotent steps (a commit writes the same data again, a rebase that is done is skipped);
- a file is deleted only after the event that stops every node using it has been recorded.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Callable
from uuid import UUID

from adapters.config import durable
from adapters.qemu import live, qemu_img
from adapters.runtime import Runtime
from adapters.storage import DataDir
from domain.application import Snaptree
from domain.tree import MergeDirection, MergeState, Node, children
from domain.vm import VirtualMachine
from domain.work import WorkItem, WorkKind
from workers import live_effects

log = logging.getLogger(__name__)

# (VM name, what is happening, fraction done) — for progress bars and logs.
Progress = Callable[[str, str, float], None]


def _quiet(vm: str, what: str, fraction: float) -> None:
    pass


class DiskEffects:
    """The side effects of the tree rules for VMs whose QEMU is not running."""

    def __init__(self, app: Snaptree, data: DataDir, progress: Progress = _quiet) -> None:
        self.app = app
        self.data = data
        self.progress = progress
        self.runtime = Runtime(data)
        self.failures: list[str] = []  # merges that failed during this object's life
        self.resuming = False  # the merge being performed was started by a worker that died

    def durable(self) -> None:
        """Before a destructive step: the events that justify it must survive a power cut."""
        durable(self.app)

    def perform(self, vm: VirtualMachine, item: WorkItem) -> None:
        if item.kind is WorkKind.CREATE_LAYERS:
            assert item.node_id is not None
            self.create_layers(vm, vm.nodes[item.node_id])
        elif item.kind is WorkKind.REMOVE_FILES:
            self.remove_files(vm, list(item.paths))
        elif item.kind is WorkKind.MERGE:
            assert item.node_id is not None
            self.merge(vm, vm.nodes[item.node_id])
        elif item.kind is WorkKind.SAVE_MEMORY:
            assert item.node_id is not None
            self.save_memory(vm, vm.nodes[item.node_id])

    # --- overlays ---

    def create_layers(self, vm: VirtualMachine, node: Node) -> None:
        """Create the node's overlays; on a running VM also switch its writes to them (a live
        take), or, for an applied snapshot, restart QEMU on them (from saved memory if any)."""
        assert node.parent is not None, "the root's layers are the VM's own disks"
        parent = vm.nodes[node.parent]
        for disk, path in node.layers.items():
            self.data.check_owned(path)
            qemu_img.create_overlay(path, parent.layers[disk])
        live_info: dict[str, Any] | None = None
        running = self.runtime.is_running(vm.name)
        mem = node.memory or {}
        if mem.get("state") == "restore":
            if running:  # QEMU still runs on the discarded current state
                asyncio.run(live_effects.stop(self.runtime, vm))
            snap_mem = parent.memory or {}
            if snap_mem.get("state") == "saved":
                live_info = asyncio.run(
                    live_effects.restore_into(self.runtime, vm, node, mem.get("resume"))
                )
        elif running:
            live_info = asyncio.run(live_effects.switch_to_overlays(self.runtime, vm, node))
            if live_info is None:  # an apply without saved memory: the VM ends stopped
                asyncio.run(live_effects.stop(self.runtime, vm))
        self.app.layers_created(vm.name, node.id, live_info)

    # --- memory ---

    def save_memory(self, vm: VirtualMachine, node: Node) -> None:
        """Wait for a live snapshot's memory save to end, and record how it ended."""
        mem = node.memory or {}
        try:
            if not mem.get("started"):
                raise live.LiveError("the save never started (the VM was not running on this snapshot)")
            if not self.runtime.is_running(vm.name):
                raise live.LiveError("the VM stopped before its memory was saved")

            def step(fraction: float) -> None:
                self.progress(vm.name, f"save memory of {node.name}", fraction)

            size, seconds = asyncio.run(live_effects.wait_memory_saved(self.runtime, vm, node, step))
            digest = live_effects.sha256_file(str(mem["path"]))
        except live.LiveError as exc:
            self.app.memory_save_failed(vm.name, node.id, str(exc))
            self.failures.append(f"memory save of snapshot {node.name} failed: {exc}")
            return
        self.app.memory_saved(vm.name, node.id, size, seconds, digest)

    # --- file removal ---

    def remove_files(self, vm: VirtualMachine, paths: list[str]) -> None:
        in_use = {p for n in vm.nodes.values() for p in n.layers.values()}
        self.durable()
        for path in paths:
            if path in in_use or vm.is_own_disk(path):
                # Never happens by the rules; refusing keeps a bug from destroying data.
                raise RuntimeError(f"refusing to delete {path}: a node of VM {vm.name} still uses it")
            self.data.check_owned(path)
            if path.endswith(".state") and self.runtime.is_running(vm.name):
                # A snapshot deleted while its memory is being saved: stop QEMU writing first.
                asyncio.run(live_effects.cancel_memory_save_of(self.runtime, vm, path))
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.app.files_removed(vm.name, paths)

    # --- merges ---

    def merge(self, vm: VirtualMachine, node: Node) -> None:
        try:
            self._check_merge_files(vm, node)
            # A RUNNING merge was started by a worker that died: no file state can be trusted.
            self.resuming = node.merge_state is MergeState.RUNNING
            if node.merge_state is MergeState.SCHEDULED:
                self._record_plan(vm, node)
                vm = self.app.get_vm(vm.name)
                node = vm.nodes[node.id]
            self.durable()
            self._execute_plan(vm, node)
        except (qemu_img.QemuImgError, PermissionError) as exc:
            log.error("merge of node %s of VM %s failed: %s", node.id, vm.name, exc)
            self.app.merge_failed(vm.name, node.id, str(exc))
            self.failures.append(f"merge of node {node.name or node.id} failed: {exc}")
            return
        self.app.merge_completed(vm.name, node.id)

    def _check_merge_files(self, vm: VirtualMachine, node: Node) -> None:
        """Every file a merge writes or frees lies in the data directory (or is an own disk)."""
        touched = [node, *children(vm.nodes, node.id)]
        touched += [c for dep in touched[1:] for c in children(vm.nodes, dep.id)]
        for n in touched:
            for path in n.layers.values():
                if not vm.is_own_disk(path):
                    self.data.check_owned(path)

    def plan(self, vm: VirtualMachine, node: Node) -> tuple[list[UUID], MergeDirection, int]:
        """Which way moves fewer bytes; the VM's own disk always takes the data (DESIGN §1)."""
        deps = children(vm.nodes, node.id)
        held = sum(qemu_img.allocated_bytes(p) for p in node.layers.values())
        if node.merge_forced and len(deps) > 1:
            return [d.id for d in deps], MergeDirection.PULL_UP, held * len(deps)
        (dep,) = deps
        dep_bytes = sum(qemu_img.allocated_bytes(p) for p in dep.layers.values())
        if node.parent is None or dep_bytes <= held:
            return [dep.id], MergeDirection.COMMIT_DOWN, dep_bytes
        return [dep.id], MergeDirection.PULL_UP, held

    def _record_plan(self, vm: VirtualMachine, node: Node) -> None:
        into, direction, nbytes = self.plan(vm, node)
        self.app.merge_started(vm.name, node.id, into, direction, nbytes)

    def _execute_plan(self, vm: VirtualMachine, node: Node) -> None:
        plan = node.merge_plan
        assert plan is not None
        what = f"merge {node.name or node.id} ({plan.direction.value})"
        disks = list(node.layers)
        for i, disk in enumerate(disks):

            def step(fraction: float, i: int = i) -> None:
                self.progress(vm.name, what, (i + fraction) / len(disks))

            running = self.runtime.is_running(vm.name)
            for dep_id in plan.into:
                dep = vm.nodes[dep_id]
                if running and live_effects.in_running_chain(vm, dep):
                    asyncio.run(live_effects.merge_online(
                        self.runtime, vm, node, dep, plan.direction, disk, step))
                    if plan.direction is MergeDirection.COMMIT_DOWN:
                        self._repoint_children(vm, dep, node.layers[disk], disk)
                elif plan.direction is MergeDirection.COMMIT_DOWN:
                    self._commit_down(vm, node, dep, disk, step)
                else:
                    self._pull_up(vm, node, dep, disk, step)
        self.progress(vm.name, what, 1.0)

    def _commit_down(
        self, vm: VirtualMachine, node: Node, dep: Node, disk: str, step: Callable[[float], None]
    ) -> None:
        target, top = node.layers[disk], dep.layers[disk]
        if qemu_img.backing_file(top) != target:
            raise qemu_img.QemuImgError(["check"], 1, f"{top} is not backed by {target}", what="merge check")
        if self.resuming:
            qemu_img.repair_leaks(target)  # a killed commit may have left unused clusters
        # Writing the same data again is harmless, so a crash anywhere here just re-runs it.
        qemu_img.commit(top, progress=step)
        self._repoint_children(vm, dep, target, disk)

    def _repoint_children(self, vm: VirtualMachine, dep: Node, target: str, disk: str) -> None:
        for child in children(vm.nodes, dep.id):
            path = child.layers[disk]
            if child.ready and qemu_img.backing_file(path) != target:
                qemu_img.rebase_unsafe(path, target)  # same data below: metadata only

    def _pull_up(
        self, vm: VirtualMachine, node: Node, dep: Node, disk: str, step: Callable[[float], None]
    ) -> None:
        assert node.parent is not None, "the VM's own disk is never pulled up"
        grandparent = vm.nodes[node.parent].layers[disk]
        path = dep.layers[disk]
        if qemu_img.backing_file(path) == grandparent:
            # qemu-img rewrites the header before it has flushed the copied data, so a header that
            # already names the grandparent proves nothing: put the hidden layer back under it
            # (its file still exists until the merge is recorded) and copy again.
            qemu_img.rebase_unsafe(path, node.layers[disk])
        if self.resuming:
            qemu_img.repair_leaks(path)
        qemu_img.rebase_safe(path, grandparent, progress=step)
