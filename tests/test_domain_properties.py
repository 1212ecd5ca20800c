"""Property tests of the pure domain: random command sequences against every invariant of docs/semantics.md.

A hypothesis state machine drives one `VirtualMachine` aggregate with take (disks only or live,
with memory) / apply / delete / delete --subtree / rename / revert / merge [--force] / guest writes,
and a simulated worker (`domain_sim.Worker`) that performs only some of the pending work at a time,
so commands also run while overlays, memory saves, merges and file removals are outstanding (and
while a merge is RUNNING). The tree invariants are checked after every step and after every single
work item; `--hypothesis-show-statistics` shows what the runs covered.

The worker performs items strictly in `pending_work` order and fails the run (`OutOfOrder`) when an
item needs layer files that were not created yet, or (`Stuck`) when a merge can be done no way the
domain accepts.
"""

from __future__ import annotations

import copy
import os
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.domain import Snapshot
from hypothesis import HealthCheck, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from adapters.transcoder import packb, unpackb
from domain.lifecycle import RunAction
from domain.memory import MemoryState
from domain.errors import Conflict, NameTaken, Refused, UnknownSnapshot
from domain.tree import MergeState, Node, NodeKind, ancestors, chain_depth, children
from domain.vm import VirtualMachine
from domain.work import WorkKind, is_idle, pending_work
from domain_sim import (
    DISKS,
    OWN_DISKS,
    Directions,
    Worker,
    layer_paths,
    memory_path,
    new_vm,
    settle,
)

NAMES = st.sampled_from(["a", "b", "c", "d", "e", "f"])
INDEX = st.integers(min_value=0, max_value=63)


# --- event round trip ---


def roundtrip(event: Any) -> Any:
    """The event as the store would give it back: its state through msgpack, then rebuilt."""
    state = unpackb(packb(dict(event.__dict__)))
    copy_ = object.__new__(type(event))
    copy_.__dict__.update(state)
    return copy_


def replay(events: list[Any]) -> VirtualMachine:
    vm = None
    for e in events:
        vm = roundtrip(e).mutate(vm)
    assert isinstance(vm, VirtualMachine)
    return vm


def same_state(a: VirtualMachine, b: VirtualMachine) -> None:
    assert a.id == b.id and a.version == b.version
    assert (a.name, a.host, a.disks, a.config) == (b.name, b.host, b.disks, b.config)
    assert a.nodes == b.nodes
    assert a.current == b.current
    assert a.garbage == b.garbage
    assert getattr(a, "names", None) == getattr(b, "names", None)


# --- the machine ---


def ordered(nodes: list[Node]) -> list[Node]:
    """A stable order across replays (ids are random): creation time, then name."""
    return sorted(nodes, key=lambda n: (n.created_at, n.name or ""))


class SnapshotTree(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.vm = new_vm()
        # the tree invariants hold after every single work item, not only after each step
        self.worker = Worker(self.vm, layer_paths, "commit-down", after_each=self.check_between_items)
        self.content = self.worker.content
        self.log = list(self.vm.collect_events())
        # what every visible snapshot and the current state must read (the model's promise)
        self.expected: dict[UUID, dict[str, dict[int, str]]] = {}
        self.expected_current = self.content.read(self.vm, self.vm.current)
        self.patterns = 0
        self.fresh = 0

    @initialize(
        policy=st.sampled_from(["commit-down", "pull-up", "alternate"]),
        start=st.lists(st.tuples(INDEX, st.booleans(), st.booleans()), min_size=0, max_size=6),
        base=st.booleans(),
        deletes=st.lists(INDEX, max_size=3),
        forks=st.lists(st.tuples(INDEX, st.booleans(), st.booleans()), max_size=2),
    )
    def start_with_a_tree(
        self, policy: str, start: list[tuple[int, bool, bool]], base: bool,
        deletes: list[int], forks: list[tuple[int, bool, bool]],
    ) -> None:
        """A random tree to start from: snapshots a, b, c... each taken after an optional apply and
        optional guest writes (overlapping offsets, so merges must keep the upper layer's data on
        top); each of `forks` gets a second dependent and is deleted (2+: it waits), its merge
        maybe forced, its parent maybe deleted too; then a few snapshots are deleted.

        With `base`, a snapshot "base" (the root, holding the VM's own disk) comes first and the
        others are taken below it, so that the hidden nodes are not all the root.
        """
        self.worker.directions = Directions(policy)
        note(f"merge policy: {policy}")
        if base:
            self.take("base")
        for k, (i, apply_first, write) in enumerate(start):
            candidates = [n for n in self.visible if n.name != "base"]
            if apply_first and candidates:
                self.vm.apply_snapshot(candidates[i % len(candidates)].name or "", layer_paths)
                self.expected_current = copy.deepcopy(self.expected[candidates[i % len(candidates)].id])
                self.done()
            if write:
                self._work(None)
                self.write("disk0", 0)  # every layer holds offset 0: merges must keep the top
                self.write("disk1", k % 2)
            self.take("abcdef"[k])
        for i, force, parent_too in forks:  # 2 dependents, then deleted: a hidden node that waits
            if not self.visible or self.vm.running_merge() is not None:
                break
            fork = self.visible[i % len(self.visible)]
            self.vm.apply_snapshot(str(fork.id), layer_paths)
            self.expected_current = copy.deepcopy(self.expected[fork.id])
            self.done()
            self.take(None)
            self.vm.apply_snapshot(str(fork.id), layer_paths)
            self.expected_current = copy.deepcopy(self.expected[fork.id])
            self.done()
            self.delete(self.visible.index(fork), subtree=False, by_id=True)
            if force:
                self.merge(self.hidden.index(self.vm.nodes[fork.id]), force=True)
            parent = self.vm.nodes[fork.id].parent
            if parent_too and parent is not None and self.vm.nodes[parent].kind is NodeKind.SNAPSHOT:
                self.delete(self.visible.index(self.vm.nodes[parent]), subtree=False, by_id=True)
        for i in deletes:
            self.delete(i, subtree=False, by_id=False)

    # helpers

    @property
    def visible(self) -> list[Node]:
        return ordered([n for n in self.vm.nodes.values() if n.kind is NodeKind.SNAPSHOT])

    @property
    def hidden(self) -> list[Node]:
        return ordered([n for n in self.vm.nodes.values() if n.kind is NodeKind.HIDDEN])

    def refused(self, exc: type[Exception], call: Any) -> None:
        nodes, current, garbage = copy.deepcopy(self.vm.nodes), self.vm.current, dict(self.vm.garbage)
        with pytest.raises(exc):
            call()
        assert len(self.vm.pending_events) == 0, "a refused command recorded events"
        assert self.vm.nodes == nodes and self.vm.current == current and self.vm.garbage == garbage

    def done(self) -> None:
        for e in self.vm.pending_events:
            label = type(e).__name__
            if isinstance(e, VirtualMachine.MergeStarted):
                label += f" into {len(e.into)}"
            elif isinstance(e, VirtualMachine.SnapshotApplied) and e.resume:
                label += " (restores memory)"
            event(f"recorded {label}")
        self.log.extend(self.vm.collect_events())

    def read(self, node_id: UUID) -> dict[str, dict[int, str]]:
        return self.content.read(self.vm, node_id)

    # commands

    def restoring(self) -> bool:
        return self.vm.nodes[self.vm.current].restore is not None

    def switch_outstanding(self) -> bool:
        """A take of a VM that may run whose switch to the new overlay has not happened yet."""
        current = self.vm.nodes[self.vm.current]
        return not current.ready and current.parent is not None and self.vm.may_run()

    @rule(paused=st.booleans())
    def start(self, paused: bool) -> None:
        """`vm start`: the worker starts QEMU on the current state (after the work before it)."""
        self.vm.request_run(RunAction.START, paused=paused)
        self.done()

    @rule()
    def stop(self) -> None:
        self.vm.request_run(RunAction.STOP)
        self.done()

    @rule(name=st.one_of(NAMES, st.none()), live=st.booleans())
    def take(self, name: str | None, live: bool = False) -> None:
        if name is None:  # a fresh name
            self.fresh += 1
            name = f"n{self.fresh}"
        mem = memory_path(self.vm.current) if live else None
        call = lambda: self.vm.take_snapshot(name, layer_paths, mem)  # noqa: E731
        if any(n.name == name for n in self.visible):
            self.refused(NameTaken, call)
            return
        if self.restoring():
            event("take refused: the current state is still being restored")
            self.refused(Conflict, call)
            return
        before = copy.deepcopy(self.expected_current)
        sid = call()
        self.expected[sid] = before
        self.expected_current = copy.deepcopy(before)
        self.done()

    @rule(i=INDEX)
    def apply(self, i: int) -> None:
        if not self.visible:
            return
        snap = self.visible[i % len(self.visible)]
        if self.vm.running_merge() is not None or self.switch_outstanding():
            event("apply refused: a merge is running or a live take has not switched")
            self.refused(Conflict, lambda: self.vm.apply_snapshot(snap.name or "", layer_paths))
            return
        self.vm.apply_snapshot(snap.name or "", layer_paths)
        self.expected_current = copy.deepcopy(self.expected[snap.id])
        self.done()

    @rule()
    def revert(self) -> None:
        target = next((n for n in ancestors(self.vm.nodes, self.vm.current) if n.kind is NodeKind.SNAPSHOT), None)
        if target is None:
            self.refused(Refused, lambda: self.vm.revert(layer_paths))
            return
        if self.vm.running_merge() is not None or self.switch_outstanding():
            self.refused(Conflict, lambda: self.vm.revert(layer_paths))
            return
        if any(n.kind is NodeKind.HIDDEN for n in ancestors(self.vm.nodes, self.vm.current)):
            event("revert skips a hidden node")
        self.vm.revert(layer_paths)
        assert self.vm.nodes[self.vm.current].parent == target.id
        self.expected_current = copy.deepcopy(self.expected[target.id])
        self.done()

    @rule(i=INDEX, subtree=st.booleans(), by_id=st.booleans())
    def delete(self, i: int, subtree: bool, by_id: bool) -> None:
        if not self.visible:
            return
        snap = self.visible[i % len(self.visible)]
        ref = str(snap.id) if by_id else snap.name or ""
        if self.vm.running_merge() is not None:
            event("delete refused: a merge is running")
            self.refused(Conflict, lambda: self.vm.delete_snapshot(ref, subtree=subtree))
            return
        if subtree and snap.id in {a.id for a in ancestors(self.vm.nodes, self.vm.current)}:
            event("delete --subtree above the current state")
        below = {n.id for n in self.vm.nodes.values() if n.kind is NodeKind.SNAPSHOT
                 and snap.id in {a.id for a in ancestors(self.vm.nodes, n.id)}}
        current = self.vm.current
        deleted = self.vm.delete_snapshot(ref, subtree=subtree)
        assert set(deleted) == ({snap.id} | below if subtree else {snap.id})
        assert self.vm.current == current  # the current state is never deleted
        for d in deleted:
            self.expected.pop(d)
        for e in self.vm.pending_events:
            event(f"delete records {type(e).__name__}")
        self.done()

    @rule(i=INDEX, name=NAMES)
    def rename(self, i: int, name: str) -> None:
        if not self.visible:
            return
        snap = self.visible[i % len(self.visible)]
        if any(n.name == name and n.id != snap.id for n in self.visible):
            self.refused(NameTaken, lambda: self.vm.rename_snapshot(snap.name or "", name))
            return
        self.vm.rename_snapshot(snap.name or "", name)
        assert self.vm.nodes[snap.id].name == name
        self.done()

    @rule(i=INDEX, force=st.booleans())
    def merge(self, i: int, force: bool) -> None:
        if not self.hidden:
            return
        node = self.hidden[i % len(self.hidden)]
        ndeps = len(children(self.vm.nodes, node.id))
        event(f"merge rule: {ndeps if ndeps < 2 else '2+'} dependents, force={force}, "
              f"root={node.parent is None}, {node.merge_state.value if node.merge_state else None}")
        call = lambda: self.vm.merge(str(node.id), force=force)  # noqa: E731
        if node.merge_state is MergeState.RUNNING:
            self.refused(Conflict, call)
        elif ndeps >= 2 and not force:
            self.refused(Refused, call)
        elif ndeps >= 2 and node.parent is None:
            self.refused(Refused, call)  # would delete the VM's own disk
        elif node.merge_state is MergeState.SCHEDULED and node.merge_forced == (ndeps >= 2):
            assert call() == node.id  # already asked for: nothing new
            assert len(self.vm.pending_events) == 0
        elif any(a.merge_state in (MergeState.SCHEDULED, MergeState.RUNNING)
                 for a in ancestors(self.vm.nodes, node.id)):
            event("merge refused: a merge above is outstanding")
            self.refused(Conflict, call)  # that merge may re-parent it or hand it the own disk
        else:
            assert call() == node.id
            assert self.vm.nodes[node.id].merge_state is MergeState.SCHEDULED
            if ndeps >= 2:
                event("forced merge with 2+ dependents scheduled")
            self.done()

    @rule(i=INDEX)
    def refused_on_hidden(self, i: int) -> None:
        """apply / delete / rename of a hidden node (by id) are refused."""
        if not self.hidden:
            return
        ref = str(self.hidden[i % len(self.hidden)].id)
        self.refused(Refused, lambda: self.vm.apply_snapshot(ref, layer_paths))
        self.refused(Refused, lambda: self.vm.delete_snapshot(ref))
        self.refused(Refused, lambda: self.vm.rename_snapshot(ref, "zz"))
        self.refused(UnknownSnapshot, lambda: self.vm.apply_snapshot("never-taken", layer_paths))

    @rule(disk=st.sampled_from(DISKS), offset=st.integers(0, 3))
    def write(self, disk: str, offset: int) -> None:
        if not self.vm.nodes[self.vm.current].ready:
            return  # the VM cannot run before its overlay exists
        self.patterns += 1
        pattern = f"w{self.patterns}"
        self.content.write(self.vm, disk, offset, pattern)
        self.expected_current[disk][offset] = pattern

    # the worker

    def _work(self, limit: int | None, leave_running: bool = False) -> None:
        reordered, performed = self.worker.reordered, len(self.worker.done)
        try:
            self.worker.settle(limit, leave_running=leave_running)
        finally:
            self.done()
        for kind, _, detail in self.worker.done[performed:]:
            if kind == "merge":
                event(f"merge {detail}")
        if self.vm.running_merge() is not None:
            event("a merge is left running")
        assert self.worker.reordered == reordered

    @rule(k=st.integers(1, 4), leave_running=st.booleans())
    def settle_some(self, k: int, leave_running: bool) -> None:
        self._work(k, leave_running)

    @rule()
    def start_a_merge(self) -> None:
        """Work until the next item is a merge, then only start it: it stays RUNNING."""
        try:
            while (items := pending_work(self.vm)) and not (
                items[0].kind is WorkKind.MERGE
                and self.vm.nodes[items[0].node_id].merge_state is MergeState.SCHEDULED
            ):
                if self.vm.running_merge() is not None:
                    break
                self.worker.perform(items[0])
            if items and self.vm.running_merge() is None:
                self.worker.perform(items[0], start_only=True)
                event("a merge is left running")
        finally:
            self.done()

    @rule()
    def settle_all(self) -> None:
        self._work(None)
        assert is_idle(self.vm)

    # invariants

    def check_between_items(self) -> None:
        self.tree_is_well_formed()
        self.every_layer_file_has_one_owner()
        self.nothing_visible_reads_differently()

    @invariant()
    def tree_is_well_formed(self) -> None:
        vm, nodes = self.vm, self.vm.nodes
        roots = [n for n in nodes.values() if n.parent is None]
        assert len(roots) == 1, "exactly one root"
        currents = [n for n in nodes.values() if n.kind is NodeKind.CURRENT]
        assert [n.id for n in currents] == [vm.current], "exactly one current state"
        assert children(nodes, vm.current) == [], "nothing is backed by the current state"
        for n in nodes.values():
            assert n.parent is None or n.parent in nodes, "each node's parent exists"
            assert chain_depth(nodes, n.id) < len(nodes), "no cycle"
            assert set(n.layers) == set(vm.disks), "one layer per disk"
            if n.kind is NodeKind.HIDDEN:
                assert n.merge_state is not None
                ndeps = len(children(nodes, n.id))
                assert ndeps >= 1, "a hidden node without dependents is removed at once"
                if n.merge_state is MergeState.PENDING:
                    event("a hidden node waits with 2+ dependents")
                    assert ndeps >= 2, "a pending merge with one dependent is scheduled at once"
                if n.merge_state is MergeState.SCHEDULED and not n.merge_forced:
                    assert ndeps == 1, "an unforced merge with 2+ dependents waits"
            else:
                assert n.merge_state is None
        names = [n.name for n in nodes.values() if n.kind is NodeKind.SNAPSHOT]
        assert len(names) == len(set(names)), "visible names are unique"
        for n in nodes.values():
            if n.kind is NodeKind.SNAPSHOT:
                assert n.name is not None and vm.resolve_snapshot(n.name) is n, "a name finds its snapshot"
        running = [n for n in nodes.values() if n.merge_state is MergeState.RUNNING]
        assert len(running) <= 1

    @invariant()
    def every_layer_file_has_one_owner(self) -> None:
        vm = self.vm
        paths = [p for n in vm.nodes.values() for p in n.layers.values()]
        assert len(paths) == len(set(paths)), "a layer file belongs to exactly one node"
        root = next(n for n in vm.nodes.values() if n.parent is None)
        assert root.layers == OWN_DISKS, "the root holds the VM's own disks"
        for n in vm.nodes.values():
            if n is not root:
                assert not set(n.layers.values()) & set(OWN_DISKS.values()), "own disks only at the root"
        assert not set(vm.garbage) & set(paths), "garbage is used by no node"
        assert not set(vm.garbage) & set(OWN_DISKS.values()), "the own disks are never garbage"
        existing = self.content.existing()
        assert existing <= set(paths) | set(vm.garbage), "no orphan file"
        states = [n.memory.path for n in vm.nodes.values() if n.memory is not None and n.memory.path]
        assert len(states) == len(set(states)), "a memory file belongs to exactly one snapshot"
        assert not set(states) & set(paths)
        for n in vm.nodes.values():
            if n.kind is not NodeKind.SNAPSHOT:
                assert n.memory is None or n.memory.path is None, "only snapshots own a memory file"
        assert self.content.memory <= set(states) | set(vm.garbage), "no orphan memory file"
        for n in vm.nodes.values():
            layers = set(n.layers.values())
            if n.ready:
                assert layers <= existing, "no missing file"
            else:
                assert not layers & existing

    @invariant()
    def nothing_visible_reads_differently(self) -> None:
        visible = {n.id for n in self.vm.nodes.values() if n.kind is NodeKind.SNAPSHOT}
        assert visible == set(self.expected)
        for sid in visible:
            assert self.read(sid) == self.expected[sid], f"snapshot {self.vm.nodes[sid].name} changed"
        assert self.read(self.vm.current) == self.expected_current, "the current state changed"

    @invariant()
    def once_settled(self) -> None:
        vm = self.vm
        if not is_idle(vm):
            return
        event("idle")
        nodes = vm.nodes
        for n in nodes.values():
            assert n.ready
            if n.kind is NodeKind.HIDDEN:
                assert len(children(nodes, n.id)) >= 2, "idle: no hidden node with < 2 dependents"
        above = list(ancestors(nodes, vm.current))
        visible = sum(1 for n in above if n.kind is NodeKind.SNAPSHOT)
        hidden2 = sum(1 for n in above if n.kind is NodeKind.HIDDEN and len(children(nodes, n.id)) >= 2)
        assert chain_depth(nodes, vm.current) == visible + hidden2
        assert vm.garbage == {}
        assert self.content.existing() == {p for n in nodes.values() for p in n.layers.values()}
        saved = {n.memory.path for n in nodes.values()
                 if n.memory is not None and n.memory.state is MemoryState.SAVED}
        assert self.content.memory == saved, "idle: a memory file for each saved snapshot, no other"
        assert self.worker.memory_failures == 0
        if not any(n.kind is NodeKind.SNAPSHOT for n in nodes.values()) and not self.hidden:
            assert list(nodes) == [vm.current] and nodes[vm.current].layers == OWN_DISKS

    def teardown(self) -> None:
        self.done()
        if len(self.log) > 1:
            same_state(replay(self.log), self.vm)


SnapshotTree.TestCase.settings = settings(
    # a longer hunt: SNAPTREE_PROPERTY_EXAMPLES=5000 pytest tests/test_domain_properties.py
    max_examples=int(os.environ.get("SNAPTREE_PROPERTY_EXAMPLES", "150")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestSnapshotTree = SnapshotTree.TestCase


# --- event and aggregate round trips through the msgpack transcoder ---


def test_events_round_trip_through_the_transcoder_and_replay_to_the_same_vm() -> None:
    vm = new_vm()
    for name in ("r", "a", "b", "c"):
        vm.take_snapshot(name, layer_paths)
    vm.apply_snapshot("b", layer_paths)  # r -> a -> b -> {c, current}
    vm.rename_snapshot("c", "c2")
    vm.delete_snapshot("a")  # merge scheduled
    vm.delete_snapshot("b")  # 2 dependents: pending
    worker = settle(vm)  # layers, the merge of a (commit-down), removals
    vm.merge("b", force=True)
    worker.settle()  # the forced merge of b (pull-up)
    assert {d for kind, _, d in worker.done if kind == "merge"} == {"commit-down", "pull-up"}
    vm.take_snapshot("d", layer_paths)
    vm.delete_snapshot("c2")  # no dependents: removed
    vm.delete_snapshot("d")  # one dependent: merge scheduled...
    vm.merge_failed(vm.resolve_node("d").id, "disk full")  # ...and failed
    events = list(vm.collect_events())
    kinds = {type(e).__name__ for e in events}
    assert {"Registered", "SnapshotTaken", "SnapshotApplied", "SnapshotRenamed", "SnapshotDeleted",
            "MergeScheduled", "MergeStarted", "MergeCompleted", "MergeFailed", "LayersCreated",
            "FilesRemoved"} <= kinds
    for e in events:
        again = roundtrip(e)
        assert again.__dict__ == e.__dict__
        assert type(again) is type(e)
    same_state(replay(events), vm)


def test_a_merge_deferred_and_an_import_round_trip_too() -> None:
    vm = new_vm()
    for name in ("r", "a", "b", "c"):
        vm.take_snapshot(name, layer_paths)
    vm.apply_snapshot("b", layer_paths)  # r -> a -> b -> {c, current}
    worker = settle(vm)
    vm.delete_snapshot("b")
    vm.merge("b", force=True)
    vm.delete_snapshot("a")  # scheduled; b's pull-up will give it 2 dependents
    worker.settle(1)
    events = list(vm.collect_events())
    assert "MergeDeferred" in {type(e).__name__ for e in events}
    same_state(replay(events), vm)

    # the whole tree, imported under another name (nodes travel as dataclasses)
    other = VirtualMachine.register(name="vm2", host="host2", disks=dict(OWN_DISKS))
    nodes = [copy.deepcopy(n) for n in vm.nodes.values()]
    other.record_import(nodes, vm.current, {"vm": str(vm.id), "version": vm.version})
    imported = list(other.collect_events())
    assert [type(e).__name__ for e in imported] == ["Registered", "Imported"]
    again = replay(imported)
    assert again.nodes == vm.nodes and again.current == vm.current


def test_aggregate_snapshot_round_trips_through_the_transcoder() -> None:
    vm = new_vm()
    vm.take_snapshot("a", layer_paths)
    vm.take_snapshot("b", layer_paths)
    vm.apply_snapshot("a", layer_paths)
    vm.delete_snapshot("a")
    assert vm.resolve_node("a").merge_state is MergeState.PENDING
    snap = Snapshot.take(vm)
    again = roundtrip(snap)
    same_state(again.mutate(None), vm)
