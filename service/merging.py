"""A hidden node's merge, performed: plan, record the plan, move the data, record the outcome.

The plan (direction and bytes, domain.rules.choose_merge) is recorded as an event before any
file is touched, so a crash resumes the same merge. Offline it is `qemu-img commit` (commit the
dependent down; it takes the file over) or a safe `qemu-img rebase` (pull the hidden layer up);
a dependent in the running VM's chain is merged by a QEMU block job while the guest runs. Every
step checks the backing file on disk first, so re-running it is harmless.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

from adapters.config import durable
from adapters.qemu.errors import QemuImgError
from domain import commands as c
from domain.rules import choose_merge
from domain.tree import MergeDirection, MergeState, Node, ancestors, children
from domain.vm import VirtualMachine
from service.ports import DamagedLayer

if TYPE_CHECKING:
    from service.steps import Drain

Fraction = Callable[[float], None]


def merge(d: Drain, node: Node) -> None:
    """Plan (once), move the data, record the outcome; a failure is raised to the caller, which
    records it on the node (service/steps.py)."""
    _check_files(d, node)
    _check_not_damaged(d, node)
    # A RUNNING merge was started by a worker that died (or failed half way): no file state can
    # be trusted.
    resuming = node.merge_state is MergeState.RUNNING
    if node.merge_state is MergeState.SCHEDULED:
        d.report(plan(d, node))
        node = d.vm.nodes[node.id]
    durable(d.w.app)
    _execute(d, node, resuming)
    d.report(c.RecordMergeCompleted(d.vm.name, node.id))


def _check_files(d: Drain, node: Node) -> None:
    """Every file a merge writes or frees lies in the data directory (or is an own disk)."""
    vm = d.vm
    touched = [node, *children(vm.nodes, node.id)]
    touched += [k for dep in touched[1:] for k in children(vm.nodes, dep.id)]
    for n in touched:
        for path in n.layers.values():
            if not vm.is_own_disk(path):
                d.w.data.check_owned(path)


def _check_not_damaged(d: Drain, node: Node) -> None:
    refuse_damaged(d, [node, *children(d.vm.nodes, node.id)], "merged")


def refuse_damaged(d: Drain, nodes: list[Node], verb: str) -> None:
    """Never move data out of or into what is damaged: every layer read or written passes
    `qemu-img check` first (leaked clusters are harmless: they never change what an image reads).
    The layers the running VM has open are skipped: QEMU holds them, and a check of them could
    not be exact."""
    vm = d.vm
    live = d.live()
    layers = [(disk, path) for n in nodes
              if live is None or not in_running_chain(vm, n)  # open in QEMU: its own checks apply
              for disk, path in n.layers.items()]
    for (disk, path), problem in zip(layers, _checked(d, [path for _, path in layers])):
        if problem is not None and problem[0] != "leaks":
            raise DamagedLayer(
                f"layer {path} (disk {disk}) is damaged ({problem[1]}); nothing was {verb},"
                f" the files are untouched; `snaptree audit verify {vm.name}` shows it"
            )


def _checked(d: Drain, paths: list[str]) -> list[tuple[str, str] | None]:
    """`Disks.check` of every path, side by side: each is a `qemu-img check` process."""
    if len(paths) < 2:
        return [d.w.disks.check(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(len(paths), 4)) as pool:
        return list(pool.map(d.w.disks.check, paths))


def plan(d: Drain, node: Node) -> c.RecordMergeStarted:
    vm = d.vm
    deps = sorted(children(vm.nodes, node.id), key=lambda n: str(n.id))
    size = d.w.disks.allocated_bytes
    choice = choose_merge(
        held=sum(size(p) for p in node.layers.values()),
        dependent_bytes=[sum(size(p) for p in dep.layers.values()) for dep in deps],
        root=node.parent is None,
    )
    if choice is None:
        raise QemuImgError(["plan"], 1, "no merge direction is allowed", what="merge plan")
    return c.RecordMergeStarted(vm.name, node.id, tuple(dep.id for dep in deps), choice.direction, choice.bytes)


def _execute(d: Drain, node: Node, resuming: bool) -> None:
    plan = node.merge_plan
    assert plan is not None
    vm = d.vm
    what = f"merge {node.name or node.id} ({plan.direction.value})"
    disks = list(node.layers)
    live = d.live()
    for i, disk in enumerate(disks):

        def step(fraction: float, i: int = i) -> None:
            d.progress(what, (i + fraction) / len(disks))

        for dep_id in plan.into:
            dep = vm.nodes[dep_id]
            if live is not None and in_running_chain(vm, dep):
                _online(d, node, dep, plan.direction, disk, step)
            elif plan.direction is MergeDirection.COMMIT_DOWN:
                _commit_down(d, node, dep, disk, step, resuming)
            else:
                _pull_up(d, node, dep, disk, step, resuming)
    d.progress(what, 1.0)


def in_running_chain(vm: VirtualMachine, node: Node) -> bool:
    """Whether `node`'s layers are open in the running QEMU (the current state or below it)."""
    return node.id == vm.current or any(a.id == node.id for a in ancestors(vm.nodes, vm.current))


def _online(d: Drain, hidden: Node, dep: Node, direction: MergeDirection, disk: str, step: Fraction) -> None:
    live = d.live()
    assert live is not None
    top, target = dep.layers[disk], hidden.layers[disk]
    if direction is MergeDirection.COMMIT_DOWN:
        live.commit_online(disk, top, target, step)
        _repoint_children(d, dep, target, disk)
    else:
        assert hidden.parent is not None
        live.stream_online(disk, top, d.vm.nodes[hidden.parent].layers[disk], step)


def _commit_down(d: Drain, node: Node, dep: Node, disk: str, step: Fraction, resuming: bool) -> None:
    disks = d.w.disks
    target, top = node.layers[disk], dep.layers[disk]
    if disks.backing_file(top) != target:
        raise QemuImgError(["check"], 1, f"{top} is not backed by {target}", what="merge check")
    if resuming:
        disks.repair_leaks(target)  # a killed commit may have left unused clusters
    # Writing the same data again is harmless, so a crash anywhere here just re-runs it.
    disks.commit(top, step)
    _repoint_children(d, dep, target, disk)


def _repoint_children(d: Drain, dep: Node, target: str, disk: str) -> None:
    for child in children(d.vm.nodes, dep.id):
        path = child.layers[disk]
        if child.ready and d.w.disks.backing_file(path) != target:
            d.w.disks.rebase_unsafe(path, target)  # same data below: metadata only


def _pull_up(d: Drain, node: Node, dep: Node, disk: str, step: Fraction, resuming: bool) -> None:
    assert node.parent is not None, "the VM's own disk is never pulled up"
    rebase_keeping_data(d, dep.layers[disk], node.layers[disk], d.vm.nodes[node.parent].layers[disk],
                        step, resuming)


def rebase_keeping_data(d: Drain, path: str, old: str, new: str, step: Fraction, resuming: bool) -> None:
    """Back `path` by `new` (an ancestor of `old`), copying in what the layers between held, so it
    reads exactly as before. qemu-img rewrites the header before it has flushed the copied data,
    so a header that already names `new` proves nothing: put `old` back under it (its file still
    exists until the step is recorded) and copy again."""
    disks = d.w.disks
    if disks.backing_file(path) == new:
        disks.rebase_unsafe(path, old)
    if resuming:
        disks.repair_leaks(path)
    disks.rebase_safe(path, new, step)
