"""The rules of DESIGN §1 that decide what happens to a hidden node, in one place.

A deleted snapshot becomes hidden; what then happens to it depends only on how many dependents
(nodes whose layers use its layers as backing) it has:

- 0 dependents: its layer files are deleted and the node is gone;
- 1 dependent: its layers are merged with the dependent's (the worker does it) and the node is gone;
- 2+ dependents: it waits, hidden and merge-pending, until the count drops.

Deleting, applying and merging change the dependents of hidden ancestors, so the rule is applied
again after every change until nothing moves (the cascade).
"""

from __future__ import annotations

from enum import Enum
from uuid import UUID

from domain.tree import MergeState, Node, NodeKind, dependents_count


class Outcome(str, Enum):
    REMOVE = "remove"
    MERGE = "merge"
    WAIT = "wait"


def outcome_for(dependents: int) -> Outcome:
    """The 0 / 1 / 2+ dependents rule."""
    if dependents == 0:
        return Outcome.REMOVE
    if dependents == 1:
        return Outcome.MERGE
    return Outcome.WAIT


def next_follow_up(nodes: dict[UUID, Node]) -> tuple[Node, Outcome] | None:
    """The first hidden node whose state no longer matches its dependents, and what it needs.

    A merge the worker has started (RUNNING) is left alone: commands that could change its
    dependents are refused while it runs. A forced merge keeps its schedule with 2+ dependents;
    an unforced one that has 2+ dependents again goes back to waiting.
    """
    hidden = [n for n in nodes.values() if n.kind is NodeKind.HIDDEN]
    if not hidden:
        return None
    counts = dependents_count(nodes)
    for node in sorted(hidden, key=lambda n: n.created_at):
        if node.merge_state is MergeState.RUNNING:
            continue
        wanted = outcome_for(counts.get(node.id, 0))
        if wanted is Outcome.REMOVE:
            return node, wanted
        if wanted is Outcome.MERGE and node.merge_state in (MergeState.PENDING, None):
            return node, wanted
        if wanted is Outcome.WAIT and node.merge_state is MergeState.SCHEDULED and not node.merge_forced:
            return node, wanted  # a forced pull-up below gave it a second dependent again
    return None
