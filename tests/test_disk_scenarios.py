"""docs/semantics.md on real qcow2 files: every rule and cascade, byte patterns checked after each step."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.qemu import qemu_img
from domain import commands as c
from service import merging
from service.api import Service
from service.steps import Drain
from domain.errors import Refused
from domain.tree import MergeState, NodeKind
from tests.disk_harness import SLOT, PatternVM


@pytest.fixture
def pv(service: Service, tmp_path: Path) -> PatternVM:
    return PatternVM.create(service, tmp_path)


def test_first_snapshot_freezes_the_own_disk_and_puts_an_overlay_on_top(pv: PatternVM) -> None:
    pv.take("A")
    vm = pv.vm
    a = vm.resolve_snapshot("A")
    assert a.layers == pv.disks  # the user's file is A's layer now
    current = vm.nodes[vm.current]
    assert current.parent == a.id
    assert all(pv.svc.data.owns(p) for p in current.layers.values())
    pv.write()
    pv.check()


def test_apply_discards_the_current_overlay_and_never_writes_the_snapshot(pv: PatternVM) -> None:
    pv.take("A")
    pv.write()
    old_current = pv.vm.nodes[pv.vm.current].layers
    a_layer = pv.vm.resolve_snapshot("A").layers["disk0"]
    before = Path(a_layer).stat().st_mtime_ns
    pv.apply("A")
    assert not any(Path(p).exists() for p in old_current.values())
    assert Path(a_layer).stat().st_mtime_ns == before
    pv.check()


def test_delete_with_0_dependents_removes_its_files(pv: PatternVM) -> None:
    pv.take("A")
    pv.take("B")
    pv.apply("A")  # B is now a leaf with no dependents
    b_files = list(pv.vm.resolve_snapshot("B").layers.values())
    pv.delete("B")
    assert not any(Path(p).exists() for p in b_files)
    assert pv.visible() == ["A"] and pv.hidden() == []
    pv.check()


def test_delete_with_1_dependent_merges_commit_down_when_the_dependent_is_smaller(pv: PatternVM) -> None:
    pv.take("A")
    pv.write(nbytes=8 * SLOT)  # B's layer is big
    pv.take("B")
    pv.write()  # the current (B's one dependent) is small
    b = pv.vm.resolve_snapshot("B")
    pv.delete("B")
    vm = pv.vm
    assert pv.visible() == ["A"] and pv.hidden() == []
    assert vm.nodes[vm.current].layers == b.layers  # the dependent took B's file over
    pv.check()


def test_delete_with_1_dependent_pulls_up_when_the_hidden_layer_is_smaller(pv: PatternVM) -> None:
    pv.take("A")
    pv.take("B")  # B holds one slot
    pv.write(nbytes=8 * SLOT)  # the dependent holds eight
    cur_before = pv.vm.nodes[pv.vm.current].layers
    pv.delete("B")
    vm = pv.vm
    assert vm.nodes[vm.current].layers == cur_before  # data pulled up into the dependent's file
    assert vm.nodes[vm.current].parent == vm.resolve_snapshot("A").id
    pv.check()


def test_delete_with_2_dependents_leaves_a_hidden_merge_pending_node(pv: PatternVM) -> None:
    pv.take("A")
    pv.take("B")
    pv.apply("A")
    pv.take("C")
    pv.delete("A")
    vm = pv.vm
    (hidden,) = [n for n in vm.nodes.values() if n.kind is NodeKind.HIDDEN]
    assert hidden.name == "A" and hidden.merge_state is MergeState.PENDING
    assert hidden.layers == pv.disks  # still the user's own file
    assert pv.visible() == ["B", "C"]
    pv.check()


def test_cascade_hidden_node_merges_when_its_dependents_drop_to_one(pv: PatternVM) -> None:
    pv.take("A")
    pv.take("B")
    pv.write()
    pv.take("C")
    pv.apply("B")  # A - B - {C, current}
    pv.delete("B")  # 2 dependents: hidden
    assert pv.hidden() == ["B"]
    pv.apply("C")  # the current below hidden B is discarded: B has one dependent left
    assert pv.hidden() == []
    vm = pv.vm
    assert vm.resolve_snapshot("C").parent == vm.resolve_snapshot("A").id
    pv.check()


def test_cascade_hidden_node_is_deleted_when_its_dependents_drop_to_zero(pv: PatternVM) -> None:
    pv.take("A")
    pv.take("B")
    pv.take("C")
    pv.apply("B")  # A - B - {C, current}
    pv.delete("B")
    b_files = [n for n in pv.vm.nodes.values() if n.kind is NodeKind.HIDDEN][0].layers
    pv.apply("A")  # discards the current under B: B now has only C
    pv.delete("C")  # B drops to zero dependents: its layers go
    assert pv.hidden() == []
    assert not any(Path(p).exists() for p in b_files.values())
    pv.check()


def test_cascade_through_a_chain_of_hidden_ancestors(pv: PatternVM) -> None:
    pv.take("A")
    pv.take("B")
    pv.take("X")  # A - B - X - current
    pv.apply("A")
    pv.take("Y")  # A - {B - X - cur0?, Y - current}
    pv.apply("B")
    pv.take("Z")  # B - {X, Z - current}
    pv.delete("A")  # A: B and Y depend on it -> hidden
    pv.delete("B")  # B: X and Z -> hidden
    assert pv.hidden() == ["A", "B"]
    pv.delete("Y")  # A drops to one dependent (hidden B): merges into it
    assert pv.hidden() == ["B"]
    pv.check()
    pv.delete("X")  # B drops to one (Z): merges; A's data reaches Z's chain
    assert pv.hidden() == []
    vm = pv.vm
    assert vm.resolve_snapshot("Z").parent is None  # Z holds the user's file again
    assert vm.resolve_snapshot("Z").layers == pv.disks
    pv.check()


def test_delete_subtree_merges_the_nodes_above_the_current_into_it(pv: PatternVM) -> None:
    pv.take("A")
    pv.take("B")
    pv.take("C")
    pv.apply("B")
    pv.take("D")  # A - B - {C, D - current}
    pv.delete("B", subtree=True)
    assert pv.visible() == ["A"]
    vm = pv.vm
    assert vm.nodes[vm.current].parent == vm.resolve_snapshot("A").id
    pv.check()


def test_delete_subtree_below_nothing_current(pv: PatternVM) -> None:
    pv.take("A")
    pv.take("B")
    pv.take("C")
    pv.apply("A")  # A - {B - C, current}
    pv.delete("B", subtree=True)
    assert pv.visible() == ["A"] and pv.hidden() == []
    pv.check()


def test_revert_skips_hidden_nodes(pv: PatternVM) -> None:
    pv.take("A")
    pv.take("B")
    pv.take("C")
    pv.apply("B")  # B - {C, current}
    pv.delete("B")  # hidden B above the current
    pv.write()
    pv.revert()  # nearest visible above is A
    vm = pv.vm
    assert vm.nodes[vm.current].parent == vm.resolve_snapshot("A").id
    pv.check()


def test_revert_without_a_visible_snapshot_above_is_refused(pv: PatternVM) -> None:
    with pytest.raises(Refused):
        pv.svc.handle(c.RevertSnapshot(pv.name))
    pv.take("A")
    pv.take("B")
    pv.apply("A")
    pv.take("C")
    pv.delete("A")  # A hidden (2 dependents), the current sits on C
    pv.delete("C")  # C merges into the current; above it only hidden A
    with pytest.raises(Refused):
        pv.svc.handle(c.RevertSnapshot(pv.name))
    pv.check()


def test_forced_merge_pulls_a_hidden_node_up_into_each_dependent(pv: PatternVM) -> None:
    pv.take("A")
    pv.take("B")
    pv.write()
    pv.take("C")
    pv.apply("B")
    pv.take("D")  # A - B - {C, D - current}
    pv.delete("B")
    depth_before = pv.vm  # noqa: F841
    pv.force_merge("B")
    vm = pv.vm
    assert pv.hidden() == []
    a = vm.resolve_snapshot("A").id
    assert vm.resolve_snapshot("C").parent == a and vm.resolve_snapshot("D").parent == a
    pv.check()


def test_forced_merge_of_the_own_disk_is_refused(pv: PatternVM) -> None:
    pv.take("A")
    pv.take("B")
    pv.apply("A")
    pv.delete("A")
    with pytest.raises(Refused):
        pv.svc.handle(c.MergeNode(pv.name, "A", force=True))
    pv.check()


def test_after_the_last_snapshot_goes_the_vm_runs_on_its_own_disk_again(pv: PatternVM) -> None:
    pv.take("A")
    pv.take("B")
    pv.take("C")
    for name in ("B", "A", "C"):
        pv.delete(name)
        pv.check()
    vm = pv.vm
    assert vm.nodes[vm.current].layers == pv.disks
    assert not list((pv.svc.data.vm_dir(pv.name) / "layers").glob("*"))


def test_rerunning_a_merge_after_a_crash_mid_way_ends_in_the_same_files(pv: PatternVM) -> None:
    pv.take("A")
    pv.write(nbytes=8 * SLOT)
    pv.take("B")
    pv.write()
    b = pv.vm.resolve_snapshot("B")
    pv.svc.handle(c.DeleteSnapshot(pv.name, "B"), wait=False)
    vm = pv.vm
    hidden = vm.nodes[b.id]
    # Crash 1: after the plan was recorded and the commit ran, before anything was reported.
    drain = Drain(pv.svc.worker(), vm)
    drain.report(merging.plan(drain, hidden))
    vm = pv.vm
    dep = vm.nodes[vm.current]
    for disk in hidden.layers:
        qemu_img.commit(dep.layers[disk])
    pv.settle()  # a fresh run resumes the recorded plan
    assert pv.hidden() == []
    pv.check()


def test_own_disk_with_backing_chain_and_snapshot_names_reused(pv: PatternVM) -> None:
    pv.take("A")
    pv.take("B")
    pv.apply("A")
    pv.delete("A")  # hidden "A"
    pv.take("A")  # the name is free again
    assert pv.visible() == ["A", "B"]
    assert pv.hidden() == ["A"]
    pv.check()
