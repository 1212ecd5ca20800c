"""The VirtualMachine aggregate: the snapshot tree of one VM and the events that change it.

The aggregate decides, events record, workers do (docs/architecture.md). Each command checks
everything first and then triggers events; an event's `apply` only moves state. The commands
live in two mixins by who sends them: users (domain/vm_commands.py) and workers reporting the
results of side effects (domain/vm_reports.py); the read-only questions in domain/vm_queries.py.
Side effects are read off the state itself (domain/work.py).
"""

from __future__ import annotations

import copy
import uuid
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from domain import names, recovery
from domain.names import vm_id
from domain.commands import Quiesce
from domain.errors import Refused
from domain.lifecycle import RunAction, RunRecord, RunRequest, RunState
from domain.memory import LiveSwitch, Memory, MemoryState, Resume
from domain.tree import MergeDirection, MergePlan, MergeState, Node, NodeKind, forget_origin
from domain.vm_commands import SnapshotCommands
from domain.vm_queries import TreeQueries
from domain.vm_reports import WorkerReports

NOT_RUNNING = "the VM was not running: no memory to save"


class VirtualMachine(SnapshotCommands, WorkerReports, TreeQueries, Aggregate):
    # --- events: the public record audit tools read for years; never change a field's meaning ---

    # Declared on this class, so that the library's metaclass does not define a second class
    # for each event (topics and fields are the same either way; it halves the import time).
    class Event(Aggregate.Event):
        pass

    class Registered(Aggregate.Created, Event):
        class_version = 1
        name: str
        host: str
        disks: dict[str, str]  # disk name -> the VM's own disk file (absolute)
        root_id: UUID
        config: dict[str, Any]

    class SnapshotTaken(Event):
        class_version = 1
        snapshot_id: UUID  # the node that was the current state, now frozen
        name: str
        new_current_id: UUID
        layers: dict[str, str]  # the new current state's overlays
        # Where the memory goes if the VM runs when the worker switches it (the take's intent);
        # None: disks only. Whether it ran is in the LayersCreated that follows.
        memory_path: str | None = None
        quiesce: Quiesce | None = None
        nvram_path: str | None = None  # a UEFI VM: where the worker copies the variable store

        def apply(self, vm: VirtualMachine) -> None:
            frozen = vm.nodes[self.snapshot_id]
            frozen.nvram = self.nvram_path
            frozen.quiesce_mode = self.quiesce.value if self.quiesce is not None else None
            if self.memory_path is not None:
                frozen.memory = Memory(MemoryState.REQUESTED, path=self.memory_path)
                frozen.memory_seq = self.originator_version
            frozen.kind = NodeKind.SNAPSHOT
            frozen.name = self.name
            frozen.created_at = self.timestamp  # a snapshot is born when it is taken
            vm.names[self.name] = self.snapshot_id
            frozen.config = dict(frozen.config)
            vm.nodes[self.new_current_id] = vm._new_current(self, self.snapshot_id, frozen.config)

    class SnapshotApplied(Event):
        class_version = 1
        snapshot_id: UUID
        discarded_id: UUID  # the previous current state; never part of any snapshot
        new_current_id: UUID
        layers: dict[str, str]
        revert: bool
        resume: str | None = None  # "running" | "paused": how saved memory comes back

        def apply(self, vm: VirtualMachine) -> None:
            discarded = vm.nodes[self.discarded_id]
            if not discarded.ready and discarded.parent is not None:
                # A take whose switch never came: the VM was stopped (the apply checked).
                taken = vm.nodes[discarded.parent]
                if taken.memory is not None and taken.memory.state is MemoryState.REQUESTED:
                    taken.memory = Memory(MemoryState.NONE, note=NOT_RUNNING)
            vm._remove_node(self.discarded_id, self.originator_version)
            snap = vm.nodes[self.snapshot_id]
            node = vm._new_current(self, self.snapshot_id, snap.config)
            # Restored from the snapshot's memory once it is saved (the save may still run).
            node.restore = Resume(self.resume) if self.resume else None
            node.nvram_from = snap.nvram  # its variable store comes back with it
            vm.nodes[self.new_current_id] = node

    class LayersCreated(Event):
        """The node's overlays exist; on a running VM its writes switched to them, or QEMU
        restarted on them. `live` says which (None: the VM did not run)."""

        class_version = 1
        node_id: UUID
        live: LiveSwitch | dict[str, Any] | None = None  # a dict in the first releases

        def apply(self, vm: VirtualMachine) -> None:
            live = LiveSwitch.from_legacy(self.live) if isinstance(self.live, dict) else self.live
            node = vm.nodes[self.node_id]
            node.ready = True
            node.restore = None
            if node.parent is not None and vm.nodes[node.parent].kind is NodeKind.SNAPSHOT:
                frozen = vm.nodes[node.parent]
                frozen.memory = _memory_after_switch(frozen.memory, live)
                if live is not None and live.quiesce is not None:
                    frozen.quiesce = live.quiesce
                if frozen.memory is not None and frozen.memory.state is MemoryState.FAILED and frozen.memory.path:
                    vm.garbage[frozen.memory.path] = self.originator_version
            if live is not None and live.run_after is not None:
                vm.run = RunRecord(live.run_after, live.pid)
            if live is not None and live.clock is not None:
                node.clock = live.clock

    class MemorySaved(Event):
        class_version = 1
        node_id: UUID
        bytes: int
        seconds: float
        sha256: str

        def apply(self, vm: VirtualMachine) -> None:
            node = vm.nodes[self.node_id]
            mem = node.memory or Memory(MemoryState.SAVING)
            node.memory = mem.but(state=MemoryState.SAVED, bytes=self.bytes, seconds=self.seconds,
                                  sha256=self.sha256)

    class MemorySaveFailed(Event):
        class_version = 1
        node_id: UUID
        error: str

        def apply(self, vm: VirtualMachine) -> None:
            node = vm.nodes[self.node_id]
            mem = node.memory or Memory(MemoryState.SAVING)
            node.memory = mem.but(state=MemoryState.FAILED, error=self.error)
            if mem.path:
                vm.garbage[mem.path] = self.originator_version

    class ConfigChanged(Event):
        """The current state's settings (a snapshot's configuration copy never changes)."""

        class_version = 1
        config: dict[str, Any]

        def apply(self, vm: VirtualMachine) -> None:
            vm.nodes[vm.current].config = dict(self.config)

    class SnapshotDeleted(Event):
        """The snapshot left the visible tree; its layers stay as a hidden node for the rules."""

        class_version = 1
        node_id: UUID
        name: str
        dependents: int
        files: list[str]  # its memory state, removed at once

        def apply(self, vm: VirtualMachine) -> None:
            node = vm.nodes[self.node_id]
            vm.names.pop(self.name, None)
            node.kind = NodeKind.HIDDEN
            node.config = {}
            node.memory = None
            node.merge_state = MergeState.PENDING
            for path in self.files:
                vm.garbage[path] = self.originator_version

    class SnapshotRenamed(Event):
        class_version = 1
        node_id: UUID
        old_name: str
        new_name: str

        def apply(self, vm: VirtualMachine) -> None:
            vm.nodes[self.node_id].name = self.new_name
            vm.names.pop(self.old_name, None)
            vm.names[self.new_name] = self.node_id

    class NodeRemoved(Event):
        """A node with no dependents is gone; its files are to be deleted by the worker."""

        class_version = 1
        node_id: UUID
        reason: str

        def apply(self, vm: VirtualMachine) -> None:
            vm._remove_node(self.node_id, self.originator_version)

    class MergeScheduled(Event):
        class_version = 1
        node_id: UUID
        forced: bool

        def apply(self, vm: VirtualMachine) -> None:
            node = vm.nodes[self.node_id]
            node.merge_state = MergeState.SCHEDULED
            node.merge_forced = self.forced
            node.merge_error = None
            node.merge_plan = None
            node.merge_seq = self.originator_version

    class MergeDeferred(Event):
        """A scheduled (unforced) merge whose node has 2+ dependents again waits."""

        class_version = 1
        node_id: UUID
        dependents: int

        def apply(self, vm: VirtualMachine) -> None:
            node = vm.nodes[self.node_id]
            node.merge_state = MergeState.PENDING
            node.merge_seq = 0

    class MergeStarted(Event):
        """The worker's plan, recorded before it touches a file."""

        class_version = 1
        node_id: UUID
        into: list[UUID]
        direction: str
        bytes: int

        def apply(self, vm: VirtualMachine) -> None:
            node = vm.nodes[self.node_id]
            node.merge_state = MergeState.RUNNING
            node.merge_plan = MergePlan(
                into=tuple(self.into), direction=MergeDirection(self.direction), bytes=self.bytes
            )

    class MergeCompleted(Event):
        class_version = 1
        node_id: UUID
        into: list[UUID]
        direction: str
        layers: dict[UUID, dict[str, str]]  # each receiving node's layers after the merge
        files: list[str]  # layer files no node uses any more

        def apply(self, vm: VirtualMachine) -> None:
            merged = vm.nodes.pop(self.node_id)
            for dep_id in self.into:
                dep = vm.nodes[dep_id]
                dep.parent = merged.parent
                dep.layers = dict(self.layers[dep_id])
                dep.level = max(dep.level, merged.level)  # it holds the merged node's data now
            forget_origin(vm.nodes, merged)
            for path in self.files:
                vm.garbage[path] = self.originator_version

    class MergeFailed(Event):
        class_version = 1
        node_id: UUID
        error: str

        def apply(self, vm: VirtualMachine) -> None:
            node = vm.nodes[self.node_id]
            node.merge_state = MergeState.FAILED
            node.merge_error = self.error

    class FlattenScheduled(Event):
        """The current state's chain grew past the VM's `max_chain_depth`: the snapshot under it
        is to be rebased onto an older ancestor (docs/semantics.md, "Chain depth")."""

        class_version = 1
        node_id: UUID
        depth: int  # the current state's depth when it was asked for

        def apply(self, vm: VirtualMachine) -> None:
            node = vm.nodes[self.node_id]
            node.flatten = MergeState.SCHEDULED
            node.flatten_seq = self.originator_version

    class FlattenStarted(Event):
        """The worker's plan, recorded before it touches a file."""

        class_version = 1
        node_id: UUID
        base_id: UUID
        bytes: int

        def apply(self, vm: VirtualMachine) -> None:
            node = vm.nodes[self.node_id]
            node.flatten = MergeState.RUNNING
            node.flatten_base = self.base_id
            node.flatten_bytes = self.bytes

    class FlattenCompleted(Event):
        """Its layers are backed by the base's now and read exactly what they read before."""

        class_version = 1
        node_id: UUID
        base_id: UUID
        level: int = 1  # one above the highest layer it skipped (domain.rules.flatten_base)

        def apply(self, vm: VirtualMachine) -> None:
            node = vm.nodes[self.node_id]
            if node.origin is None:
                node.origin = node.parent
            node.parent = self.base_id
            node.level = self.level
            node.flatten = None
            node.flatten_base = None

    class FlattenCancelled(Event):
        class_version = 1
        node_id: UUID
        reason: str

        def apply(self, vm: VirtualMachine) -> None:
            node = vm.nodes[self.node_id]
            node.flatten = None
            node.flatten_base = None

    class Imported(Event):
        """The whole tree of a VM exported elsewhere, with paths relocated to this data directory.

        Follows `Registered` in the same save; `source` references the original history (its VM id,
        name, version and the digest of its exported events) so audits can follow the VM across hosts.
        """

        class_version = 1
        nodes: list[Node]
        current: UUID
        source: dict[str, Any]

        def apply(self, vm: VirtualMachine) -> None:
            vm.nodes = {n.id: copy.deepcopy(n) for n in self.nodes}  # the event stays as recorded
            vm.current = self.current
            vm.names = {n.name: n.id for n in self.nodes if n.kind is NodeKind.SNAPSHOT and n.name}
            vm.garbage = {}
            vm.failed = {}
            vm.removed = {}
            vm.imported_from = dict(self.source)

    class FilesRemoved(Event):
        class_version = 1
        paths: list[str]

        def apply(self, vm: VirtualMachine) -> None:
            for path in self.paths:
                vm.garbage.pop(path, None)
            vm.failed = {k: f for k, f in vm.failed.items() if not set(f.paths) & set(self.paths)}
            recovery.forget_removed(vm)

    class RunRequested(Event):
        """`vm start` / `vm stop`: work for the VM's host."""

        class_version = 1
        action: RunAction
        paused: bool = False

        def apply(self, vm: VirtualMachine) -> None:
            vm.run_request = RunRequest(self.action, self.paused, self.originator_version)

    class RunRecorded(Event):
        """What the host's worker found or did: QEMU runs (pid) or not."""

        class_version = 1
        state: RunState
        pid: int | None = None

        def apply(self, vm: VirtualMachine) -> None:
            vm.run_request = None
            vm.run = RunRecord(self.state, self.pid)

    class StepFailed(Event):
        """Host work that could not be done (docs/semantics.md, "Refusals and failures")."""

        class_version = 1
        kind: str  # recovery.CREATE_LAYERS | recovery.REMOVE_FILES
        seq: int
        error: str
        node_id: UUID | None = None
        paths: list[str] | None = None

        def apply(self, vm: VirtualMachine) -> None:
            failure = recovery.Failure(self.kind, self.seq, self.error, self.node_id, tuple(self.paths or ()))
            vm.failed = {**vm.failed, failure.key: failure}

    class WorkRetried(Event):
        class_version = 1

        def apply(self, vm: VirtualMachine) -> None:
            vm.failed = {}

    class TakeRolledBack(Event):
        """A take whose overlay could not be created, undone: its snapshot is current again."""

        class_version = 1
        node_id: UUID  # the current state the take made
        snapshot_id: UUID

        def apply(self, vm: VirtualMachine) -> None:
            recovery.undo_take(vm, self.node_id, self.snapshot_id, self.originator_version)

    class ApplyRolledBack(Event):
        """An apply whose overlay could not be created, undone: the current state it discarded
        (and what its cascade removed) is back."""

        class_version = 1
        node_id: UUID
        restored: list[UUID]

        def apply(self, vm: VirtualMachine) -> None:
            recovery.undo_apply(vm, self.node_id, list(self.restored), self.originator_version)

    # --- state ---

    # Defaults for aggregate snapshots of the first releases, which lack these attributes; the
    # dicts are only ever replaced, never changed in place.
    run_request = None  # type: RunRequest | None
    run = RunRecord()
    failed = {}  # type: dict[str, recovery.Failure]
    removed = {}  # type: dict[UUID, tuple[int, Node]]

    def __init__(
        self, name: str, host: str, disks: dict[str, str], root_id: UUID, config: dict[str, Any]
    ) -> None:
        self.name = name
        self.host = host
        self.disks = dict(disks)
        self.config = dict(config)
        self.nodes: dict[UUID, Node] = {
            root_id: Node(
                id=root_id,
                kind=NodeKind.CURRENT,
                name=None,
                parent=None,
                created_at=self.created_on,
                layers=dict(disks),
                ready=True,
                config=dict(config),
            )
        }
        self.current: UUID = root_id
        self.garbage: dict[str, int] = {}  # path -> version that made it garbage
        self.names: dict[str, UUID] = {}  # visible snapshot name -> node id
        self.imported_from: dict[str, Any] | None = None
        self.run_request = None
        self.run = RunRecord()
        self.failed = {}
        self.removed = {}

    @staticmethod
    def create_id(name: str, **_: Any) -> UUID:
        return vm_id(name)

    @classmethod
    def register(
        cls, name: str, host: str, disks: dict[str, str], config: dict[str, Any] | None = None
    ) -> VirtualMachine:
        name = names.vm_name(name)
        host = names.host_name(host)
        if not disks:
            raise Refused("a VM needs at least one disk")
        checked: dict[str, str] = {}
        for disk, path in disks.items():
            disk = names.disk_name(disk)
            if not path.startswith("/"):
                raise Refused(f"disk {disk}: path {path!r} must be absolute")
            checked[disk] = path
        if len(set(checked.values())) != len(checked):
            raise Refused("the same file is given as two disks")
        return cls._create(
            cls.Registered, name=name, host=host, disks=checked, root_id=uuid.uuid4(),
            config=dict(config or {}),
        )

    # --- state moves shared by several events ---

    def _new_current(self, event: Any, parent: UUID, config: dict[str, object]) -> Node:
        self.current = event.new_current_id
        return Node(
            id=event.new_current_id,
            kind=NodeKind.CURRENT,
            name=None,
            parent=parent,
            created_at=event.timestamp,
            layers=dict(event.layers),
            ready=False,
            config=dict(config),
            created_seq=event.originator_version,
        )

    def _remove_node(self, node_id: UUID, version: int) -> None:
        node = self.nodes.pop(node_id)
        forget_origin(self.nodes, node)
        recovery.remember_removed(self, node, version)
        for path in node.layers.values():
            if not self.is_own_disk(path):
                self.garbage[path] = version
        if node.memory is not None and node.memory.has_file:
            assert node.memory.path is not None
            self.garbage[node.memory.path] = version
        if node.nvram is not None:
            self.garbage[node.nvram] = version


def _memory_after_switch(memory: Memory | None, live: LiveSwitch | None) -> Memory | None:
    """The frozen snapshot's memory once the worker switched (or found the VM stopped)."""
    switched = live is not None and live.switched
    if memory is None or memory.state is MemoryState.NONE:
        if switched and live is not None and live.pause_ms is not None:
            return Memory(MemoryState.NONE, pause_ms=live.pause_ms)  # a disks-only live take
        return memory
    if memory.state is not MemoryState.REQUESTED:
        return memory  # a re-run, or a restore below an older snapshot
    if not switched or live is None:
        return Memory(MemoryState.NONE, note=NOT_RUNNING)
    if live.method is None:
        return memory.but(state=MemoryState.FAILED, pause_ms=live.pause_ms,
                          error=live.memory_error or "the memory save did not start")
    return memory.but(state=MemoryState.SAVING, method=live.method, pause_ms=live.pause_ms)


__all__ = ["VirtualMachine"]
