"""docs/semantics.md as scenarios, on the pure aggregate (no store) with the simulated worker of domain_sim.

Each test names the rule it checks. Besides the tree, every test that moves data checks with the
content model that no visible snapshot and no current state reads anything different afterwards.
"""

from __future__ import annotations

import copy
from typing import Any, Callable
from uuid import UUID

import pytest

from domain.errors import Conflict, InvalidName, NameTaken, Refused, UnknownSnapshot
from domain.lifecycle import RunAction, RunState
from domain.memory import Memory, MemoryState, Resume
from domain.tree import MergeDirection, MergeState, NodeKind, chain_depth
from domain.vm import VirtualMachine
from domain.work import WorkKind, is_idle, pending_work
from domain_sim import (
    OWN_DISKS,
    Worker,
    chain,
    deps,
    hidden,
    LIVE_SWITCH,
    layer_paths,
    memory_path,
    named,
    new_vm,
)


# --- helpers ---


class World:
    """A VM, a worker that settles its work in order, and the content model, with short verbs."""

    def __init__(self, policy: str = "commit-down") -> None:
        self.vm = new_vm()
        self.w = Worker(self.vm, layer_paths, policy)
        self.content = self.w.content
        self.n = 0

    # commands
    def take(self, name: str) -> UUID:
        return self.vm.take_snapshot(name, layer_paths)

    def apply(self, ref: str) -> UUID:
        return self.vm.apply_snapshot(ref, layer_paths)

    def delete(self, ref: str, subtree: bool = False) -> list[UUID]:
        return self.vm.delete_snapshot(ref, subtree=subtree)

    def settle(self) -> None:
        self.w.settle()
        assert is_idle(self.vm)
        assert self.w.memory_failures == 0

    def take_live(self, name: str) -> UUID:
        """A snapshot of the running VM: its memory is saved to a state file while it runs."""
        if self.w.running_on is None:
            self.vm.request_run(RunAction.START)  # `vm start`, and its worker starts QEMU
            self.w.settle()
        return self.vm.take_snapshot(name, layer_paths, memory_path(self.vm.current))

    def write(self, disk: str = "disk0", offset: int | None = None) -> str:
        """The guest writes a new pattern (into the current state's layer)."""
        self.n += 1
        pattern = f"p{self.n}"
        self.content.write(self.vm, disk, self.n if offset is None else offset, pattern)
        return pattern

    def take_settled(self, name: str) -> UUID:
        """Write something, take a snapshot, and let the worker create the overlays."""
        self.settle()
        self.write("disk0")
        self.write("disk1")
        sid = self.take(name)
        self.settle()
        return sid

    # facts
    @property
    def current(self):  # noqa: ANN201
        return self.vm.nodes[self.vm.current]

    def reads(self) -> dict[UUID, Any]:
        return self.content.visible_reads(self.vm)

    def read(self, node_id: UUID) -> Any:
        return self.content.read(self.vm, node_id)

    def events(self) -> list[str]:
        return [type(e).__name__ for e in self.vm.collect_events()]


def assert_reads_kept(before: dict[UUID, Any], world: World, *, current: Any = None) -> None:
    """Every visible snapshot of `before` still present reads the same; so does the current state."""
    after = world.reads()
    for node_id, reads in before.items():
        node = world.vm.nodes.get(node_id)
        if node is not None and node.kind is NodeKind.SNAPSHOT:
            assert after[node_id] == reads, f"snapshot {node.name} reads differently"
    if current is not None:
        assert after[world.vm.current] == current, "the current state reads differently"


def assert_refused_untouched(vm: VirtualMachine, exc: type[Exception], call: Callable[[], Any]) -> None:
    """The command raises `exc`, records no event and changes no state."""
    vm.collect_events()
    nodes, current, garbage = copy.deepcopy(vm.nodes), vm.current, dict(vm.garbage)
    with pytest.raises(exc):
        call()
    assert len(vm.pending_events) == 0
    assert vm.nodes == nodes and vm.current == current and vm.garbage == garbage


@pytest.fixture
def world() -> World:
    return World()


# --- take ---


def test_take_on_a_fresh_vm_freezes_the_own_disk_as_the_snapshot_and_adds_an_overlay(world: World) -> None:
    vm = world.vm
    root_id = vm.current
    assert world.current.layers == OWN_DISKS and world.current.parent is None
    before = world.read(root_id)

    sid = world.take("s1")

    s1 = vm.nodes[sid]
    assert sid == root_id  # the current node is frozen as the snapshot: same id
    assert s1.kind is NodeKind.SNAPSHOT and s1.name == "s1"
    assert s1.layers == OWN_DISKS  # the VM's own disk becomes the snapshot's layer
    cur = world.current
    assert cur.id != sid and cur.parent == sid and cur.kind is NodeKind.CURRENT
    assert cur.layers == layer_paths(cur.id)  # new overlays in the data directory, every disk
    assert cur.ready is False
    assert [(i.kind, i.node_id) for i in pending_work(vm)] == [(WorkKind.CREATE_LAYERS, cur.id)]
    assert world.events() == ["Registered", "SnapshotTaken"]

    world.settle()
    assert world.current.ready
    assert world.read(vm.current) == world.read(sid) == before
    world.write("disk0", 0)  # the guest's writes go into the overlay, not into the snapshot
    assert world.read(sid) == before
    assert world.read(vm.current)["disk0"][0] != before["disk0"][0]


def test_take_copies_the_configuration_into_the_snapshot() -> None:
    vm = VirtualMachine.register(name="vm", host="h", disks=dict(OWN_DISKS), config={"mem": 256})
    sid = vm.take_snapshot("s1", layer_paths)
    assert vm.nodes[sid].config == {"mem": 256}
    assert vm.nodes[vm.current].config == {"mem": 256}
    assert vm.nodes[vm.current].config is not vm.nodes[sid].config


# --- apply ---


def test_apply_discards_the_old_current_and_starts_a_fresh_overlay_on_the_snapshot(world: World) -> None:
    vm = world.vm
    s1 = world.take_settled("s1")
    world.take_settled("s2")
    world.write()
    old = world.current
    s1_before = (copy.deepcopy(vm.nodes[s1]), world.read(s1))
    before = world.reads()

    new_id = world.apply("s1")

    assert old.id not in vm.nodes  # the previous current state is discarded...
    for path in old.layers.values():  # ...and its overlay files are garbage
        assert path in vm.garbage
    cur = world.current
    assert cur.id == new_id and cur.parent == s1 and cur.layers == layer_paths(new_id)
    assert not cur.ready
    assert (vm.nodes[s1], world.read(s1)) == s1_before  # S itself never changed
    assert_reads_kept(before, world, current=s1_before[1])  # the VM starts from a copy of S
    assert world.events()[-1] == "SnapshotApplied"

    world.settle()
    assert vm.garbage == {}
    assert not set(old.layers.values()) & world.content.existing()
    world.write()
    assert world.read(s1) == s1_before[1]


# --- delete: 0 / 1 / 2+ dependents ---


def test_delete_with_no_dependents_deletes_the_snapshots_files(world: World) -> None:
    vm = world.vm
    world.take_settled("s1")
    s2 = world.take_settled("s2")
    world.apply("s1")  # s2's only dependent (the current state) is discarded
    world.settle()
    assert deps(vm, s2) == []
    s2_files = set(vm.nodes[s2].layers.values())
    before = world.reads()
    vm.collect_events()

    world.delete("s2")

    assert s2 not in vm.nodes
    assert s2_files <= set(vm.garbage)
    assert world.events() == ["SnapshotDeleted", "NodeRemoved"]
    assert not any(i.kind is WorkKind.MERGE for i in pending_work(vm))
    world.settle()
    assert not s2_files & world.content.existing()
    assert_reads_kept(before, world, current=before[vm.current])


@pytest.mark.parametrize("policy", ["commit-down", "pull-up"])
def test_delete_with_one_dependent_merges_it_away(policy: str) -> None:
    world = World(policy)
    vm = world.vm
    s1 = world.take_settled("s1")
    s2 = world.take_settled("s2")
    world.write()
    s2_files = dict(vm.nodes[s2].layers)
    cur_files = dict(world.current.layers)
    before = world.reads()
    vm.collect_events()

    world.delete("s2")

    assert vm.nodes[s2].kind is NodeKind.HIDDEN  # until the worker has merged it
    assert vm.nodes[s2].merge_state is MergeState.SCHEDULED
    assert world.events() == ["SnapshotDeleted", "MergeScheduled"]
    assert [i.node_id for i in pending_work(vm) if i.kind is WorkKind.MERGE] == [s2]
    assert_reads_kept(before, world, current=before[vm.current])

    world.settle()

    assert s2 not in vm.nodes  # S's node is gone
    cur = world.current
    assert cur.parent == s1  # one layer serves the dependent
    if policy == "commit-down":
        assert cur.layers == s2_files  # the dependent takes S's (merged) file over
        gone = cur_files
    else:
        assert cur.layers == cur_files  # S's data was pulled up into the dependent's layer
        gone = s2_files
    assert not set(gone.values()) & world.content.existing()
    assert vm.garbage == {}
    assert_reads_kept(before, world, current=before[vm.current])


def test_delete_with_one_dependent_commits_down_into_the_own_disk_whatever_the_policy() -> None:
    world = World("pull-up")
    vm = world.vm
    s1 = world.take_settled("s1")
    world.write()
    before = world.reads()
    world.delete("s1")
    world.settle()
    assert s1 not in vm.nodes
    assert world.current.layers == OWN_DISKS and world.current.parent is None
    assert world.w.done[-2][2] == MergeDirection.COMMIT_DOWN.value
    assert_reads_kept(before, world, current=before[vm.current])
    # the user's base file now holds the data again
    assert world.content.files[OWN_DISKS["disk0"]] == before[vm.current]["disk0"]


def test_delete_with_two_dependents_leaves_a_hidden_merge_pending_node(world: World) -> None:
    vm = world.vm
    world.take_settled("base")
    s1 = world.take_settled("s1")
    world.take_settled("s2")
    world.apply("s1")  # s1's dependents: s2 and the current state
    world.settle()
    s1_layers = dict(vm.nodes[s1].layers)
    before = world.reads()
    vm.collect_events()

    world.delete("s1")

    node = vm.nodes[s1]
    assert node.kind is NodeKind.HIDDEN and node.merge_state is MergeState.PENDING
    assert node.name == "s1"  # kept for display
    assert node.layers == s1_layers and node.config == {} and node.memory is None
    assert len(deps(vm, s1)) == 2
    assert world.events() == ["SnapshotDeleted"]
    assert is_idle(vm)  # nothing to do: it waits
    assert_reads_kept(before, world, current=before[vm.current])


# --- cascades ---


def _hidden_with_snapshot_and_current_below(world: World) -> tuple[UUID, UUID]:
    """base -> s1* (hidden, 2 dependents) -> {s2, current}."""
    world.take_settled("base")
    s1 = world.take_settled("s1")
    s2 = world.take_settled("s2")
    world.apply("s1")
    world.settle()
    world.write()
    world.delete("s1")
    assert len(deps(world.vm, s1)) == 2
    return s1, s2


def test_cascade_apply_elsewhere_leaves_one_dependent_and_the_hidden_node_merges_by_itself(world: World) -> None:
    vm = world.vm
    s1, s2 = _hidden_with_snapshot_and_current_below(world)
    s1_files = dict(vm.nodes[s1].layers)
    before = world.reads()
    vm.collect_events()

    world.apply("s2")  # discards the current state that sat on s1

    assert world.events() == ["SnapshotApplied", "MergeScheduled"]
    assert vm.nodes[s1].merge_state is MergeState.SCHEDULED
    world.settle()
    assert s1 not in vm.nodes
    assert vm.nodes[s2].parent == named(vm, "base").id
    assert vm.nodes[s2].layers == s1_files  # commit-down: s2 took the merged file over
    assert_reads_kept(before, world, current=before[s2])


def test_cascade_when_both_dependents_go_the_hidden_layers_are_deleted(world: World) -> None:
    vm = world.vm
    world.take_settled("base")
    s1 = world.take_settled("s1")
    world.take_settled("s2")
    world.apply("s1")
    world.take_settled("s3")  # s1 -> {s2, s3 -> current}
    world.apply("base")  # the current state leaves s1's subtree
    world.settle()
    world.delete("s1")
    assert vm.nodes[s1].merge_state is MergeState.PENDING
    s1_files = set(vm.nodes[s1].layers.values())
    before = world.reads()
    vm.collect_events()

    world.delete("s2")  # one dependent left: merge scheduled...
    assert vm.nodes[s1].merge_state is MergeState.SCHEDULED
    world.delete("s3")  # ...and none before the worker came: the layers go

    assert s1 not in vm.nodes and hidden(vm) == []
    assert world.events() == [
        "SnapshotDeleted", "NodeRemoved", "MergeScheduled",
        "SnapshotDeleted", "NodeRemoved", "NodeRemoved",
    ]
    assert s1_files <= set(vm.garbage)
    world.settle()
    assert not s1_files & world.content.existing()
    assert_reads_kept(before, world, current=before[vm.current])


def test_cascade_apply_elsewhere_runs_through_a_chain_of_hidden_ancestors(world: World) -> None:
    """r -> h1* -> {x, h2* -> current}: applying x removes h2 (no dependent left), then h1 merges."""
    vm = world.vm
    r = world.take_settled("r")
    h1 = world.take_settled("h1")
    x = world.take_settled("x")
    world.apply("h1")
    h2 = world.take_settled("h2")
    world.take_settled("y")
    world.apply("h2")
    world.settle()
    world.write()  # r -> h1 -> {x, h2 -> {y, current}}
    world.delete("h1")
    world.delete("h2")
    assert [n.merge_state for n in (vm.nodes[h1], vm.nodes[h2])] == [MergeState.PENDING] * 2
    world.delete("y")  # h2's one dependent left: the current state
    assert vm.nodes[h2].merge_state is MergeState.SCHEDULED
    before = world.reads()
    vm.collect_events()

    world.apply("x")

    assert world.events() == ["SnapshotApplied", "NodeRemoved", "MergeScheduled"]
    assert h2 not in vm.nodes and vm.nodes[h1].merge_state is MergeState.SCHEDULED
    world.settle()
    assert hidden(vm) == []
    assert [n.id for n in chain(vm, vm.current)][1:] == [x, r]
    assert_reads_kept(before, world, current=before[x])


def test_cascade_removal_runs_up_a_chain_in_one_command(world: World) -> None:
    """r -> h1* -> {x -> current, h2* -> {y, z}}; delete y then z: z, h2 go, h1 merges."""
    vm = world.vm
    world.take_settled("r")
    h1 = world.take_settled("h1")
    h2 = world.take_settled("h2")
    world.take_settled("y")
    world.apply("h2")
    world.take_settled("z")
    world.apply("h1")
    world.take_settled("x")
    world.delete("h1")
    world.delete("h2")
    world.delete("y")
    assert vm.nodes[h2].merge_state is MergeState.SCHEDULED  # one dependent (z) left
    before = world.reads()
    vm.collect_events()

    world.delete("z")

    assert world.events() == ["SnapshotDeleted", "NodeRemoved", "NodeRemoved", "MergeScheduled"]
    assert h2 not in vm.nodes
    assert vm.nodes[h1].merge_state is MergeState.SCHEDULED  # its one dependent: x
    world.settle()
    assert hidden(vm) == []
    assert [n.name for n in chain(vm, vm.current)][1:] == ["x", "r"]
    assert_reads_kept(before, world, current=before[vm.current])


# --- delete subtree ---


def test_delete_subtree_merges_the_deleted_nodes_above_the_current_state_into_it(world: World) -> None:
    vm = world.vm
    r = world.take_settled("r")
    s = world.take_settled("s")
    world.take_settled("t")
    world.take_settled("u")
    world.apply("t")
    world.take_settled("v")  # r -> s -> t -> {u, v -> current}
    world.write()
    cur = vm.current
    before = world.reads()

    deleted = world.delete("s", subtree=True)

    assert len(deleted) == 4 and deleted[-1] == s  # leaves first, S last
    assert vm.current == cur  # the current state is never deleted
    assert [n.name for n in vm.nodes.values() if n.kind is NodeKind.SNAPSHOT] == ["r"]
    world.settle()
    assert vm.current == cur
    assert [n.id for n in chain(vm, cur)] == [cur, r]  # every deleted node above merged into it
    assert hidden(vm) == []
    assert_reads_kept(before, world, current=before[cur])


def test_delete_subtree_not_above_the_current_state_deletes_its_files(world: World) -> None:
    vm = world.vm
    world.take_settled("r")
    s = world.take_settled("s")
    world.take_settled("t")
    world.apply("r")  # the current state sits on r, beside s
    world.settle()
    files = {p for n in vm.nodes.values() if n.name in ("s", "t") for p in n.layers.values()}
    before = world.reads()
    world.delete("s", subtree=True)
    assert s not in vm.nodes and hidden(vm) == []
    world.settle()
    assert not files & world.content.existing()
    assert_reads_kept(before, world, current=before[vm.current])


# --- revert ---


def test_revert_applies_the_nearest_visible_snapshot_skipping_hidden_nodes(world: World) -> None:
    vm = world.vm
    r = world.take_settled("r")
    h = world.take_settled("h")
    world.take_settled("x")
    world.apply("h")
    world.settle()
    world.write()
    world.delete("h")  # r -> h* -> {x, current}
    before = world.reads()
    vm.collect_events()

    world.vm.revert(layer_paths)

    evs = vm.collect_events()
    applied = [e for e in evs if isinstance(e, VirtualMachine.SnapshotApplied)]
    assert len(applied) == 1 and applied[0].snapshot_id == r and applied[0].revert is True
    assert world.current.parent == r
    assert vm.nodes[h].merge_state is MergeState.SCHEDULED  # cascade: h has one dependent left
    world.settle()
    assert_reads_kept(before, world, current=before[r])


def test_revert_with_no_visible_snapshot_above_is_refused(world: World) -> None:
    vm = world.vm
    assert_refused_untouched(vm, Refused, lambda: vm.revert(layer_paths))  # a fresh VM
    world.take_settled("a")
    world.take_settled("b")
    world.apply("a")
    world.settle()
    world.delete("a")  # a* (root, hidden) -> {b, current}
    assert_refused_untouched(vm, Refused, lambda: vm.revert(layer_paths))


# --- forced merge ---


def test_forced_merge_with_two_dependents_pulls_up_into_each(world: World) -> None:
    vm = world.vm
    r = world.take_settled("r")
    h = world.take_settled("h")
    x = world.take_settled("x")
    world.apply("h")
    world.settle()
    world.write()
    world.delete("h")
    cur = vm.current
    depth = {x: chain_depth(vm.nodes, x), cur: chain_depth(vm.nodes, cur)}
    dep_files = {x: dict(vm.nodes[x].layers), cur: dict(vm.nodes[cur].layers)}
    h_files = set(vm.nodes[h].layers.values())
    before = world.reads()
    assert_refused_untouched(vm, Refused, lambda: vm.merge("h", force=False))  # 2 dependents: not without --force
    vm.collect_events()

    assert vm.merge("h", force=True) == h

    assert world.events() == ["MergeScheduled"]
    assert vm.nodes[h].merge_state is MergeState.SCHEDULED and vm.nodes[h].merge_forced
    world.settle()
    assert h not in vm.nodes
    assert world.w.done[-2][2] == MergeDirection.PULL_UP.value
    for d in (x, cur):
        assert vm.nodes[d].parent == r
        assert vm.nodes[d].layers == dep_files[d]  # each dependent got the data in its own layer
        assert chain_depth(vm.nodes, d) == depth[d] - 1  # one layer less in every chain
    assert not h_files & world.content.existing()
    assert_reads_kept(before, world, current=before[cur])


def test_forced_merge_of_the_root_is_refused(world: World) -> None:
    vm = world.vm
    world.take_settled("a")
    world.take_settled("b")
    world.apply("a")
    world.settle()
    world.delete("a")  # a* holds the VM's own disk and has 2 dependents
    assert hidden(vm)[0].layers == OWN_DISKS
    assert_refused_untouched(vm, Refused, lambda: vm.merge("a", force=True))


def test_merge_of_a_visible_snapshot_or_the_current_state_is_refused(world: World) -> None:
    vm = world.vm
    world.take_settled("a")
    assert_refused_untouched(vm, Refused, lambda: vm.merge("a", force=True))
    assert_refused_untouched(vm, Refused, lambda: vm.merge(str(vm.current), force=True))


# --- names ---


def test_a_hidden_node_keeps_its_name_but_the_name_is_free(world: World) -> None:
    vm = world.vm
    world.take_settled("base")
    a1 = world.take_settled("a")
    world.take_settled("x")
    world.apply("a")
    world.settle()
    world.delete("a")  # a1 hidden, 2 dependents, still called "a"
    assert vm.nodes[a1].name == "a" and vm.nodes[a1].kind is NodeKind.HIDDEN
    with pytest.raises(UnknownSnapshot):
        vm.resolve_snapshot("a")  # a name resolves to a visible snapshot only
    assert vm.resolve_node("a").id == a1  # merge VM NODE: the only hidden node named "a"

    a2 = world.take_settled("a")  # the name is free again
    assert vm.resolve_snapshot("a").id == a2
    assert vm.resolve_node("a").id == a2  # a visible snapshot wins

    world.take_settled("y")
    world.apply("a")
    world.settle()
    world.delete("a")  # a2 hidden too, 2 dependents
    with pytest.raises(Refused):
        vm.resolve_node("a")  # two hidden nodes carry it: give a node id
    assert vm.resolve_node(str(a1)).id == a1 and vm.resolve_node(str(a2)).id == a2
    assert vm.merge(str(a2), force=True) == a2


def test_rename(world: World) -> None:
    vm = world.vm
    sid = world.take_settled("old")
    vm.collect_events()
    vm.rename_snapshot("old", "new")
    assert vm.nodes[sid].name == "new"
    assert vm.resolve_snapshot("new").id == sid
    with pytest.raises(UnknownSnapshot):
        vm.resolve_snapshot("old")
    (ev,) = vm.collect_events()
    assert isinstance(ev, VirtualMachine.SnapshotRenamed)
    assert (ev.old_name, ev.new_name) == ("old", "new")
    vm.rename_snapshot(str(sid), "new")  # to its own name: nothing to record
    assert len(vm.pending_events) == 0


def test_rename_of_a_hidden_node_or_the_current_state_is_refused(world: World) -> None:
    vm = world.vm
    world.take_settled("a")
    world.take_settled("b")
    world.apply("a")
    world.settle()
    world.delete("a")
    assert_refused_untouched(vm, UnknownSnapshot, lambda: vm.rename_snapshot("a", "c"))
    hid = hidden(vm)[0].id
    assert_refused_untouched(vm, Refused, lambda: vm.rename_snapshot(str(hid), "c"))
    assert_refused_untouched(vm, Refused, lambda: vm.rename_snapshot(str(vm.current), "c"))


def test_duplicate_names_are_refused(world: World) -> None:
    vm = world.vm
    world.take_settled("a")
    world.take_settled("b")
    assert_refused_untouched(vm, NameTaken, lambda: vm.take_snapshot("a", layer_paths))
    assert_refused_untouched(vm, NameTaken, lambda: vm.rename_snapshot("b", "a"))


BAD_NAMES = ["", " ", "a/b", "/", "..", "a..b", "a\0b", "a\nb", "tab\there", "bell\x07", "\x7f", "a\\b"]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_bad_names_are_refused_with_nothing_recorded(world: World, bad: str) -> None:
    vm = world.vm
    world.take_settled("ok")
    assert_refused_untouched(vm, InvalidName, lambda: vm.take_snapshot(bad, layer_paths))
    assert_refused_untouched(vm, InvalidName, lambda: vm.rename_snapshot("ok", bad))


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_bad_vm_names_are_refused(bad: str) -> None:
    with pytest.raises(InvalidName):
        VirtualMachine.register(name=bad, host="h", disks=dict(OWN_DISKS))


def test_register_refuses_relative_or_shared_disk_paths() -> None:
    with pytest.raises(Refused):
        VirtualMachine.register(name="v", host="h", disks={"d": "rel.qcow2"})
    with pytest.raises(Refused):
        VirtualMachine.register(name="v", host="h", disks={"a": "/x.qcow2", "b": "/x.qcow2"})
    with pytest.raises(Refused):
        VirtualMachine.register(name="v", host="h", disks={})


# --- hidden nodes and running merges ---


def test_apply_or_delete_of_a_hidden_node_is_refused(world: World) -> None:
    vm = world.vm
    world.take_settled("a")
    world.take_settled("b")
    world.apply("a")
    world.settle()
    world.delete("a")
    hid = str(hidden(vm)[0].id)
    for call in (lambda: world.apply(hid), lambda: world.delete(hid), lambda: world.delete(hid, True)):
        assert_refused_untouched(vm, Refused, call)
    for call in (lambda: world.apply("a"), lambda: world.delete("a")):
        assert_refused_untouched(vm, UnknownSnapshot, call)  # by its former name: unknown


def test_apply_delete_or_rename_of_the_current_state_is_refused(world: World) -> None:
    vm = world.vm
    world.take_settled("a")
    cur = str(vm.current)
    for call in (lambda: world.apply(cur), lambda: world.delete(cur), lambda: vm.rename_snapshot(cur, "x")):
        assert_refused_untouched(vm, Refused, call)
    assert_refused_untouched(vm, UnknownSnapshot, lambda: world.apply("nope"))
    assert_refused_untouched(vm, UnknownSnapshot, lambda: world.delete("nope"))


def _merge_running(world: World) -> UUID:
    """r -> s* (merge RUNNING into the current state) ; returns s."""
    world.take_settled("r")
    s = world.take_settled("s")
    world.write()
    world.delete("s")
    (item,) = pending_work(world.vm)
    assert item.kind is WorkKind.MERGE
    world.w.start_merge(s)
    assert world.vm.nodes[s].merge_state is MergeState.RUNNING
    return s


def test_apply_delete_revert_while_a_merge_is_running_conflict(world: World) -> None:
    vm = world.vm
    _merge_running(world)
    assert_refused_untouched(vm, Conflict, lambda: world.apply("r"))
    assert_refused_untouched(vm, Conflict, lambda: world.delete("r"))
    assert_refused_untouched(vm, Conflict, lambda: world.delete("r", subtree=True))
    assert_refused_untouched(vm, Conflict, lambda: vm.revert(layer_paths))


def test_take_and_rename_while_a_merge_is_running_are_allowed(world: World) -> None:
    vm = world.vm
    s = _merge_running(world)
    before = world.reads()
    t = world.take("t")  # the merge's dependent is now snapshot t
    world.vm.rename_snapshot("r", "r2")
    world.settle()  # the running merge resumes first, then the new overlay
    assert s not in vm.nodes
    assert [n.name for n in chain(vm, vm.current)][1:] == ["t", "r2"]
    assert world.read(t) == before[t]
    assert_reads_kept(before, world, current=before[t])


def test_merge_of_a_running_merge_is_a_conflict(world: World) -> None:
    vm = world.vm
    s = _merge_running(world)
    assert_refused_untouched(vm, Conflict, lambda: vm.merge(str(s), force=False))


def test_a_failed_merge_is_retried_on_request(world: World) -> None:
    vm = world.vm
    world.take_settled("r")
    s = world.take_settled("s")
    world.delete("s")
    vm.merge_failed(s, "disk full")
    assert vm.nodes[s].merge_state is MergeState.FAILED and is_idle(vm)
    assert vm.merge("s", force=False) == s  # by its former name: the only hidden node called "s"
    assert vm.nodes[s].merge_state is MergeState.SCHEDULED
    world.settle()
    assert s not in vm.nodes


# --- worker reports are idempotent ---


def test_worker_reports_twice_record_once(world: World) -> None:
    vm = world.vm
    world.take_settled("r")
    s = world.take_settled("s")
    world.delete("s")
    world.settle()
    vm.collect_events()
    vm.layers_created(vm.current)
    vm.merge_completed(s)  # already recorded: a re-run of the same item
    vm.files_removed(["/data/never.qcow2"])
    assert len(vm.pending_events) == 0


# --- all the way back ---


@pytest.mark.parametrize("policy", ["commit-down", "pull-up", "alternate"])
@pytest.mark.parametrize("order", ["oldest-first", "newest-first"])
def test_after_every_snapshot_is_deleted_the_vm_runs_on_its_own_disk_again(policy: str, order: str) -> None:
    world = World(policy)
    vm = world.vm
    for name in ("a", "b", "c"):
        world.take_settled(name)
    world.apply("b")
    world.settle()
    world.take_settled("d")
    world.apply("a")
    world.settle()
    world.take_settled("e")  # a -> {b -> {c, d}, e -> current}
    world.write()
    final = world.read(vm.current)
    names = ["a", "b", "c", "d", "e"]
    for name in names if order == "oldest-first" else reversed(names):
        world.delete(name)
    world.settle()
    assert list(vm.nodes) == [vm.current]
    cur = world.current
    assert cur.parent is None and cur.layers == OWN_DISKS
    assert world.content.existing() == set(OWN_DISKS.values())  # every other file is gone
    assert world.read(vm.current) == final
    for disk, path in OWN_DISKS.items():
        assert world.content.files[path] == final[disk]  # the data is back in the user's file


# --- memory (live snapshots) and configuration ---


def test_live_take_saves_the_memory_after_the_switch(world: World) -> None:
    vm = world.vm
    sid = world.take_live("s1")
    mem = vm.nodes[sid].memory
    assert mem is not None and mem.state is MemoryState.REQUESTED and mem.path == memory_path(sid)
    kinds = [i.kind for i in pending_work(vm)]
    assert kinds == [WorkKind.CREATE_LAYERS, WorkKind.SAVE_MEMORY]  # the save starts with the switch
    world.settle()
    mem = vm.nodes[sid].memory
    assert mem is not None and mem.state is MemoryState.SAVED and mem.method == LIVE_SWITCH.method
    assert mem.pause_ms == LIVE_SWITCH.pause_ms
    assert world.content.memory == {memory_path(sid)}


@pytest.mark.parametrize("dependents", [1, 2])
def test_delete_removes_the_config_copy_and_memory_at_once(world: World, dependents: int) -> None:
    vm = world.vm
    world.take_settled("base")
    sid = world.take_live("s1")
    world.settle()
    world.take_settled("s2")
    if dependents == 2:
        world.apply("s1")
        world.settle()
    assert len(deps(vm, sid)) == dependents
    vm.collect_events()

    world.delete("s1")

    node = vm.nodes[sid]  # hidden: merge scheduled (1) or pending (2)
    assert node.kind is NodeKind.HIDDEN and node.memory is None and node.config == {}
    assert memory_path(sid) in vm.garbage  # at once, whatever happens to the layers
    deleted = [e for e in vm.collect_events() if isinstance(e, VirtualMachine.SnapshotDeleted)]
    assert deleted[0].files == [memory_path(sid)] and deleted[0].dependents == dependents
    world.settle()
    assert world.content.memory == set()


def test_apply_of_a_snapshot_with_saved_memory_restores_it(world: World) -> None:
    vm = world.vm
    sid = world.take_live("s1")
    world.take_settled("s2")
    new_id = vm.apply_snapshot("s1", layer_paths, paused=True)
    assert vm.nodes[new_id].restore is Resume.PAUSED and vm.nodes[new_id].memory is None
    # a snapshot of a state that is still being restored is refused until the worker is done
    assert_refused_untouched(vm, Conflict, lambda: world.take("s3"))
    world.settle()
    assert vm.nodes[new_id].memory is None  # restored: the current state owns no memory file
    assert vm.nodes[new_id].restore is None
    assert vm.nodes[sid].memory is not None and vm.nodes[sid].memory.state is MemoryState.SAVED
    world.take("s3")


def test_apply_waits_for_a_live_take_to_switch_first(world: World) -> None:
    vm = world.vm
    world.take_settled("s1")
    world.take_live("s2")  # the worker has not switched to the new overlay yet
    assert_refused_untouched(vm, Conflict, lambda: world.apply("s1"))
    assert_refused_untouched(vm, Conflict, lambda: vm.revert(layer_paths))
    world.w.settle(1)  # the switch; the save now runs
    world.apply("s1")
    world.settle()


def test_apply_of_a_snapshot_whose_memory_is_still_being_saved(world: World) -> None:
    vm = world.vm
    sid = world.take_live("s1")
    world.w.settle(1)  # switched; the memory save runs
    mem = vm.nodes[sid].memory
    assert mem is not None and mem.state is MemoryState.SAVING
    new_id = world.apply("s1")  # recorded now, restored once the save ends (work runs in order)
    assert vm.nodes[new_id].restore is Resume.RUNNING
    kinds = [i.kind for i in pending_work(vm)]
    assert kinds.index(WorkKind.SAVE_MEMORY) < kinds.index(WorkKind.CREATE_LAYERS)
    world.settle()
    mem = vm.nodes[sid].memory
    assert mem is not None and mem.state is MemoryState.SAVED and vm.nodes[new_id].restore is None


def test_a_failed_memory_save_leaves_a_disk_only_snapshot(world: World) -> None:
    vm = world.vm
    sid = world.take_live("s1")
    world.w.settle(1)
    vm.memory_save_failed(sid, "no space left")
    mem = vm.nodes[sid].memory
    assert mem is not None and mem.state is MemoryState.FAILED and mem.error == "no space left"
    assert memory_path(sid) in vm.garbage
    world.settle()
    assert world.content.memory == set()
    new_id = world.apply("s1")
    assert vm.nodes[new_id].memory is None  # nothing to restore: the VM starts from the disks


def test_the_vm_settings_change_but_a_snapshot_keeps_its_copy() -> None:
    vm = VirtualMachine.register(name="vm", host="h", disks=dict(OWN_DISKS), config={"mem": 256})
    sid = vm.take_snapshot("s1", layer_paths)
    vm.set_config({"mem": 512})
    assert vm.nodes[vm.current].config == {"mem": 512}
    assert vm.nodes[sid].config == {"mem": 256}  # a snapshot's configuration copy never changes
    new_id = vm.apply_snapshot("s1", layer_paths)
    assert vm.nodes[new_id].config == {"mem": 256}  # apply: the copy of S's configuration
    vm.set_config({"mem": 1024})  # "the VM's settings may be changed after apply"
    assert vm.nodes[sid].config == {"mem": 256}
    vm.collect_events()
    vm.set_config({"mem": 1024})  # no change: nothing recorded
    assert len(vm.pending_events) == 0
    with pytest.raises(Refused):
        vm.set_config({})


def test_applying_a_snapshot_never_changes_its_record(world: World) -> None:
    vm = world.vm
    sid = world.take_live("s1")
    world.settle()
    before = copy.deepcopy(vm.nodes[sid])
    assert before.memory is not None and before.memory.pause_ms == LIVE_SWITCH.pause_ms
    world.apply("s1")
    world.settle()  # the worker restores the VM from S's memory
    assert vm.nodes[sid] == before


# --- work order and merge interplay (regressions of bugs found while writing these tests) ---


def test_pending_work_creates_backing_layers_before_the_overlays_on_them() -> None:
    """take A; take B; delete B before the worker ran: B's layers come before the current's."""
    vm = new_vm()
    vm.take_snapshot("A", layer_paths)
    vm.take_snapshot("B", layer_paths)  # B's layers (the old current's) are not created yet
    vm.delete_snapshot("B")  # B: one dependent -> merge scheduled
    w = Worker(vm)  # strict: raises OutOfOrder if an item needs files not created yet
    w.settle()
    assert [n.name for n in chain(vm, vm.current)][1:] == ["A"]
    assert w.content.existing() == {p for n in vm.nodes.values() for p in n.layers.values()}


def test_pending_work_lists_the_creation_of_a_nodes_layers_before_a_merge_into_it() -> None:
    vm = new_vm()
    for name in ("A", "B", "C"):
        vm.take_snapshot(name, layer_paths)
    vm.apply_snapshot("B", layer_paths)  # A -> B -> {C, current}; no layers created yet
    vm.delete_snapshot("A")  # A: one dependent (B) -> merge A into B scheduled
    vm.delete_snapshot("B")  # two dependents: pending
    vm.delete_snapshot("C")  # one dependent left: B's merge scheduled
    a, b = vm.resolve_node("A").id, vm.resolve_node("B").id
    order = [(i.kind, i.node_id) for i in pending_work(vm)]
    assert order.index((WorkKind.CREATE_LAYERS, b)) < order.index((WorkKind.MERGE, a))
    Worker(vm).settle()
    assert hidden(vm) == [] and is_idle(vm)


def test_forced_merge_below_a_scheduled_merge_waits_until_the_worker_is_idle() -> None:
    """A (root) -> B -> {C, current}: A's merge into B would hand B the VM's own disk."""
    vm = new_vm()
    for name in ("A", "B", "C"):
        vm.take_snapshot(name, layer_paths)
    vm.apply_snapshot("B", layer_paths)
    w = Worker(vm)
    w.settle()
    vm.delete_snapshot("A")  # one dependent (B): merge scheduled
    vm.delete_snapshot("B")  # two dependents: pending
    assert_refused_untouched(vm, Conflict, lambda: vm.merge("B", force=True))
    w.settle()  # A commits down into B: B now holds the VM's own disk
    b = vm.resolve_node("B")
    assert b.parent is None and b.layers == OWN_DISKS and b.merge_state is MergeState.PENDING
    assert_refused_untouched(vm, Refused, lambda: vm.merge("B", force=True))


@pytest.mark.parametrize("base", [True, False], ids=["A-not-root", "A-root"])
def test_forced_pull_up_gives_a_scheduled_parent_two_dependents_and_it_waits_again(base: bool) -> None:
    """(R ->) A -> B -> {C, current}; force B, then delete A: B's pull-up leaves A with 2 dependents."""
    vm = new_vm()
    for name in (["R"] if base else []) + ["A", "B", "C"]:
        vm.take_snapshot(name, layer_paths)
    vm.apply_snapshot("B", layer_paths)
    w = Worker(vm)
    w.settle()
    vm.delete_snapshot("B")  # pending
    b = vm.merge("B", force=True)
    vm.delete_snapshot("A")  # one dependent (B): scheduled after B's forced merge
    a = vm.resolve_node("A").id
    vm.collect_events()
    w.settle(1)  # B's forced merge: C and the current state now sit on A
    assert b not in vm.nodes and len(deps(vm, a)) == 2
    assert "MergeDeferred" in [type(e).__name__ for e in vm.collect_events()]
    assert vm.nodes[a].merge_state is MergeState.PENDING  # docs/semantics.md: 2+ dependents wait
    w.settle()  # nothing can get stuck: A is not merged into two dependents unforced
    assert is_idle(vm) and vm.nodes[a].merge_state is MergeState.PENDING


def test_one_merge_runs_at_a_time() -> None:
    vm = new_vm()
    vm.take_snapshot("A", layer_paths)
    vm.take_snapshot("B", layer_paths)
    w = Worker(vm)
    w.settle()
    vm.delete_snapshot("B")  # B -> current: scheduled
    vm.delete_snapshot("A")  # A -> B: scheduled
    a, b = vm.resolve_node("A").id, vm.resolve_node("B").id
    w.start_merge(a)
    assert_refused_untouched(
        vm, Conflict, lambda: vm.merge_started(b, [vm.current], MergeDirection.COMMIT_DOWN, 0)
    )
    w.settle()
    assert a not in vm.nodes and b not in vm.nodes
