"""Read-only questions about a VM's tree: which node a name means, what runs, what is whose."""

from __future__ import annotations

from typing import TYPE_CHECKING
from uuid import UUID

from domain import names
from domain.errors import Refused, UnknownSnapshot
from domain.lifecycle import RunState
from domain.tree import MergeState, Node, NodeKind

if TYPE_CHECKING:
    from domain.lifecycle import RunRecord, RunRequest


class TreeQueries:
    if TYPE_CHECKING:
        name: str
        disks: dict[str, str]
        nodes: dict[UUID, Node]
        current: UUID
        names: dict[str, UUID]
        garbage: dict[str, int]
        run: RunRecord
        run_request: RunRequest | None

    def node(self, node_id: UUID) -> Node:
        return self.nodes[node_id]

    def snapshot_named(self, name: str) -> Node | None:
        node_id = self.names.get(names.normalize(name))
        return self.nodes[node_id] if node_id is not None else None

    def resolve_snapshot(self, ref: str) -> Node:
        """A visible snapshot by name, or by id."""
        found = self.snapshot_named(ref)
        if found is None:
            node = self._by_id(ref)
            if node is not None and node.kind is NodeKind.SNAPSHOT:
                found = node
            elif node is not None:
                raise Refused(f"node {ref} is {kind_phrase(node)}, not a snapshot")
        if found is None:
            raise UnknownSnapshot(f"VM {self.name!r} has no snapshot {ref!r}")
        return found

    def resolve_node(self, ref: str) -> Node:
        """A node id, a visible snapshot's name, or a hidden node's former name when unique."""
        node = self._by_id(ref) or self.snapshot_named(ref)
        if node is None:
            ref_nfc = names.normalize(ref)
            hidden = [n for n in self.nodes.values() if n.kind is NodeKind.HIDDEN and n.name == ref_nfc]
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

    def running_flatten(self) -> Node | None:
        for node in self.nodes.values():
            if node.flatten is MergeState.RUNNING:
                return node
        return None

    def may_run(self) -> bool:
        """Whether QEMU may be running, as far as the worker's reports go (or a start is asked)."""
        return self.run.state is not RunState.STOPPED or self.run_request is not None

    def files(self) -> set[str]:
        """Every file this VM's tree uses or still has to delete (layers, memory states)."""
        out = {p for n in self.nodes.values() for p in n.layers.values()}
        out |= {n.memory.path for n in self.nodes.values() if n.memory is not None and n.memory.path}
        out |= {n.nvram for n in self.nodes.values() if n.nvram}
        return out | set(self.garbage)


def kind_phrase(node: Node) -> str:
    return {
        NodeKind.CURRENT: "the current state",
        NodeKind.HIDDEN: "a hidden node",
        NodeKind.SNAPSHOT: "a snapshot",
    }[node.kind]
