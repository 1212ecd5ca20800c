"""A snapshot's layer flattened onto an older ancestor, so the current state reads shallow.

The domain asks for it when the current state's chain passes the VM's `max_chain_depth`
(domain/rules.py). The plan (the base, chosen from the tree as it is when the work starts) is
recorded before a file is touched. Offline it is a safe `qemu-img rebase` of the snapshot's layer
onto the base's: every cluster the skipped layers held is copied into it, so it, and every layer
above it, reads exactly what it read before. A layer open in the running QEMU is streamed by a
block job instead, while the guest runs. Re-running any step is harmless.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapters.config import durable
from domain import commands as c
from domain.rules import flatten_base, max_chain_depth
from domain.tree import MergeState, Node, ancestors
from service.merging import in_running_chain, rebase_keeping_data, refuse_damaged

if TYPE_CHECKING:
    from service.steps import Drain


def flatten(d: Drain, node: Node) -> None:
    """Plan (once), copy, record; a failure is raised to the caller, which records it."""
    vm = d.vm
    resuming = node.flatten is MergeState.RUNNING
    if node.flatten is MergeState.SCHEDULED:
        base = flatten_base(vm.nodes, node.id, max_chain_depth(vm.nodes[vm.current].config))
        if base is None:
            d.report(c.RecordFlattenCancelled(vm.name, node.id, "the chain is short enough now"))
            return
        skipped = _skipped(d, node, base.id)
        size = d.w.disks.allocated_bytes
        d.report(c.RecordFlattenStarted(vm.name, node.id, base.id,
                                        sum(size(p) for n in skipped for p in n.layers.values())))
        node = d.vm.nodes[node.id]
    assert node.flatten_base is not None
    _check(d, node, node.flatten_base)
    durable(d.w.app)
    _copy(d, node, d.vm.nodes[node.flatten_base], resuming)
    d.report(c.RecordFlattenCompleted(d.vm.name, node.id))


def _skipped(d: Drain, node: Node, base_id: object) -> list[Node]:
    """The layers between the base and the node: what the flatten copies from."""
    out = []
    for above in ancestors(d.vm.nodes, node.id):
        if above.id == base_id:
            return out
        out.append(above)
    raise AssertionError(f"node {base_id} is not above node {node.id}")


def _check(d: Drain, node: Node, base_id: object) -> None:
    """The file written lies in the data directory; nothing read or written is damaged."""
    for path in node.layers.values():
        d.w.data.check_owned(path)
    refuse_damaged(d, [node, *_skipped(d, node, base_id)], "flattened")


def _copy(d: Drain, node: Node, base: Node, resuming: bool) -> None:
    vm = d.vm
    live = d.live()
    what = f"flatten {node.name or node.id}"
    names = list(node.layers)
    assert node.parent is not None
    for i, disk in enumerate(names):

        def step(fraction: float, i: int = i) -> None:
            d.progress(what, (i + fraction) / len(names))

        path, target = node.layers[disk], base.layers[disk]
        if live is not None and in_running_chain(vm, node):
            live.stream_online(disk, path, target, step)
        else:
            rebase_keeping_data(d, path, vm.nodes[node.parent].layers[disk], target, step, resuming)
    d.progress(what, 1.0)
