"""The work of many queued takes of a stopped VM, done as one batch.

Takes queued faster than a worker creates overlays leave a run of pending items: create the
layers of node after node, each with its parent's memory request (which ends with the switch:
the VM does not run) and, past the chain limit, a flatten that an earlier flatten of the same
run may have made needless. Item by item that is one qemu-img process, two fsyncs and one commit
per take. Here the run is done together, in the same order: the overlays are made at once
(adapters/qemu/overlays.py: one barrier for all files), the needless flattens are cancelled, and
every report is saved in one commit, after the files are durable. A crash anywhere leaves what
item-by-item work leaves: files without records, which a retry finds in place and keeps.

Anything else — a running VM, an apply that restores memory, a flatten with work to do, a
failure — ends the run; the item then goes through `Drain.perform` as before.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from domain import commands as c
from domain.decisions import decide
from domain.memory import LiveSwitch
from domain.rules import flatten_base, max_chain_depth
from domain.tree import MergeState
from domain.work import WorkItem, WorkKind
from service.ports import EFFECT_ERRORS

if TYPE_CHECKING:
    from service.steps import Drain

MAX_BATCH = 256  # takes per batch: bounds one commit and one barrier


def run(d: Drain, items: list[WorkItem]) -> bool:
    """Do the leading run of `items` as one batch; False when it is not worth one (the caller
    then performs the first item alone)."""
    if items[0].kind is not WorkKind.CREATE_LAYERS or d.live() is not None:
        return False
    if sum(1 for i in items[:MAX_BATCH] if i.kind is WorkKind.CREATE_LAYERS) < 2:
        return False
    vm = trial = d.vm  # decided on in memory, saved at the end (evicted if it is not)
    cmds: list[c.Command] = []
    pairs: list[tuple[str, str]] = []
    created = 0
    for item in items:
        node = trial.nodes.get(item.node_id) if item.node_id is not None else None
        if node is None:
            break
        if item.kind is WorkKind.CREATE_LAYERS:
            if node.ready or node.restore is not None or node.parent is None or created >= MAX_BATCH:
                break
            parent = trial.nodes[node.parent]
            for disk, path in node.layers.items():
                d.w.data.check_owned(path)
                d.w.data.private_dir(os.path.dirname(path))
                pairs.append((path, parent.layers[disk]))
            d.nvram(node, parent)
            cmd: c.Command = c.RecordLayersCreated(vm.name, node.id, LiveSwitch(not_running=True))
            created += 1
        elif item.kind is WorkKind.SAVE_MEMORY:
            if node.memory is not None and node.memory.pending:
                break  # still asked for after the reports so far: not this batch's to end
            continue
        elif item.kind is WorkKind.FLATTEN and node.flatten is MergeState.SCHEDULED:
            if flatten_base(trial.nodes, node.id, max_chain_depth(trial.nodes[trial.current].config)) is not None:
                break  # real work: done on its own, after this batch
            cmd = c.RecordFlattenCancelled(vm.name, node.id, "the chain is short enough now")
        else:
            break
        _, trial = decide(cmd, trial, d.w.app.layout)
        cmds.append(cmd)
    try:
        d.w.disks.create_overlays(pairs)
    except (*EFFECT_ERRORS, OSError):
        d.w.app._evict(vm.id)  # forget the decisions: item by item instead, with retries and
        d.vm = d.w.app.get_vm(vm.name)  # the failure recorded where it belongs
        return False
    except BaseException:
        d.w.app._evict(vm.id)
        raise
    d.vm = d.w.app.decide_all(cmds, vm, decided=trial).vm
    return True
