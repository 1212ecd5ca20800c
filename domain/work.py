"""The side effects a VM's tree still asks for, in the order a worker must perform them.

Work is read off the aggregate's state, not off single events: a worker that crashed, ran an item
twice, or starts after a restart asks again and gets exactly what is still to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from uuid import UUID

from domain import recovery
from domain.lifecycle import RunAction
from domain.tree import MergeState, NodeKind
from domain.vm import VirtualMachine


class WorkKind(str, Enum):
    CREATE_LAYERS = "create_layers"
    SAVE_MEMORY = "save_memory"  # wait for a running VM's memory save and record it
    REMOVE_FILES = "remove_files"
    MERGE = "merge"
    FLATTEN = "flatten"  # rebase a snapshot's layer onto an older ancestor (bounded chains)
    RUN = "run"  # start or stop the VM's QEMU, as a command asked


@dataclass(frozen=True)
class WorkItem:
    kind: WorkKind
    seq: int  # aggregate version that asked for it: items run in this order
    node_id: UUID | None = None
    paths: tuple[str, ...] = ()


def pending_work(vm: VirtualMachine) -> list[WorkItem]:
    items: list[WorkItem] = []
    for node in vm.nodes.values():
        if not node.ready:
            items.append(WorkItem(WorkKind.CREATE_LAYERS, node.created_seq, node.id))
        if node.memory is not None and node.memory.pending:
            # Its save starts with the switch to the child's overlay (CREATE_LAYERS, same seq).
            items.append(WorkItem(WorkKind.SAVE_MEMORY, node.memory_seq, node.id))
        if node.kind is NodeKind.HIDDEN and node.merge_state in (MergeState.SCHEDULED, MergeState.RUNNING):
            items.append(WorkItem(WorkKind.MERGE, node.merge_seq, node.id))
        if node.flatten in (MergeState.SCHEDULED, MergeState.RUNNING):
            items.append(WorkItem(WorkKind.FLATTEN, node.flatten_seq, node.id))
    by_seq: dict[int, list[str]] = {}
    for path, seq in vm.garbage.items():
        by_seq.setdefault(seq, []).append(path)
    for seq, paths in by_seq.items():
        items.append(WorkItem(WorkKind.REMOVE_FILES, seq, paths=tuple(sorted(paths))))
    if vm.run_request is not None:
        seq = vm.run_request.seq
        current = vm.nodes[vm.current]
        if vm.run_request.action is RunAction.START and not current.ready:
            seq = max(seq, current.created_seq)  # QEMU starts on the current state's layers
        items.append(WorkItem(WorkKind.RUN, seq))
    items = [i for i in items if not _failed(vm, i)]
    if vm.running_flatten() is not None:  # its plan holds the layers it reads: merges wait
        items = [i for i in items if i.kind is not WorkKind.MERGE or _merge_running(vm, i)]
    held = recovery.blocking(vm)
    if held is not None:  # it may have created files later work needs: nothing after it runs
        items = [i for i in items if i.seq < held.seq or _is_stop(vm, i)]
    # A running merge resumes first: its plan was recorded and commands wait for it.
    return sorted(items, key=lambda i: (_running_first(vm, i), i.seq, i.kind.value))


def _failed(vm: VirtualMachine, item: WorkItem) -> bool:
    return recovery.failure_key(item.kind.value, item.node_id, item.seq) in vm.failed


def _merge_running(vm: VirtualMachine, item: WorkItem) -> bool:
    return item.node_id is not None and vm.nodes[item.node_id].merge_state is MergeState.RUNNING


def _is_stop(vm: VirtualMachine, item: WorkItem) -> bool:
    return item.kind is WorkKind.RUN and vm.run_request is not None and vm.run_request.action is RunAction.STOP


def _running_first(vm: VirtualMachine, item: WorkItem) -> int:
    if item.kind is WorkKind.MERGE and item.node_id is not None:
        if vm.nodes[item.node_id].merge_state is MergeState.RUNNING:
            return 0
    if item.kind is WorkKind.FLATTEN and item.node_id is not None:
        if vm.nodes[item.node_id].flatten is MergeState.RUNNING:
            return 0
    return 1


def is_idle(vm: VirtualMachine) -> bool:
    return not pending_work(vm)
