"""A tiny pure simulator of the worker, and a content model of the layer files, for domain tests.

No files, no QEMU: `settle` performs what `domain.work.pending_work(vm)` asks for *logically*
(create_layers -> `vm.layers_created`, merge -> `vm.merge_started` + `vm.merge_completed`,
remove_files -> `vm.files_removed`) directly on a `VirtualMachine` aggregate.

The content model (`Content`) keeps, per layer file, a dict offset -> pattern: what that file
holds. A read of node N at an offset is the first layer holding it on the way N, parent,
grandparent, ... (the physical tree), else nothing (`None`). Writes go only into the current
state's layers. A merge moves data the way the worker does:

- COMMIT_DOWN of hidden H into its one dependent D: D's data is copied down into H's layer (D's data
  wins), then D takes H's layer file over; D's old file is garbage;
- PULL_UP of H into its dependents: H's data is copied into each dependent's layer *under* the
  dependent's own data; H's file is garbage.

So a test can check that no operation ever changes what a visible snapshot or the current state reads.

Memory (live snapshots) is modelled as the worker does it: the sim knows which node the VM's QEMU
runs on (`running_on`, set by a RUN start item, as `vm start` asks). Creating the overlays of a
current state whose parent is the node QEMU runs on is the live switch (`layers_created` with
`LIVE_SWITCH`, the memory save starting with it when the take asked for memory: the memory file
exists from then on); creating them for a VM that does not run reports `not_running` (a take's
memory intent becomes "none"); creating the overlays of a current state to be restored from saved
memory restarts QEMU on them (`restored_from`), and any other new current state of a running VM
stops it. save_memory -> `vm.memory_saved`, or `vm.memory_save_failed` when the save never started.

The worker is strict by default: it performs items exactly in `pending_work` order and raises
`OutOfOrder` when an item needs layer files that no earlier item created (an overlay whose backing
file does not exist yet, a merge into a node whose layers do not exist), and `Stuck` when a merge
can be done no way `merge_started` accepts. `creates_first=True` instead works around the first.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable
from uuid import UUID

from domain.lifecycle import RunAction, RunState
from domain.memory import LiveSwitch, MemoryState, Resume, SaveMethod
from domain.tree import MergeDirection, MergeState, Node, NodeKind, ancestors, children
from domain.vm import VirtualMachine
from domain.work import WorkItem, WorkKind, pending_work

DISKS = ("disk0", "disk1")
OWN_DISKS = {"disk0": "/base/d0.qcow2", "disk1": "/base/d1.qcow2"}
BLOCK = 64 * 1024  # bytes one offset stands for, for the merge's byte count

LayerPaths = Callable[[UUID], dict[str, str]]
Reads = dict[str, dict[int, str]]  # disk -> offset -> pattern


def layer_paths(node_id: UUID) -> dict[str, str]:
    return {d: f"/data/{node_id}.{d}.qcow2" for d in DISKS}


def memory_path(node_id: UUID) -> str:
    return f"/data/{node_id}.state"


LIVE_SWITCH = LiveSwitch(pause_ms=7.0, method=SaveMethod.BACKGROUND_SNAPSHOT)


def new_vm(name: str = "vm1") -> VirtualMachine:
    return VirtualMachine.register(name=name, host="host1", disks=dict(OWN_DISKS))


class Stuck(AssertionError):
    """A work item that no worker can perform: the domain refuses every way of doing it."""


class OutOfOrder(AssertionError):
    """`pending_work` put an item before the creation of layer files that the item needs."""


# --- merge directions ---


class Directions:
    """The worker's choice of merge direction.

    `policy` is "commit-down", "pull-up" or "alternate". Whatever it says, a merge of the root (the
    VM's own disk) commits down, and a merge into 2+ dependents (a forced merge) pulls up.
    """

    def __init__(self, policy: str = "commit-down") -> None:
        if policy not in ("commit-down", "pull-up", "alternate"):
            raise ValueError(policy)
        self.policy = policy
        self._toggle = itertools.cycle([MergeDirection.COMMIT_DOWN, MergeDirection.PULL_UP])

    def choose(self, vm: VirtualMachine, node: Node, deps: list[Node]) -> MergeDirection:
        if len(deps) >= 2 and node.parent is None:
            raise Stuck(
                f"hidden node {node.name!r} ({node.id}) holds the VM's own disk and has "
                f"{len(deps)} dependents, but its merge is {node.merge_state.value if node.merge_state else None}"
                f" (forced={node.merge_forced}): it can neither commit down (several dependents)"
                " nor pull up (own disk)"
            )
        if len(deps) >= 2:
            return MergeDirection.PULL_UP
        if node.parent is None:
            return MergeDirection.COMMIT_DOWN
        if self.policy == "commit-down":
            return MergeDirection.COMMIT_DOWN
        if self.policy == "pull-up":
            return MergeDirection.PULL_UP
        return next(self._toggle)


# --- the content model ---


class Content:
    """What every layer file holds: path -> {offset: pattern}. A file exists iff it is a key."""

    def __init__(self, vm: VirtualMachine, base: dict[str, dict[int, str]] | None = None) -> None:
        # The VM's own disks exist from the start and hold whatever the user put in them.
        if base is None:
            base = {disk: {0: f"base:{disk}"} for disk in vm.disks}
        self.files: dict[str, dict[int, str]] = {
            path: dict(base.get(disk, {})) for disk, path in vm.disks.items()
        }
        self.own = set(vm.disks.values())
        self.memory: set[str] = set()  # memory state files that exist

    # queries

    def read(self, vm: VirtualMachine, node_id: UUID) -> Reads:
        """What node `node_id` reads on every disk: its own layer first, then down its chain."""
        chain = [vm.nodes[node_id], *ancestors(vm.nodes, node_id)]
        out: Reads = {}
        for disk in vm.disks:
            seen: dict[int, str] = {}
            for node in chain:
                for off, pattern in self.files.get(node.layers[disk], {}).items():
                    seen.setdefault(off, pattern)
            out[disk] = seen
        return out

    def visible_reads(self, vm: VirtualMachine) -> dict[UUID, Reads]:
        """Reads of every visible snapshot and of the current state (keyed by node id)."""
        return {
            n.id: self.read(vm, n.id)
            for n in vm.nodes.values()
            if n.kind in (NodeKind.SNAPSHOT, NodeKind.CURRENT)
        }

    def existing(self) -> set[str]:
        return set(self.files)

    # the guest

    def write(self, vm: VirtualMachine, disk: str, offset: int, pattern: str) -> None:
        current = vm.nodes[vm.current]
        assert current.ready, "the VM cannot run before its current layers exist"
        path = current.layers[disk]
        assert path in self.files, f"current layer {path} does not exist"
        self.files[path][offset] = pattern

    # the worker's file operations

    def create(self, paths: Iterable[str]) -> None:
        for path in paths:
            assert path not in self.own, f"would overwrite the VM's own disk {path}"
            self.files.setdefault(path, {})  # idempotent: an existing overlay is kept

    def remove(self, paths: Iterable[str]) -> None:
        for path in paths:
            assert path not in self.own, f"would delete the VM's own disk {path}"
            self.files.pop(path, None)
            self.memory.discard(path)

    def commit_down(self, node: Node, dep: Node) -> None:
        for disk, low in node.layers.items():
            high = dep.layers[disk]
            merged = dict(self.files[low])
            merged.update(self.files[high])
            self.files[low] = merged

    def pull_up(self, node: Node, deps: list[Node]) -> None:
        for dep in deps:
            for disk, high in dep.layers.items():
                merged = dict(self.files[node.layers[disk]])
                merged.update(self.files[high])
                self.files[high] = merged

    def bytes_for(self, node: Node, deps: list[Node], direction: MergeDirection) -> int:
        if direction is MergeDirection.COMMIT_DOWN:
            return sum(len(self.files.get(p, {})) for d in deps for p in d.layers.values()) * BLOCK
        return sum(len(self.files.get(p, {})) for p in node.layers.values()) * BLOCK * len(deps)


# --- the worker ---


class Worker:
    """Performs work items in `pending_work` order, on the aggregate and the content model."""

    def __init__(
        self,
        vm: VirtualMachine,
        layer_paths: LayerPaths = layer_paths,
        directions: Directions | str = "commit-down",
        content: Content | None = None,
        *,
        creates_first: bool = False,
        after_each: Callable[[], None] | None = None,
    ) -> None:
        self.vm = vm
        self.after_each = after_each  # called after every item performed (e.g. invariant checks)
        self.layer_paths = layer_paths
        self.directions = Directions(directions) if isinstance(directions, str) else directions
        self.content = content if content is not None else Content(vm)
        self.creates_first = creates_first
        self.reordered = 0  # items performed out of the domain's order (see `perform`)
        self.memory_failures = 0  # memory saves that never started when their item came
        self.running_on: UUID | None = vm.current if vm.run.state is not RunState.STOPPED else None
        self.done: list[tuple[str, UUID | None, str]] = []  # (kind, node, detail) in order

    def settle(self, limit: int | None = None, *, leave_running: bool = False) -> int:
        """Perform the first `limit` pending items (all when None), re-reading the work after each.

        With `leave_running`, a merge that is the last item allowed is only started (its plan is
        recorded, the merge stays RUNNING). Returns how many items were performed.
        """
        count = 0
        while limit is None or count < limit:
            items = pending_work(self.vm)
            if not items:
                break
            last = limit is not None and count == limit - 1
            self.perform(items[0], start_only=leave_running and last)
            if self.after_each is not None:
                self.after_each()
            count += 1
            if limit is None and count > 10_000:
                raise Stuck(f"work does not converge: {pending_work(self.vm)[:3]}")
        return count

    def perform(self, item: WorkItem, *, start_only: bool = False) -> None:
        """Perform one item; first, the layer files it needs must exist.

        In strict mode (`creates_first=False`) an item whose files do not exist yet raises
        `OutOfOrder`. With `creates_first=True` the worker works around it: it creates the missing
        layers first (parents before children) and counts it in `self.reordered`.
        """
        missing = self._missing_layers(item)
        if missing:
            if not self.creates_first:
                raise OutOfOrder(
                    f"{item.kind.value} (seq {item.seq}) of node {item.node_id} comes before the "
                    f"creation of the layers of {[str(n.id) for n in missing]} (seq "
                    f"{[n.scheduled_at for n in missing]}), which it needs"
                )
            self.reordered += 1
            self._create(missing[0])  # the top-most missing one: its parent's files exist
            return
        vm = self.vm
        if item.kind is WorkKind.CREATE_LAYERS:
            assert item.node_id is not None
            self._create(vm.nodes[item.node_id])
        elif item.kind is WorkKind.REMOVE_FILES:
            in_use = {p for n in vm.nodes.values() for p in n.layers.values()}
            for path in item.paths:
                assert path not in in_use, f"garbage {path} is still a layer of a node"
                assert not vm.is_own_disk(path), f"garbage {path} is the VM's own disk"
            self.content.remove(item.paths)
            vm.files_removed(list(item.paths))
            self.done.append(("remove_files", None, ",".join(item.paths)))
        elif item.kind is WorkKind.MERGE:
            assert item.node_id is not None
            self.merge(item.node_id, start_only=start_only)
        elif item.kind is WorkKind.SAVE_MEMORY:
            assert item.node_id is not None
            self.save_memory(vm.nodes[item.node_id])
        elif item.kind is WorkKind.RUN:
            self.run()
        else:  # pragma: no cover
            raise AssertionError(item)

    def _missing_layers(self, item: WorkItem) -> list[Node]:
        """Nodes whose layers the item needs but which were never created, top-most first."""
        vm = self.vm
        if item.node_id is None or item.node_id not in vm.nodes:
            return []
        if item.kind is WorkKind.CREATE_LAYERS:
            need = list(ancestors(vm.nodes, item.node_id))  # the backing chain
        elif item.kind is WorkKind.MERGE:
            node = vm.nodes[item.node_id]
            plan = node.merge_plan
            into = plan.into if plan else [c.id for c in children(vm.nodes, node.id)]
            need = [node, *ancestors(vm.nodes, node.id), *(vm.nodes[d] for d in into)]
        else:
            return []
        missing = {n.id: n for n in need if not n.ready}
        return sorted(missing.values(), key=lambda n: len(chain(vm, n.id)))

    def _create(self, node: Node) -> None:
        assert not node.ready
        assert node.layers == self.layer_paths(node.id), (
            f"node {node.id} is to get layers {node.layers}, not its own new overlays"
        )
        assert node.parent is not None, "the root's layers are the VM's own disks"
        parent = self.vm.nodes[node.parent]
        for path in parent.layers.values():
            assert path in self.content.files, f"backing file {path} does not exist"
        self.content.create(node.layers.values())
        live: LiveSwitch | None = None
        parent_mem = parent.memory
        if node.restore is not None and parent_mem is not None and parent_mem.state is MemoryState.SAVED:
            state = RunState.PAUSED if node.restore is Resume.PAUSED else RunState.RUNNING
            live = LiveSwitch(restored_from=parent.id, run_after=state, pid=1)  # QEMU restarted
            self.running_on = node.id
        elif self.running_on is not None and self.running_on == parent.id:
            live = LIVE_SWITCH  # the live switch; a memory save the take asked for starts with it
            if parent_mem is not None and parent_mem.state is MemoryState.REQUESTED:
                assert parent_mem.path is not None
                self.content.memory.add(parent_mem.path)
            self.running_on = node.id
        elif self.running_on is not None:  # an apply without memory: the VM ends stopped
            live = LiveSwitch(run_after=RunState.STOPPED)
            self.running_on = None
        else:
            live = LiveSwitch(not_running=True)
        self.vm.layers_created(node.id, live)
        self.done.append(("create_layers", node.id, ""))

    def run(self) -> None:
        request = self.vm.run_request
        assert request is not None
        if request.action is RunAction.START:
            self.running_on = self.vm.current
            self.vm.record_run(RunState.PAUSED if request.paused else RunState.RUNNING, 1)
        else:
            self.running_on = None
            self.vm.record_run(RunState.STOPPED)
        self.done.append(("run", None, request.action.value))

    def save_memory(self, node: Node) -> None:
        mem = node.memory
        if mem is not None and mem.state is MemoryState.SAVING:
            self.vm.memory_saved(node.id, 1 << 20, 0.5, "0" * 64)
            self.done.append(("save_memory", node.id, "saved"))
        else:  # what the real worker reports
            self.vm.memory_save_failed(node.id, "the save never started")
            self.memory_failures += 1
            self.done.append(("save_memory", node.id, "failed"))

    def start_merge(self, node_id: UUID) -> MergeDirection:
        vm = self.vm
        node = vm.nodes[node_id]
        assert node.merge_state is MergeState.SCHEDULED, node.merge_state
        deps = sorted(children(vm.nodes, node_id), key=lambda n: str(n.id))
        if not deps:
            raise Stuck(f"merge of {node_id} scheduled with no dependent")
        direction = self.directions.choose(vm, node, deps)
        vm.merge_started(
            node_id, [d.id for d in deps], direction, self.content.bytes_for(node, deps, direction)
        )
        return direction

    def finish_merge(self, node_id: UUID) -> None:
        vm = self.vm
        node = vm.nodes[node_id]
        plan = node.merge_plan
        assert node.merge_state is MergeState.RUNNING and plan is not None
        deps = [vm.nodes[d] for d in plan.into]
        if plan.direction is MergeDirection.COMMIT_DOWN:
            (dep,) = deps
            self.content.commit_down(node, dep)
        else:
            self.content.pull_up(node, deps)
        vm.merge_completed(node_id)
        self.done.append(("merge", node_id, plan.direction.value))

    def merge(self, node_id: UUID, *, start_only: bool = False) -> None:
        if self.vm.nodes[node_id].merge_state is MergeState.SCHEDULED:
            self.start_merge(node_id)
            if start_only:
                return
        self.finish_merge(node_id)


def settle(
    vm: VirtualMachine,
    layer_paths: LayerPaths = layer_paths,
    directions: Directions | str = "commit-down",
    *,
    limit: int | None = None,
    content: Content | None = None,
    creates_first: bool = False,
) -> Worker:
    """Perform the VM's pending work (the first `limit` items, or all); returns the worker used."""
    worker = Worker(vm, layer_paths, directions, content, creates_first=creates_first)
    worker.settle(limit)
    return worker


# --- tree facts for assertions ---


def deps(vm: VirtualMachine, node_id: UUID) -> list[Node]:
    return children(vm.nodes, node_id)


def named(vm: VirtualMachine, name: str) -> Node:
    """The visible snapshot called `name`."""
    found = [n for n in vm.nodes.values() if n.kind is NodeKind.SNAPSHOT and n.name == name]
    assert len(found) == 1, f"{len(found)} visible snapshots named {name!r}"
    return found[0]


def hidden(vm: VirtualMachine) -> list[Node]:
    return [n for n in vm.nodes.values() if n.kind is NodeKind.HIDDEN]


def chain(vm: VirtualMachine, node_id: UUID) -> list[Node]:
    """The node and everything below it, down to the root."""
    return [vm.nodes[node_id], *ancestors(vm.nodes, node_id)]


def shape(vm: VirtualMachine) -> dict[str, object]:
    """A readable picture of the tree: label -> (kind, parent label, merge state)."""

    def label(n: Node | None) -> str | None:
        if n is None:
            return None
        if n.kind is NodeKind.CURRENT:
            return "<current>"
        return f"{n.name}{'*' if n.kind is NodeKind.HIDDEN else ''}"

    return {
        label(n) or "?": (
            n.kind.value,
            label(vm.nodes[n.parent]) if n.parent else None,
            n.merge_state.value if n.merge_state else None,
        )
        for n in vm.nodes.values()
    }
