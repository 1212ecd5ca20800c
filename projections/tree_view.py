"""The tree of one VM as the stable JSON of docs/output.md (`tree VM --json`, `merges --json`).

Pure functions of the aggregate; the caller passes `measure(path) -> bytes allocated on disk`
when the output should say how many bytes hidden nodes hold and merges would move.
"""

from __future__ import annotations

from typing import Any, Callable
from uuid import UUID

from domain import recovery
from domain.memory import MemoryState
from domain.rules import flatten_run, max_chain_depth
from domain.tree import MergeState, Node, NodeKind, ancestors, chain_depth, children, logical_parent
from domain.vm import VirtualMachine
from projections.tree_doc import flatten_bytes, planned_bytes

Measure = Callable[[str], int]

MERGE_STATE_JSON = {
    MergeState.PENDING: "pending",
    MergeState.SCHEDULED: "pending",
    MergeState.RUNNING: "running",
    MergeState.FAILED: "failed",
}


def blocked_by(vm: VirtualMachine, node: Node) -> str | None:
    """Why a hidden node's merge has not happened yet (None when nothing blocks it)."""
    if node.merge_state is MergeState.FAILED:
        return f"failed: {node.merge_error}"
    if node.merge_state is MergeState.RUNNING:
        return None
    deps = len(children(vm.nodes, node.id))
    if node.merge_state is MergeState.SCHEDULED:
        return "waiting for the worker"
    return f"{deps} dependents"


def merge_bytes(vm: VirtualMachine, node: Node, measure: Measure | None) -> int | None:
    """Bytes the merge will copy in its chosen direction (or a forced merge, for 2+ dependents)."""
    if node.merge_plan is not None:
        return node.merge_plan.bytes
    if measure is None:
        return None
    deps = children(vm.nodes, node.id)
    return planned_bytes(
        sum(measure(p) for p in node.layers.values()),
        [sum(measure(p) for p in d.layers.values()) for d in deps],
        root=node.parent is None,
    )


def next_flatten(vm: VirtualMachine, node: Node) -> dict[str, Any]:
    """When the next flatten comes (`after_takes`), and which of the current chain's layers it
    will copy from (`depths`, 0 = the own disk), as far as they exist now; `bytes` is filled from
    the files (projections.read) and is what those layers hold: the flatten copies at least that."""
    chain = [node, *ancestors(vm.nodes, node.id)]  # current first, the root last
    depth, limit = len(chain) - 1, max_chain_depth(node.config)
    takes = max(1, limit - depth + 1)
    # At that take the layers below the flattened one are `takes - 1` new plain ones, then these.
    levels = [0] * (takes - 1) + [n.level for n in chain[:-1]]
    existing = max(0, flatten_run(levels, limit) - (takes - 1))
    return {"after_takes": takes, "depths": list(range(depth, depth - existing, -1)), "bytes": None}


def node_json(vm: VirtualMachine, node: Node, measure: Measure | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": str(node.id),
        "name": None if node.kind is NodeKind.CURRENT else node.name,
        "kind": node.kind.value,
        "parent": _id(logical_parent(vm.nodes, node)),
        "backing": str(node.parent) if node.parent else None,  # differs once its layer was flattened
        "level": node.level,
        "created_at": node.created_at.isoformat().replace("+00:00", "Z"),
        "disks": dict(node.layers),
        "ready": node.ready,
    }
    if node.kind is not NodeKind.HIDDEN:
        out["memory"] = memory_json(node)
    if node.quiesce is not None:
        q = node.quiesce
        out["quiesce"] = {"state": q.label(), "filesystems": q.filesystems, "frozen_ms": q.frozen_ms}
    if node.clock is not None:
        out["clock"] = node.clock  # restored from memory: was the guest's clock set again
    if node.kind is NodeKind.CURRENT:
        out["chain_depth"] = chain_depth(vm.nodes, node.id)
        out["max_chain_depth"] = max_chain_depth(node.config)
        out["next_flatten"] = next_flatten(vm, node)
        if measure is not None:
            chain = [list(n.layers.values()) for n in [node, *ancestors(vm.nodes, node.id)]][::-1]
            out["next_flatten"]["bytes"] = flatten_bytes(chain, out["next_flatten"], measure)
    if node.flatten is not None:
        out["flatten"] = {"state": MERGE_STATE_JSON[node.flatten], "bytes": node.flatten_bytes or None,
                          "base": str(node.flatten_base) if node.flatten_base else None}
    failed = [f for f in failures_json(vm) if f["node"] == str(node.id)]
    if failed:
        out["failure"] = failed[0]  # its layers could not be created: `work retry` / `work abandon`
    if node.kind is NodeKind.HIDDEN:
        out["dependents"] = len(children(vm.nodes, node.id))
        out["merge"] = {
            "state": MERGE_STATE_JSON[node.merge_state or MergeState.PENDING],
            "blocked_by": blocked_by(vm, node),
            "bytes": merge_bytes(vm, node, measure),
            "forced": node.merge_forced,
        }
        if node.merge_plan is not None:
            out["merge"]["direction"] = node.merge_plan.direction.value
    return out


JSON_MEMORY_STATE = {
    MemoryState.NONE: "none",
    MemoryState.REQUESTED: "saving",  # asked for; the save starts with the switch
    MemoryState.SAVING: "saving",
    MemoryState.SAVED: "saved",
    MemoryState.FAILED: "failed",
}


def memory_json(node: Node) -> dict[str, Any]:
    mem = node.memory
    if mem is None:
        return {"state": "none", "method": None, "bytes": None, "path": None, "pause_ms": None}
    return {
        "state": JSON_MEMORY_STATE[mem.state],
        "method": mem.method.value if mem.method is not None else None,
        "bytes": mem.bytes,
        "path": mem.path if mem.state is not MemoryState.NONE else None,
        "pause_ms": mem.pause_ms,
    }


def tree_json(vm: VirtualMachine, measure: Measure | None = None) -> dict[str, Any]:
    nodes = sorted(vm.nodes.values(), key=lambda n: (n.created_at, str(n.id)))
    return {
        "vm": vm.name,
        "current": str(vm.current),
        "nodes": [node_json(vm, n, measure) for n in nodes],
    }


def failures_json(vm: VirtualMachine) -> list[dict[str, Any]]:
    """Host work that failed and waits for `work retry` or `work abandon`."""
    return [{"kind": f.kind, "node": str(f.node_id) if f.node_id else None, "paths": list(f.paths),
             "error": f.error, "message": recovery.describe(vm, f)} for f in vm.failed.values()]


def merges_json(
    vm: VirtualMachine, measure: Measure | None = None, held: Measure | None = None
) -> list[dict[str, Any]]:
    """`measure`: data bytes a merge copies; `held`: bytes a file occupies on disk."""
    out = []
    for node in sorted(vm.nodes.values(), key=lambda n: n.created_at):
        if node.kind is not NodeKind.HIDDEN:
            continue
        out.append(
            {
                "vm": vm.name,
                "node": str(node.id),
                "name": node.name,
                "dependents": len(children(vm.nodes, node.id)),
                "state": MERGE_STATE_JSON[node.merge_state or MergeState.PENDING],
                "blocked_by": blocked_by(vm, node),
                "bytes_held": sum(held(p) for p in node.layers.values()) if held else None,
                "merge_bytes": merge_bytes(vm, node, measure),
            }
        )
    return out


def children_map(vm: VirtualMachine) -> dict[UUID | None, list[Node]]:
    """The tree as the user made it (a flattened node stays under the node it came from)."""
    kids: dict[UUID | None, list[Node]] = {}
    for n in sorted(vm.nodes.values(), key=lambda n: n.created_at):
        up = logical_parent(vm.nodes, n)
        kids.setdefault(up.id if up is not None else None, []).append(n)
    return kids


def _id(node: Node | None) -> str | None:
    return str(node.id) if node is not None else None
