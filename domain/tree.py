"""The snapshot tree as plain data, and the pure queries over it.

A node owns one layer file per disk. The tree here is the *physical* tree: a node's parent is the
node whose layers back its own. Visible snapshots, the current state and hidden (merge-pending)
nodes are all nodes; `kind` tells them apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, Iterator
from uuid import UUID

from domain.memory import Memory, QuiesceOutcome, Resume


class NodeKind(str, Enum):
    SNAPSHOT = "snapshot"
    CURRENT = "current"
    HIDDEN = "hidden"


class MergeState(str, Enum):
    PENDING = "pending"  # hidden with 2+ dependents: waits until it has one
    SCHEDULED = "scheduled"  # one dependent: the worker will merge it
    RUNNING = "running"  # the worker recorded its plan and is merging
    FAILED = "failed"  # the worker gave up; `merge VM NODE` retries


class MergeDirection(str, Enum):
    # Commit the dependent's data down into the hidden layer; the dependent takes that file over.
    COMMIT_DOWN = "commit-down"
    # Pull the hidden layer's data up into the dependent (safe rebase onto the grandparent).
    PULL_UP = "pull-up"


@dataclass
class MergePlan:
    """What the worker recorded before touching a file, so a crash resumes the same merge."""

    into: tuple[UUID, ...]  # the dependents that receive the data (one, or all for a forced merge)
    direction: MergeDirection
    bytes: int


@dataclass
class Node:
    id: UUID
    kind: NodeKind
    name: str | None
    parent: UUID | None
    created_at: datetime
    layers: dict[str, str]  # disk name -> absolute path of this node's layer file
    ready: bool = True  # False until the worker has created the layer files
    config: dict[str, object] = field(default_factory=dict)
    memory: Memory | None = None  # a snapshot's saved memory; None: never asked for
    restore: Resume | None = None  # a current state to restore from its snapshot's saved memory
    merge_state: MergeState | None = None  # hidden nodes only
    merge_forced: bool = False
    merge_plan: MergePlan | None = None
    merge_error: str | None = None
    created_seq: int = 0  # aggregate version that asked for this node's layer files
    merge_seq: int = 0  # aggregate version that scheduled this node's merge
    # Bounded chains (docs/semantics.md, "Chain depth"): a node whose layer was flattened onto
    # an older ancestor keeps the node it came from as `origin`; `parent` stays the backing.
    origin: UUID | None = None
    flatten: MergeState | None = None  # SCHEDULED | RUNNING while its layer is being flattened
    flatten_base: UUID | None = None  # the ancestor it is flattened onto (once RUNNING)
    flatten_bytes: int = 0
    flatten_seq: int = 0
    level: int = 0  # 0: a plain snapshot's layer; n: flattened over layers of level < n
    nvram: str | None = None  # a UEFI snapshot's copy of the variable store (taken with it)
    quiesce: QuiesceOutcome | None = None  # a snapshot of a running VM: how consistent its disks are
    quiesce_mode: str | None = None  # what its take asked for: auto | on | off
    clock: str | None = None  # a current state restored from memory: was the guest's clock reset
    nvram_from: str | None = None  # a current state applied from a UEFI snapshot: restore this first
    memory_seq: int = 0  # aggregate version that asked for this node's memory to be saved

    def __post_init__(self) -> None:
        # Aggregate snapshots of the first releases kept memory as a plain dict.
        legacy: Any = self.memory
        if isinstance(legacy, dict):
            if legacy.get("state") == "restore" and legacy.get("resume"):
                self.restore = Resume(str(legacy["resume"]))
            self.memory = Memory.from_legacy(legacy)

    @property
    def visible(self) -> bool:
        return self.kind is NodeKind.SNAPSHOT


def children(nodes: dict[UUID, Node], node_id: UUID) -> list[Node]:
    """Dependents of a node: every node whose layers use this node's layers as backing."""
    return [n for n in nodes.values() if n.parent == node_id]


def dependents_count(nodes: dict[UUID, Node]) -> dict[UUID, int]:
    """How many dependents each node has, in one pass over the tree."""
    counts: dict[UUID, int] = {}
    for n in nodes.values():
        if n.parent is not None:
            counts[n.parent] = counts.get(n.parent, 0) + 1
    return counts


def ancestors(nodes: dict[UUID, Node], node_id: UUID) -> Iterator[Node]:
    """The nodes above `node_id`, nearest first."""
    parent = nodes[node_id].parent
    while parent is not None:
        node = nodes[parent]
        yield node
        parent = node.parent


def descendants(nodes: dict[UUID, Node], node_id: UUID) -> list[Node]:
    """Every node whose reads go through `node_id`'s layers, deepest first (post-order)."""
    kids: dict[UUID | None, list[Node]] = {}
    for n in nodes.values():
        kids.setdefault(n.parent, []).append(n)
    return _post_order(kids, node_id)


def _post_order(kids: dict[UUID | None, list[Node]], node_id: UUID) -> list[Node]:
    """Every node below `node_id` in `kids`, deepest first, siblings oldest first."""
    out: list[Node] = []

    def walk(nid: UUID) -> None:
        for child in sorted(kids.get(nid, []), key=lambda n: n.created_at):
            walk(child.id)
            out.append(child)

    walk(node_id)
    return out


def root(nodes: dict[UUID, Node]) -> Node:
    return next(n for n in nodes.values() if n.parent is None)


def chain_depth(nodes: dict[UUID, Node], node_id: UUID) -> int:
    """How many layers a read of this node may go through below its own."""
    return sum(1 for _ in ancestors(nodes, node_id))


def logical_parent(nodes: dict[UUID, Node], node: Node) -> Node | None:
    """The node this one was taken or applied from (its backing, unless it was flattened)."""
    ref = node.origin if node.origin is not None and node.origin in nodes else node.parent
    return nodes[ref] if ref is not None else None


def logical_children(nodes: dict[UUID, Node], node_id: UUID) -> list[Node]:
    """The nodes taken or applied from this one (as the tree shows them)."""
    return [n for n in nodes.values() if (up := logical_parent(nodes, n)) is not None and up.id == node_id]


def logical_descendants(nodes: dict[UUID, Node], node_id: UUID) -> list[Node]:
    """Every node below `node_id` in the tree as the user made it, deepest first."""
    kids: dict[UUID | None, list[Node]] = {}
    for n in nodes.values():
        up = logical_parent(nodes, n)
        kids.setdefault(up.id if up is not None else None, []).append(n)
    return _post_order(kids, node_id)


def forget_origin(nodes: dict[UUID, Node], gone: Node) -> None:
    """A removed node is no one's origin any more: its own origin (or backing) takes its place."""
    heir = gone.origin if gone.origin is not None else gone.parent
    for n in nodes.values():
        if n.origin == gone.id:
            n.origin = heir if heir != n.parent else None


def logical_ancestors(nodes: dict[UUID, Node], node_id: UUID) -> Iterator[Node]:
    """The nodes above `node_id` as the user made them, nearest first."""
    node = logical_parent(nodes, nodes[node_id])
    seen: set[UUID] = set()
    while node is not None and node.id not in seen:
        seen.add(node.id)
        yield node
        node = logical_parent(nodes, node)
