"""When host work fails: the failure is a recorded state with a way out, never a wedge.

A failed step is recorded on the VM (`StepFailed`). A failure to create a node's layers holds back
the VM's later work (it may depend on those files) and the commands that would add more; reads,
renames and settings go ahead. The operator retries (`work retry`: the step runs again) or
abandons it (`work abandon`): a take whose overlay could not be created is rolled back (the
snapshot becomes the current state again), an apply is rolled back to the state before it. A
failure to delete files holds nothing back: they stay listed as garbage until a retry.
docs/semantics.md, "Refusals and failures".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from domain.memory import MemoryState
from domain.tree import Node, NodeKind

if TYPE_CHECKING:
    from domain.vm import VirtualMachine

CREATE_LAYERS = "create_layers"
REMOVE_FILES = "remove_files"
FLATTEN = "flatten"  # holds nothing back: the node reads the same, only deeper, until a retry


@dataclass(frozen=True)
class Failure:
    kind: str  # CREATE_LAYERS | REMOVE_FILES
    seq: int  # the aggregate version of the work item that failed
    error: str
    node_id: UUID | None = None
    paths: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.node_id or self.seq}"


def failure_key(kind: str, node_id: UUID | None, seq: int) -> str:
    return f"{kind}:{node_id or seq}"


def blocking(vm: VirtualMachine) -> Failure | None:
    """The earliest failure that holds the VM's later work back (None: nothing is held)."""
    held = [f for f in vm.failed.values() if f.kind == CREATE_LAYERS]
    return min(held, key=lambda f: f.seq) if held else None


def describe(vm: VirtualMachine, failure: Failure) -> str:
    """What failed and how to get out, for refusals and `tree`."""
    what = {CREATE_LAYERS: "creating the layers of", REMOVE_FILES: "deleting files of",
            FLATTEN: "flattening the layer of"}[failure.kind]
    target = "the current state" if failure.node_id == vm.current else f"node {failure.node_id}"
    if failure.kind == REMOVE_FILES:
        target = ", ".join(failure.paths[:2]) + (" ..." if len(failure.paths) > 2 else "")
    if failure.kind == FLATTEN:  # nothing to roll back: the node reads the same
        return f"{what} {target} failed: {failure.error}; `snaptree work retry {vm.name}` runs it again"
    return (f"{what} {target} failed: {failure.error}; `snaptree work retry {vm.name}` runs it again,"
            f" `snaptree work abandon {vm.name}` rolls it back")


def undo_take(vm: VirtualMachine, new_id: UUID, snapshot_id: UUID, version: int) -> None:
    """The take never happened: its snapshot is the current state again."""
    new = vm.nodes.pop(new_id)
    for path in new.layers.values():
        vm.garbage = {**vm.garbage, path: version}
    frozen = vm.nodes[snapshot_id]
    if frozen.nvram is not None:
        vm.garbage = {**vm.garbage, frozen.nvram: version}
        frozen.nvram = None
    vm.names.pop(frozen.name or "", None)
    frozen.kind = NodeKind.CURRENT
    frozen.name = None
    if frozen.memory is not None and frozen.memory.state is MemoryState.REQUESTED:
        frozen.memory = None
    vm.current = snapshot_id
    _forget(vm, new_id)


def undo_apply(vm: VirtualMachine, new_id: UUID, restored: list[UUID], version: int) -> None:
    """The apply never happened: the discarded current state (and what its cascade removed)
    come back; the files the apply freed are no garbage any more."""
    new = vm.nodes.pop(new_id)
    for path in new.layers.values():
        vm.garbage = {**vm.garbage, path: version}
    for node_id in restored:
        _, node = vm.removed[node_id]
        vm.nodes[node_id] = node
        kept = set(node.layers.values())
        if node.memory is not None and node.memory.path:
            kept.add(node.memory.path)
        if node.nvram is not None:
            kept.add(node.nvram)
        vm.garbage = {p: v for p, v in vm.garbage.items() if p not in kept}
        if node.kind is NodeKind.CURRENT:
            vm.current = node_id
    vm.removed = {k: v for k, v in vm.removed.items() if k not in restored}
    _forget(vm, new_id)


def _forget(vm: VirtualMachine, node_id: UUID) -> None:
    vm.failed = {k: f for k, f in vm.failed.items() if f.node_id != node_id}


def remember_removed(vm: VirtualMachine, node: Node, version: int) -> None:
    """Kept until its files are gone, so that a failed apply can be rolled back."""
    vm.removed = {**vm.removed, node.id: (version, node)}


def forget_removed(vm: VirtualMachine) -> None:
    """Nodes none of whose files is still waiting to be deleted cannot come back."""
    def waiting(node: Node) -> bool:
        files = set(node.layers.values()) | ({node.memory.path} if node.memory and node.memory.path else set())
        files |= {node.nvram} if node.nvram else set()
        return any(p in vm.garbage for p in files)

    vm.removed = {k: v for k, v in vm.removed.items() if waiting(v[1])}


def rollback_plan(vm: VirtualMachine, failure: Failure) -> tuple[str, list[UUID]] | None:
    """How to undo the failed creation of the current state's layers: ("take", []) or
    ("apply", nodes to restore); None when the failed node is not the current state."""
    node = vm.nodes.get(failure.node_id) if failure.node_id is not None else None
    if node is None or node.id != vm.current or node.parent is None:
        return None
    since = [(v, n) for v, n in vm.removed.values() if v >= node.created_seq]
    if any(v == node.created_seq and n.kind is NodeKind.CURRENT for v, n in since):
        return "apply", [n.id for _, n in since]
    return "take", []
