"""The VirtualMachine aggregate: the snapshot tree of one VM, and every decision about it.

The aggregate decides, events record, workers do. Each command checks everything first and then
triggers events; an event's `apply` only moves state. Side effects are described by the tree itself
(nodes whose layers are not yet created, hidden nodes to merge, files to remove: see
`domain.work`) and their results come back as commands (`layers_created`, `merge_started`,
`merge_completed`, `files_removed`).
"""

from __future__ import annotations

import copy
import uuid
from datetime import datetime
from typing import Any, Callable
from uuid import UUID

from eventsourcing.domain import Aggregate

from domain.errors import Conflict, InvalidName, NameTaken, Refused, UnknownSnapshot
from domain.names import validate_name
from domain.rules import Outcome, next_follow_up
from domain.tree import (
    MergeDirection,
    MergePlan,
    MergeState,
    Node,
    NodeKind,
    ancestors,
    children,
    descendants,
)

# VM ids derive from names, so a name finds its aggregate without an index and a second
# `vm create` of the same name collides on the aggregate's first version.
VM_NAMESPACE = UUID("5d0c6c1e-3b0e-4b8e-9a53-6e1f0f2b7a11")

LayerPaths = Callable[[UUID], dict[str, str]]


def vm_id(name: str) -> UUID:
    return uuid.uuid5(VM_NAMESPACE, name)


class VirtualMachine(Aggregate):
    # --- events: the public record audit tools read for years; never change a field's meaning ---

    class Registered(Aggregate.Created):
        class_version = 1
        name: str
        host: str
        disks: dict[str, str]  # disk name -> the VM's own disk file (absolute)
        root_id: UUID
        config: dict[str, Any]

    class SnapshotTaken(Aggregate.Event):
        class_version = 1
        snapshot_id: UUID  # the node that was the current state, now frozen
        name: str
        new_current_id: UUID
        layers: dict[str, str]  # the new current state's overlays
        memory_path: str | None = None  # where the running VM's memory is saved; None: disks only

        def apply(self, vm: VirtualMachine) -> None:
            frozen = vm.nodes[self.snapshot_id]
            if self.memory_path is not None:
                frozen.memory = {"state": "saving", "path": self.memory_path, "started": False}
                frozen.memory_seq = self.originator_version
            frozen.kind = NodeKind.SNAPSHOT
            frozen.name = self.name
            frozen.created_at = self.timestamp  # a snapshot is born when it is taken
            vm.names[self.name] = self.snapshot_id
            frozen.config = dict(frozen.config)
            vm.nodes[self.new_current_id] = Node(
                id=self.new_current_id,
                kind=NodeKind.CURRENT,
                name=None,
                parent=self.snapshot_id,
                created_at=self.timestamp,
                layers=dict(self.layers),
                ready=False,
                config=dict(frozen.config),
                created_seq=self.originator_version,
            )
            vm.current = self.new_current_id

    class SnapshotApplied(Aggregate.Event):
        class_version = 1
        snapshot_id: UUID
        discarded_id: UUID  # the previous current state; never part of any snapshot
        new_current_id: UUID
        layers: dict[str, str]
        revert: bool
        resume: str | None = None  # "running" | "paused": how saved memory comes back

        def apply(self, vm: VirtualMachine) -> None:
            vm._remove_node(self.discarded_id, self.originator_version)
            snap = vm.nodes[self.snapshot_id]
            vm.nodes[self.new_current_id] = Node(
                id=self.new_current_id,
                kind=NodeKind.CURRENT,
                name=None,
                parent=self.snapshot_id,
                created_at=self.timestamp,
                layers=dict(self.layers),
                ready=False,
                config=dict(snap.config),
                created_seq=self.originator_version,
            )
            # Restored from the snapshot's memory once it is saved (the save may still run).
            vm.nodes[self.new_current_id].memory = (
                {"state": "restore", "resume": self.resume} if self.resume else None
            )
            vm.current = self.new_current_id

    class LayersCreated(Aggregate.Event):
        """The node's overlays exist; for a running VM, its writes switched to them.

        `live` (a running VM only): the guest's pause in ms, measured from QEMU's STOP/RESUME
        events, and the memory save method that started with it (None for disks only).
        """

        class_version = 1
        node_id: UUID
        live: dict[str, Any] | None = None

        def apply(self, vm: VirtualMachine) -> None:
            node = vm.nodes[self.node_id]
            node.ready = True
            if node.memory and node.memory.get("state") == "restore":
                node.memory = None  # the restore happened: the current state owns no memory file
            switched = self.live is not None and "pause_ms" in self.live  # a live take, not a restore
            if switched and node.parent is not None and vm.nodes[node.parent].kind is NodeKind.SNAPSHOT:
                assert self.live is not None
                frozen = vm.nodes[node.parent]
                mem = dict(frozen.memory or {"state": "none"})
                mem["pause_ms"] = self.live.get("pause_ms")
                if mem.get("state") == "saving":
                    mem["method"] = self.live.get("method")
                    mem["started"] = True
                frozen.memory = mem

    class MemorySaved(Aggregate.Event):
        class_version = 1
        node_id: UUID
        bytes: int
        seconds: float
        sha256: str

        def apply(self, vm: VirtualMachine) -> None:
            node = vm.nodes[self.node_id]
            node.memory = dict(node.memory or {}, state="saved", bytes=self.bytes,
                               seconds=self.seconds, sha256=self.sha256)

    class MemorySaveFailed(Aggregate.Event):
        class_version = 1
        node_id: UUID
        error: str

        def apply(self, vm: VirtualMachine) -> None:
            node = vm.nodes[self.node_id]
            path = (node.memory or {}).get("path")
            node.memory = dict(node.memory or {}, state="failed", error=self.error)
            if path:
                vm.garbage[str(path)] = self.originator_version

    class ConfigChanged(Aggregate.Event):
        """The current state's settings (a snapshot's configuration copy never changes)."""

        class_version = 1
        config: dict[str, Any]

        def apply(self, vm: VirtualMachine) -> None:
            vm.nodes[vm.current].config = dict(self.config)

    class SnapshotDeleted(Aggregate.Event):
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

    class SnapshotRenamed(Aggregate.Event):
        class_version = 1
        node_id: UUID
        old_name: str
        new_name: str

        def apply(self, vm: VirtualMachine) -> None:
            vm.nodes[self.node_id].name = self.new_name
            vm.names.pop(self.old_name, None)
            vm.names[self.new_name] = self.node_id

    class NodeRemoved(Aggregate.Event):
        """A node with no dependents is gone; its files are to be deleted by the worker."""

        class_version = 1
        node_id: UUID
        reason: str

        def apply(self, vm: VirtualMachine) -> None:
            vm._remove_node(self.node_id, self.originator_version)

    class MergeScheduled(Aggregate.Event):
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

    class MergeDeferred(Aggregate.Event):
        """A scheduled (unforced) merge whose node has 2+ dependents again waits (DESIGN §1)."""

        class_version = 1
        node_id: UUID
        dependents: int

        def apply(self, vm: VirtualMachine) -> None:
            node = vm.nodes[self.node_id]
            node.merge_state = MergeState.PENDING
            node.merge_seq = 0

    class MergeStarted(Aggregate.Event):
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

    class MergeCompleted(Aggregate.Event):
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
            for path in self.files:
                vm.garbage[path] = self.originator_version

    class MergeFailed(Aggregate.Event):
        class_version = 1
        node_id: UUID
        error: str

        def apply(self, vm: VirtualMachine) -> None:
            node = vm.nodes[self.node_id]
            node.merge_state = MergeState.FAILED
            node.merge_error = self.error

    class Imported(Aggregate.Event):
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
            vm.imported_from = dict(self.source)

    class FilesRemoved(Aggregate.Event):
        class_version = 1
        paths: list[str]

        def apply(self, vm: VirtualMachine) -> None:
            for path in self.paths:
                vm.garbage.pop(path, None)

    # --- state ---

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

    @staticmethod
    def create_id(name: str, **_: Any) -> UUID:
        return vm_id(name)

    @classmethod
    def register(
        cls, name: str, host: str, disks: dict[str, str], config: dict[str, Any] | None = None
    ) -> VirtualMachine:
        validate_name(name, "VM name")
        validate_name(host, "host name")
        if not disks:
            raise Refused("a VM needs at least one disk")
        for disk, path in disks.items():
            validate_name(disk, "disk name")
            if not path.startswith("/"):
                raise Refused(f"disk {disk}: path {path!r} must be absolute")
        if len(set(disks.values())) != len(disks):
            raise Refused("the same file is given as two disks")
        return cls._create(
            cls.Registered,
            name=name,
            host=host,
            disks=dict(disks),
            root_id=uuid.uuid4(),
            config=dict(config or {}),
        )

    # --- queries ---

    def node(self, node_id: UUID) -> Node:
        return self.nodes[node_id]

    def snapshot_named(self, name: str) -> Node | None:
        node_id = self.names.get(name)
        return self.nodes[node_id] if node_id is not None else None

    def resolve_snapshot(self, ref: str) -> Node:
        """A visible snapshot by name, or by id."""
        found = self.snapshot_named(ref)
        if found is None:
            node = self._by_id(ref)
            if node is not None and node.kind is NodeKind.SNAPSHOT:
                found = node
            elif node is not None:
                raise Refused(f"node {ref} is {_kind_phrase(node)}, not a snapshot")
        if found is None:
            raise UnknownSnapshot(f"VM {self.name!r} has no snapshot {ref!r}")
        return found

    def resolve_node(self, ref: str) -> Node:
        """A node id, a visible snapshot's name, or a hidden node's former name when unique."""
        node = self._by_id(ref) or self.snapshot_named(ref)
        if node is None:
            hidden = [n for n in self.nodes.values() if n.kind is NodeKind.HIDDEN and n.name == ref]
            if len(hidden) > 1:
                raise Refused(f"{len(hidden)} hidden nodes were named {ref!r}: give a node id")
            node = hidden[0] if hidden else None
        if node is None:
            raise UnknownSnapshot(f"VM {self.name!r} has no node {ref!r}")
        return node

    def _by_id(self, ref: str) -> Node | None:
        try:
            return self.nodes.get(UUID(ref))
        except ValueError:
            return None

    def is_own_disk(self, path: str) -> bool:
        return path in self.disks.values()

    def running_merge(self) -> Node | None:
        for node in self.nodes.values():
            if node.merge_state is MergeState.RUNNING:
                return node
        return None

    # --- commands ---

    def take_snapshot(
        self, name: str, layer_paths: LayerPaths, memory_path: str | None = None
    ) -> UUID:
        """Freeze the current state as snapshot `name`; a new overlay becomes the current state.

        `memory_path` is given when the VM runs: its memory is saved there while it keeps running.
        """
        validate_name(name, "snapshot name")
        if self.snapshot_named(name) is not None:
            raise NameTaken(f"VM {self.name!r} already has a snapshot named {name!r}")
        current = self.nodes[self.current]
        if current.memory and current.memory.get("state") == "restore":
            raise Conflict(f"VM {self.name!r} is still being restored; wait for the worker")
        frozen = self.current
        new_id = uuid.uuid4()
        self.trigger_event(
            self.SnapshotTaken,
            snapshot_id=frozen,
            name=name,
            new_current_id=new_id,
            layers=layer_paths(new_id),
            memory_path=memory_path,
        )
        return frozen

    def apply_snapshot(
        self,
        ref: str,
        layer_paths: LayerPaths,
        *,
        revert: bool = False,
        paused: bool = False,
        wait_for_memory: bool = True,
    ) -> UUID:
        """Start from a copy of the snapshot: a fresh overlay on it; the old current is discarded.

        A snapshot with saved memory comes back running (or paused) exactly where it was; one whose
        memory is still being saved is applied once the save ends, unless the caller cannot wait.
        """
        snap = self.resolve_snapshot(ref)
        self._refuse_while_merging("apply a snapshot")
        for other in self.nodes.values():
            mem = other.memory or {}
            if mem.get("state") == "saving" and not mem.get("started"):
                # Its live switch has not happened yet; the apply would discard the overlay
                # it switches to, and the snapshot's instant would never be captured.
                raise Conflict(
                    f"snapshot {other.name!r} is still being taken; wait for the worker first"
                )
        saving = bool(snap.memory and snap.memory.get("state") == "saving")
        if saving and not wait_for_memory:
            raise Conflict(f"the memory of snapshot {snap.name!r} is still being saved")
        new_id = uuid.uuid4()
        self.trigger_event(
            self.SnapshotApplied,
            snapshot_id=snap.id,
            discarded_id=self.current,
            new_current_id=new_id,
            layers=layer_paths(new_id),
            revert=revert,
            resume=("paused" if paused else "running") if (saving or _saved(snap)) else None,
        )
        self._follow_up()
        return new_id

    def revert(self, layer_paths: LayerPaths) -> UUID:
        """Apply the nearest visible snapshot above the current state (hidden nodes are skipped)."""
        for node in ancestors(self.nodes, self.current):
            if node.kind is NodeKind.SNAPSHOT:
                return self.apply_snapshot(str(node.id), layer_paths, revert=True)
        raise Refused(f"VM {self.name!r} has no snapshot above its current state to revert to")

    def delete_snapshot(self, ref: str, *, subtree: bool = False) -> list[UUID]:
        """Delete one snapshot, or it and every snapshot below it (leaves first)."""
        snap = self.resolve_snapshot(ref)
        self._refuse_while_merging("delete a snapshot")
        targets = [snap]
        if subtree:
            below = [n for n in descendants(self.nodes, snap.id) if n.kind is NodeKind.SNAPSHOT]
            targets = below + [snap]
        for target in targets:
            self._delete_one(target)
        return [t.id for t in targets]

    def _delete_one(self, snap: Node) -> None:
        files = [str(snap.memory["path"])] if snap.memory and snap.memory.get("path") else []
        self.trigger_event(
            self.SnapshotDeleted,
            node_id=snap.id,
            name=snap.name or "",
            dependents=len(children(self.nodes, snap.id)),
            files=files,
        )
        self._follow_up()

    def rename_snapshot(self, ref: str, new_name: str) -> None:
        snap = self.resolve_snapshot(ref)
        validate_name(new_name, "snapshot name")
        other = self.snapshot_named(new_name)
        if other is not None and other.id != snap.id:
            raise NameTaken(f"VM {self.name!r} already has a snapshot named {new_name!r}")
        if snap.name == new_name:
            return
        self.trigger_event(
            self.SnapshotRenamed, node_id=snap.id, old_name=snap.name or "", new_name=new_name
        )

    def merge(self, ref: str, *, force: bool) -> UUID:
        """Ask for a hidden node's merge now: retry a failed one, or force one with 2+ dependents.

        A forced merge pulls the node's data up into each dependent, then deletes it.
        """
        node = self.resolve_node(ref)
        if node.kind is not NodeKind.HIDDEN:
            raise Refused(f"node {ref!r} is {_kind_phrase(node)}; only hidden nodes merge")
        if node.merge_state is MergeState.RUNNING:
            raise Conflict(f"the merge of node {node.id} is already running")
        dependents = len(children(self.nodes, node.id))
        if dependents >= 2 and not force:
            raise Refused(
                f"node {ref!r} has {dependents} dependents; `merge --force` pulls its data up into each"
            )
        if force and dependents >= 2 and node.parent is None:
            raise Refused(
                f"node {ref!r} holds the VM's own disk; a forced merge would delete the user's file"
            )
        if node.merge_state is MergeState.SCHEDULED and node.merge_forced == (dependents >= 2):
            return node.id
        for above in ancestors(self.nodes, node.id):
            if above.merge_state in (MergeState.SCHEDULED, MergeState.RUNNING):
                # Its merge re-parents or re-files this node (it may even hand it the VM's own
                # disk): decide once it is done.
                raise Conflict(
                    f"the merge of node {above.id} above {ref!r} is pending; try again when the worker is idle"
                )
        self.trigger_event(self.MergeScheduled, node_id=node.id, forced=dependents >= 2)
        return node.id

    # --- results of side effects, reported by workers ---

    def record_import(self, nodes: list[Node], current: UUID, source: dict[str, Any]) -> None:
        """Replace a just-registered VM's tree by an imported one (see `Imported`)."""
        if self.version != 1:
            raise Conflict(f"VM {self.name!r} already has a history; import into a new name")
        ids = {n.id for n in nodes}
        if current not in ids or any(n.parent is not None and n.parent not in ids for n in nodes):
            raise Refused("the imported tree is inconsistent: a parent or the current state is missing")
        if sum(1 for n in nodes if n.parent is None) != 1:
            raise Refused("the imported tree must have exactly one root")
        root = next(n for n in nodes if n.parent is None)
        if root.layers != self.disks:
            raise Refused("the imported root's layers must be the VM's own disks")
        self.trigger_event(self.Imported, nodes=nodes, current=current, source=dict(source))

    def set_config(self, changes: dict[str, Any]) -> None:
        """Change the current state's settings (memory, cpus); snapshots keep their copies."""
        if not changes:
            raise Refused("nothing to change")
        config = dict(self.nodes[self.current].config)
        config.update(changes)
        if config != self.nodes[self.current].config:
            self.trigger_event(self.ConfigChanged, config=config)

    def layers_created(self, node_id: UUID, live: dict[str, Any] | None = None) -> None:
        node = self.nodes.get(node_id)
        if node is not None and not node.ready:
            self.trigger_event(self.LayersCreated, node_id=node_id, live=live)

    def memory_saved(self, node_id: UUID, nbytes: int, seconds: float, sha256: str) -> None:
        node = self.nodes.get(node_id)
        if node is not None and node.memory and node.memory.get("state") == "saving":
            self.trigger_event(
                self.MemorySaved, node_id=node_id, bytes=nbytes, seconds=seconds, sha256=sha256
            )

    def memory_save_failed(self, node_id: UUID, error: str) -> None:
        node = self.nodes.get(node_id)
        if node is not None and node.memory and node.memory.get("state") == "saving":
            self.trigger_event(self.MemorySaveFailed, node_id=node_id, error=error)

    def merge_started(self, node_id: UUID, into: list[UUID], direction: MergeDirection, nbytes: int) -> None:
        node = self.nodes.get(node_id)
        if node is None or node.merge_state is not MergeState.SCHEDULED:
            raise Conflict(f"node {node_id} has no merge waiting to start")
        running = self.running_merge()
        if running is not None:
            raise Conflict(f"the merge of node {running.id} is still running; one merge at a time")
        deps = sorted(c.id for c in children(self.nodes, node_id))
        if sorted(into) != deps:
            raise Conflict(f"merge of {node_id}: dependents are {deps}, not {sorted(into)}")
        if len(into) > 1 and direction is not MergeDirection.PULL_UP:
            raise Refused("a merge into several dependents can only pull the data up")
        if node.parent is None and direction is not MergeDirection.COMMIT_DOWN:
            raise Refused("a merge of the VM's own disk always commits down into it")
        self.trigger_event(
            self.MergeStarted, node_id=node_id, into=list(into), direction=direction.value, bytes=nbytes
        )

    def merge_completed(self, node_id: UUID) -> None:
        node = self.nodes.get(node_id)
        if node is None:
            return  # already recorded: a re-run of the same item
        plan = node.merge_plan
        if node.merge_state is not MergeState.RUNNING or plan is None:
            raise Conflict(f"node {node_id} has no running merge")
        layers: dict[UUID, dict[str, str]] = {}
        if plan.direction is MergeDirection.COMMIT_DOWN:
            (dep_id,) = plan.into
            layers[dep_id] = dict(node.layers)  # the dependent takes the merged file over
            files = list(self.nodes[dep_id].layers.values())
        else:
            for dep_id in plan.into:
                layers[dep_id] = dict(self.nodes[dep_id].layers)
            files = list(node.layers.values())
        self.trigger_event(
            self.MergeCompleted,
            node_id=node_id,
            into=list(plan.into),
            direction=plan.direction.value,
            layers=layers,
            files=[f for f in files if not self.is_own_disk(f)],
        )
        self._follow_up()

    def merge_failed(self, node_id: UUID, error: str) -> None:
        node = self.nodes.get(node_id)
        if node is not None and node.merge_state in (MergeState.SCHEDULED, MergeState.RUNNING):
            self.trigger_event(self.MergeFailed, node_id=node_id, error=error)

    def files_removed(self, paths: list[str]) -> None:
        gone = [p for p in paths if p in self.garbage]
        if gone:
            self.trigger_event(self.FilesRemoved, paths=gone)

    # --- internals ---

    def _follow_up(self) -> None:
        """Apply the dependents rule to every hidden node until nothing changes (the cascade)."""
        while (found := next_follow_up(self.nodes)) is not None:
            node, outcome = found
            if outcome is Outcome.REMOVE:
                self.trigger_event(self.NodeRemoved, node_id=node.id, reason="no dependents")
            elif outcome is Outcome.MERGE:
                self.trigger_event(self.MergeScheduled, node_id=node.id, forced=False)
            else:
                deps = len(children(self.nodes, node.id))
                self.trigger_event(self.MergeDeferred, node_id=node.id, dependents=deps)

    def _remove_node(self, node_id: UUID, version: int) -> None:
        node = self.nodes.pop(node_id)
        for path in node.layers.values():
            if not self.is_own_disk(path):
                self.garbage[path] = version
        if node.memory and node.memory.get("path"):
            self.garbage[str(node.memory["path"])] = version

    def _refuse_while_merging(self, what: str) -> None:
        running = self.running_merge()
        if running is not None:
            raise Conflict(
                f"cannot {what} of VM {self.name!r} while the merge of node {running.id} is running;"
                " wait for the worker (snaptree worker run)"
            )


def _saved(node: Node) -> bool:
    return bool(node.memory and node.memory.get("state") == "saved")


def _kind_phrase(node: Node) -> str:
    return {
        NodeKind.CURRENT: "the current state",
        NodeKind.HIDDEN: "a hidden node",
        NodeKind.SNAPSHOT: "a snapshot",
    }[node.kind]


__all__ = ["VirtualMachine", "vm_id", "InvalidName"]
