"""The tree of one VM as the stable JSON of DESIGN §3b (`tree VM --json`, `merges --json`).

Pure functions of the aggregate; the caller passes `measure(path) -> bytes allocated on disk`
when the output should say how many bytes hidden nodes hold and merges would move.
"""

from __future__ import annotations

from typing import Any, Callable
from uuid import UUID

from domain.tree import MergeState, Node, NodeKind, chain_depth, children
from domain.vm import VirtualMachine

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
    held = sum(measure(p) for p in node.layers.values())
    if len(deps) != 1:
        return held * len(deps)  # what `merge --force` would pull up into each dependent
    dep_bytes = sum(measure(p) for p in deps[0].layers.values())
    return dep_bytes if node.parent is None else min(dep_bytes, held)


def node_json(vm: VirtualMachine, node: Node, measure: Measure | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": str(node.id),
        "name": None if node.kind is NodeKind.CURRENT else node.name,
        "kind": node.kind.value,
        "parent": str(node.parent) if node.parent else None,
        "created_at": node.created_at.isoformat().replace("+00:00", "Z"),
        "disks": dict(node.layers),
        "ready": node.ready,
    }
    if node.kind is not NodeKind.HIDDEN:
        out["memory"] = memory_json(node)
    if node.kind is NodeKind.CURRENT:
        out["chain_depth"] = chain_depth(vm.nodes, node.id)
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


def memory_json(node: Node) -> dict[str, Any]:
    mem = node.memory or {}
    state = mem.get("state", "none")
    return {
        "state": state if state in ("none", "saving", "saved", "failed") else "none",
        "method": mem.get("method"),
        "bytes": mem.get("bytes"),
        "path": mem.get("path"),
        "pause_ms": mem.get("pause_ms"),
    }


def tree_json(vm: VirtualMachine, measure: Measure | None = None) -> dict[str, Any]:
    nodes = sorted(vm.nodes.values(), key=lambda n: (n.created_at, str(n.id)))
    return {
        "vm": vm.name,
        "current": str(vm.current),
        "nodes": [node_json(vm, n, measure) for n in nodes],
    }


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
    kids: dict[UUID | None, list[Node]] = {}
    for n in sorted(vm.nodes.values(), key=lambda n: n.created_at):
        kids.setdefault(n.parent, []).append(n)
    return kids
